"""What users install: the wheel built from this checkout, installed into a fresh
virtualenv in a folder outside the checkout, serves the README's curl sequence with its
own ``seckill-gateway serve`` and ``seckill-gateway orders serve``; the Dockerfile and
the compose file run exactly that wheel's commands.

Every other test runs the editable checkout; this one is the user's view of a release
(a wheel that could not find its Lua scripts once passed every other test).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.processes import ChildProcess, free_port, http_answers
from devtools.redis_server import LocalRedis

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Installed:
    root: Path
    bin: Path

    @property
    def cli(self) -> str:
        return str(self.bin / "seckill-gateway")

    def python(self, code: str, *args: str) -> str:
        done = subprocess.run([str(self.bin / "python"), "-c", code, *args], cwd=self.root,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    assert REPO not in root.parents, "the install must live outside the checkout"
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                    str(dist), str(REPO)], check=True, cwd=root, timeout=300)
    wheels = list(dist.glob("seckill_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    subprocess.run([str(root / "venv" / "bin" / "pip"), "install", "-q", str(wheels[0])],
                   check=True, cwd=root, timeout=600)
    return Installed(root, root / "venv" / "bin")


def test_the_wheel_ships_the_runtime_and_nothing_else(installed: Installed) -> None:
    where = installed.python("import gateway, pathlib; print(pathlib.Path(gateway.__file__).parent)")
    package = Path(where.strip())
    assert "site-packages" in package.parts, package  # not the checkout
    lua = sorted(p.name for p in (package / "store" / "scripts").glob("*.lua"))
    assert "purchase.lua" in lua and (package / "store" / "scripts" / "include").is_dir()
    missing = installed.python("import importlib.util as u; "
                               "print([m for m in ('devtools', 'tests', 'loadtest') if u.find_spec(m)])")
    assert missing.strip() == "[]"


def test_version(installed: Installed) -> None:
    done = subprocess.run([installed.cli, "--version"], capture_output=True, text=True, timeout=60)
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "gateway" / "__init__.py").read_text())
    assert version is not None
    assert done.returncode == 0 and done.stdout.strip() == f"seckill-gateway {version.group(1)}"


def _call(method: str, url: str, body: dict | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def stack(installed: Installed, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The installed gateway and orders service, on a private Redis, from a folder
    outside the checkout."""
    admin, orders_token = uuid.uuid4().hex, uuid.uuid4().hex
    gateway_port, orders_port = free_port(), free_port()
    with LocalRedis() as redis:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
               "SECKILL_REDIS_URL": redis.url, "SECKILL_ADMIN_TOKEN": admin,
               "SECKILL_ORDERS_TOKEN": orders_token, "SECKILL_UPSTREAM_TOKEN": orders_token,
               "SECKILL_PAYMENT_SECRET": uuid.uuid4().hex,
               "SECKILL_DATABASE_URL": f"sqlite:///{tmp_path}/orders.db",
               "SECKILL_UPSTREAM_URL": f"http://127.0.0.1:{orders_port}/orders",
               "SECKILL_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}"}
        orders = ChildProcess("orders", [installed.cli, "orders", "serve", "--port", str(orders_port)],
                              tmp_path / "orders.log", env=env, cwd=installed.root)
        gateway = ChildProcess("gateway", [installed.cli, "serve", "--port", str(gateway_port)],
                               tmp_path / "gateway.log", env=env, cwd=installed.root)
        with orders.start(http_answers(f"http://127.0.0.1:{orders_port}/healthz", ok_only=True)), \
                gateway.start(http_answers(f"http://127.0.0.1:{gateway_port}/healthz", ok_only=True)):
            yield {"gateway": f"http://127.0.0.1:{gateway_port}",
                   "orders": f"http://127.0.0.1:{orders_port}", "admin": admin,
                   "orders_token": orders_token}
            assert "Traceback" not in gateway.log_text() + orders.log_text()


def test_the_readme_curl_sequence_on_the_installed_commands(stack: dict[str, str]) -> None:
    gw, admin = stack["gateway"], {"Authorization": f"Bearer {stack['admin']}"}
    status, body = _call("PUT", f"{gw}/admin/sales/phone", {"stock": 100, "price": 49900}, admin)
    assert (status, body["code"]) == (201, "CREATED"), body
    user = {"X-User-Id": "42"}
    status, body = _call("GET", f"{gw}/api/token", headers=user)
    assert status == 200, body
    key = {**user, "X-Idempotency-Key": body["token"]}
    status, bought = _call("POST", f"{gw}/api/seckill/phone", headers=key)
    assert (status, bought["code"], len(bought["units"])) == (200, "OK", 1), bought
    status, again = _call("POST", f"{gw}/api/seckill/phone", headers=key)
    assert (status, again["code"]) == (409, "IDEMPOTENT_CONFLICT"), again
    assert again["original"] == {"status": 200, "body": bought}

    order_no = bought["order_no"]
    deadline = time.monotonic() + 60
    while True:
        status, order = _call("GET", f"{gw}/api/orders/{order_no}", headers=user)
        if order.get("status") == "delivered" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (status, order["status"]) == (200, "delivered"), order
    status, stored = _call("GET", f"{stack['orders']}/orders/{order_no}",
                           headers={"Authorization": f"Bearer {stack['orders_token']}"})
    assert (status, stored["state"], stored["units"]) == (200, "pending", bought["units"]), stored


def _compose_commands() -> dict[str, list[str]]:
    compose = yaml.safe_load((REPO / "docker-compose.cluster.yml").read_text())
    return {name: service["command"] for name, service in compose["services"].items()
            if "build" in service}


def test_docker_and_compose_run_commands_the_installed_cli_has(installed: Installed) -> None:
    """No Docker engine here: the image is checked to install the wheel, and every
    command the compose file gives our image is parsed by the installed CLI."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip wheel .*--wheel-dir /dist \.", dockerfile)
    assert re.search(r"pip install .*/dist/\*\.whl", dockerfile)
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    commands: dict[str, Any] = {"Dockerfile CMD": json.loads(cmd.group(1)), **_compose_commands()}
    assert {"orders", "gateway"} <= set(commands)
    for name, argv in commands.items():
        assert isinstance(argv, list) and argv[0] == "seckill-gateway", (name, argv)
        parsed = installed.python(
            "import json, sys; from gateway.cli import build_parser; "
            "args = build_parser().parse_args(json.loads(sys.argv[1])); "
            "print(args.func.__name__)", json.dumps(argv[1:]))
        assert parsed.strip(), (name, argv)
