"""The whole stack on one machine, for trying the gateway out: a private Redis
(standalone, or a local Cluster with ``--cluster``), the bundled orders service on
SQLite, and the gateway with its relay delivering to it. Ctrl-C stops everything.

    python -m devtools.stack [--port 8080] [--cluster]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from devtools.processes import ChildProcess
from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis

DEV_ADMIN_TOKEN = "dev-admin-token"


def _wait_http(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def _spawn(name: str, args: list[str], env: dict[str, str]) -> ChildProcess:
    """A ``python -m gateway`` child whose output goes to this terminal."""
    return ChildProcess(name, [sys.executable, "-m", "gateway", *args], None, env=env).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.stack", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="gateway port")
    parser.add_argument("--orders-port", type=int, default=8081, help="orders service port")
    parser.add_argument("--cluster", action="store_true", help="a local Redis Cluster (3+3 nodes)")
    parser.add_argument("--database-url", default=None,
                        help="orders store [a new SQLite file under .run/ for each run: the "
                             "Redis is new too, and old orders would hold its unit numbers]")
    args = parser.parse_args(argv)

    if args.database_url is None:
        run_dir = Path(".run")
        run_dir.mkdir(exist_ok=True)
        args.database_url = f"sqlite:///{run_dir.resolve()}/orders-{time.strftime('%Y%m%d-%H%M%S')}.db"
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with ExitStack() as stack:
        if args.cluster:
            redis_url, mode = stack.enter_context(LocalCluster()).url, "cluster"
        else:
            redis_url, mode = stack.enter_context(LocalRedis()).url, "standalone"
        base = f"http://{args.host}:{args.port}"
        orders_token = os.environ.get("SECKILL_ORDERS_TOKEN") or secrets.token_urlsafe(16)
        env = {
            **os.environ,
            "SECKILL_REDIS_URL": redis_url,
            "SECKILL_REDIS_MODE": mode,
            "SECKILL_ADMIN_TOKEN": os.environ.get("SECKILL_ADMIN_TOKEN", DEV_ADMIN_TOKEN),
            "SECKILL_UPSTREAM_URL": f"http://{args.host}:{args.orders_port}/orders",
            "SECKILL_DATABASE_URL": args.database_url,
            # Development secrets, made up for this run and printed below: the orders
            # service refuses to start without them.
            "SECKILL_ORDERS_TOKEN": orders_token,
            "SECKILL_UPSTREAM_TOKEN": orders_token,
            "SECKILL_PAYMENT_SECRET": (os.environ.get("SECKILL_PAYMENT_SECRET")
                                       or secrets.token_urlsafe(16)),
            "SECKILL_GATEWAY_URL": base,
        }
        orders = _spawn("orders service", ["orders", "serve", "--host", args.host,
                                           "--port", str(args.orders_port)], env)
        stack.callback(orders.stop)
        gateway = _spawn("gateway", ["serve", "--host", args.host, "--port", str(args.port)], env)
        stack.callback(gateway.stop)
        if not _wait_http(f"{base}/healthz"):
            print("the gateway did not come up", file=sys.stderr)
            return 1
        _wait_http(f"http://{args.host}:{args.orders_port}/healthz", timeout=10)
        print(f"""
seckill stack up: Redis {mode} at {redis_url}
  gateway         {base}   (admin token: {env['SECKILL_ADMIN_TOKEN']})
  orders service  http://{args.host}:{args.orders_port}   ({args.database_url})
Development secrets of this run (for the README's curl sequence, in another terminal):
  export SECKILL_ADMIN_TOKEN={env['SECKILL_ADMIN_TOKEN']}
  export SECKILL_ORDERS_TOKEN={env['SECKILL_ORDERS_TOKEN']}
  export SECKILL_PAYMENT_SECRET={env['SECKILL_PAYMENT_SECRET']}
Ctrl-C stops everything.
""", flush=True)
        while not stopping:
            if not gateway.running or not orders.running:
                print("a child process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
