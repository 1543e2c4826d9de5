"""Run a load test end to end: local stack, Locust (headless, bounded), the verifier.

    python -m loadtest.run                      # local stack: Redis Cluster, [orders service], gateway
    python -m loadtest.run --host https://gw.example.com   # a deployed gateway: no stack started

Local: starts a throw-away Redis (a 3-primary Redis Cluster through
``gateway.devcluster.LocalCluster``, or ``--redis standalone``), the bundled orders
service (``seckill-gateway orders serve``, if this checkout has that command) on a
SQLite file, and the gateway (``seckill-gateway serve``) on free local ports, with a
fresh key prefix, SKU and admin token. Then Locust runs headless for ``--run-time``
(HTML report, CSV stats, the record of 200s and the outcome table in
``loadtest/reports/``), then ``loadtest.verify`` checks the invariants. Everything it
started is stopped at the end, also on Ctrl-C or SIGTERM.

With ``--host URL`` nothing is started: Locust runs against ``URL`` (the admin token
comes from ``SECKILL_ADMIN_TOKEN``) and the verifier reads the Redis and orders store
given by the usual ``SECKILL_*`` variables (skip it with ``--no-verify``).

Exit status: the verifier's (0 clean, 1 violations, 2 could not verify) if not 0, else
Locust's (1 when any request failed a check).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from devtools.processes import free_port, stop_process

from . import verify

LOADTEST_DIR = Path(__file__).resolve().parent
REPO = LOADTEST_DIR.parent
PYTHON = sys.executable
SCENARIOS = ("FlashCrowd", "RetryStorm", "GreedyUser", "SkewedCrowd", "LateCrowd")


def log(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)



def cli_has(*words: str) -> bool:
    """True when ``seckill-gateway <words> --help`` works (the command exists)."""
    result = subprocess.run([PYTHON, "-m", "gateway", *words, "--help"], capture_output=True, text=True,
                            cwd=REPO)
    return result.returncode == 0


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = str(exc)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s: {last}")


class Processes:
    """Child processes this runner started, each in its own session; stopped in reverse."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], logfile: Path) -> subprocess.Popen:
        out = open(logfile, "wb")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        out.close()
        self.started.append((name, proc))
        log(f"started {name} (pid {proc.pid}), log {logfile}")
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.started):
            if proc.poll() is None:
                stop_process(proc)
                log(f"stopped {name} (pid {proc.pid})")
        self.started.clear()


class StandaloneRedis:
    """A private redis-server on a free port (used when gateway.devcluster has no LocalRedis)."""

    def __init__(self, processes: Processes, reports: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="loadtest-redis-"))
        self.port = free_port()
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = processes.start("redis-server", [
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--protected-mode", "no"], dict(os.environ), reports / "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.1)

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(args: argparse.Namespace, stack: ExitStack, processes: Processes, reports: Path) -> tuple[str, str]:
    """Start the local Redis; returns (url, mode)."""
    if args.redis == "cluster":
        from devtools.redis_cluster import LocalCluster

        cluster = LocalCluster(primaries=args.primaries, replicas_per_primary=args.replicas)
        log(f"starting a local Redis Cluster ({args.primaries} primaries, {args.replicas} replica(s) each)")
        cluster.start()
        stack.callback(cluster.stop)
        return cluster.url, "cluster"
    try:
        from devtools.redis_cluster import LocalRedis  # type: ignore[attr-defined]
    except ImportError:
        LocalRedis = None
    if LocalRedis is not None:
        server = LocalRedis()
        server.start()
        stack.callback(server.stop)
        return server.url, "standalone"
    server = StandaloneRedis(processes, reports)
    stack.callback(server.stop)
    return server.url, "standalone"


def locust_argv(args: argparse.Namespace, host: str, sku: str, record: Path, reports: Path) -> list[str]:
    argv = [PYTHON, "-m", "locust", "-f", str(LOADTEST_DIR / "locustfile.py"), "--headless",
            "--host", host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
            "--run-time", args.run_time, "--stop-timeout", "5",
            "--html", str(reports / "report.html"), "--csv", str(reports / "locust"),
            "--lt-sku", sku, "--lt-stock", str(args.stock), "--lt-limit", str(args.limit),
            "--lt-shards", str(args.shards), "--lt-record", str(record)]
    if args.processes != 1:
        argv += ["--processes", str(args.processes)]
    return argv + list(args.locust_args) + list(args.classes)


def expect_sold_out(choice: str, outcomes: Path) -> bool:
    """``auto``: the gateway answered SOLD_OUT at least once, so by the contract no unit
    may be left (SOLD_OUT only when the whole sale has none)."""
    if choice != "auto":
        return choice == "yes"
    try:
        rows = json.loads(outcomes.read_text())
    except (OSError, ValueError):
        return False
    return any(r["status"] == 410 and r["code"] == "SOLD_OUT" and r["count"] > 0 for r in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0],
                                epilog="Arguments after -- go to Locust as they are.")
    p.add_argument("classes", nargs="*", metavar="SCENARIO",
                   help=f"user classes to run (default: all): {', '.join(SCENARIOS)}")
    p.add_argument("--host", help="a deployed gateway's URL: start nothing, test it")
    p.add_argument("--run-time", default="30s", help="Locust --run-time [30s]")
    p.add_argument("--users", type=int, default=100, help="Locust users [100]")
    p.add_argument("--spawn-rate", type=float, default=50, help="users started per second [50]")
    p.add_argument("--processes", type=int, default=1, help="Locust worker processes (-1: one per CPU) [1]")
    p.add_argument("--sku", help="sale SKU [SECKILL_LT_SKU, or a fresh lt-<time> SKU]")
    p.add_argument("--stock", type=int, default=int(os.environ.get("SECKILL_LT_STOCK", 1000)))
    p.add_argument("--limit", type=int, default=int(os.environ.get("SECKILL_LT_LIMIT", 1)), help="per-user limit")
    p.add_argument("--shards", type=int, default=int(os.environ.get("SECKILL_LT_SHARDS", 16)))
    p.add_argument("--redis", choices=("cluster", "standalone"), default="cluster", help="local Redis [cluster]")
    p.add_argument("--primaries", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1, help="replicas per primary [1]")
    p.add_argument("--gateway-workers", type=int, default=1, help="seckill-gateway serve --workers [1]")
    p.add_argument("--no-orders", action="store_true", help="do not start the orders service")
    p.add_argument("--wait-delivery", type=float, default=30.0,
                   help="verifier: wait up to this long for deliveries [30, when an orders store is used]")
    p.add_argument("--expect-sold-out", choices=("auto", "yes", "no"), default="auto",
                   help="verifier --expect-sold-out [auto: if any SOLD_OUT was answered]")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier")
    p.add_argument("--reports", default=str(LOADTEST_DIR / "reports"), help="output directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    locust_extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, locust_extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.locust_args = locust_extra
    unknown = [c for c in args.classes if c not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    record = reports / "admitted.jsonl"
    record.unlink(missing_ok=True)
    (reports / "outcomes.json").unlink(missing_ok=True)
    sku = args.sku or os.environ.get("SECKILL_LT_SKU") or f"lt-{time.strftime('%Y%m%d-%H%M%S')}"

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    processes = Processes()  # Redis (when not through gateway.devcluster)
    services = Processes()  # orders service, gateway: stopped before Redis
    env = dict(os.environ)
    verify_argv = ["--sku", sku, "--admitted", str(record)]
    with ExitStack() as stack:
        stack.callback(processes.stop)
        try:
            if args.host:
                host = args.host
                if not env.get("SECKILL_ADMIN_TOKEN"):
                    log("SECKILL_ADMIN_TOKEN is not set: the sale must exist already")
            else:
                redis_url, redis_mode = start_redis(args, stack, processes, reports)
                stack.callback(services.stop)
                env.update({
                    "SECKILL_REDIS_URL": redis_url, "SECKILL_REDIS_MODE": redis_mode,
                    "SECKILL_ADMIN_TOKEN": secrets.token_urlsafe(16),
                    "SECKILL_KEY_PREFIX": f"lt{secrets.token_hex(4)}",
                    "SECKILL_SHARDS": str(args.shards),
                })
                verify_argv += ["--redis-url", redis_url, "--redis-mode", redis_mode,
                                "--key-prefix", env["SECKILL_KEY_PREFIX"]]
                if not args.no_orders and cli_has("orders", "serve"):
                    db = reports / f"orders-{sku}.db"
                    db.unlink(missing_ok=True)
                    env["SECKILL_DATABASE_URL"] = f"sqlite:///{db}"
                    # The orders service's callers authenticate (the relay with its bearer).
                    env["SECKILL_ORDERS_TOKEN"] = env["SECKILL_UPSTREAM_TOKEN"] = secrets.token_urlsafe(16)
                    env["SECKILL_PAYMENT_SECRET"] = secrets.token_urlsafe(16)
                    port = free_port()
                    orders = services.start("orders service", [
                        PYTHON, "-m", "gateway", "orders", "serve", "--host", "127.0.0.1", "--port", str(port)],
                        env, reports / "orders.log")
                    wait_http(f"http://127.0.0.1:{port}/healthz", 30, orders)
                    env["SECKILL_UPSTREAM_URL"] = f"http://127.0.0.1:{port}/orders"
                    verify_argv += ["--database-url", env["SECKILL_DATABASE_URL"],
                                    "--wait-delivery", str(args.wait_delivery)]
                else:
                    log("no orders service (seckill-gateway orders serve is not in this checkout, "
                        "or --no-orders): verifying Redis only")
                    verify_argv += ["--no-db"]
                port = free_port()
                gateway = services.start("gateway", [
                    PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(args.gateway_workers)], env, reports / "gateway.log")
                host = f"http://127.0.0.1:{port}"
                wait_http(f"{host}/healthz", 30, gateway)
                log(f"gateway up at {host}, Redis {redis_mode} at {redis_url}")
            env["SECKILL_LT_RECORD"] = str(record)
            env["SECKILL_LT_SKU"] = sku
            command = locust_argv(args, host, sku, record, reports)
            log(f"locust: {' '.join(command[2:])}")
            locust_rc = subprocess.run(command, env=env, cwd=REPO).returncode
            log(f"locust exited with {locust_rc}; report {reports / 'report.html'}")
            if args.no_verify:
                return locust_rc
            sold_out = expect_sold_out(args.expect_sold_out, reports / "outcomes.json")
            if sold_out:
                verify_argv.append("--expect-sold-out")
            if args.host:  # the deployment's orders store, only when named (not ./orders.db)
                verify_argv += (["--wait-delivery", str(args.wait_delivery)]
                                if os.environ.get("SECKILL_DATABASE_URL") else ["--no-db"])
            log(f"verify: python -m loadtest.verify {' '.join(verify_argv)}")
            saved = dict(os.environ)
            os.environ.update(env)  # the verifier reads SECKILL_* like the gateway does
            try:
                verify_rc = verify.main(verify_argv)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            log(f"verifier exited with {verify_rc}")
            return verify_rc or locust_rc
        except KeyboardInterrupt:
            log("interrupted; stopping what was started")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
