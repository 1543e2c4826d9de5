"""Run a load test end to end: local stack, Locust (headless, bounded), the verifier, the picture.

    python -m loadtest.run                      # local stack: Redis Cluster, orders service, gateway
    python -m loadtest.run --host https://gw.example.com   # a deployed gateway: no stack started

Local: starts a throw-away Redis (a 3-primary Redis Cluster, ``devtools.redis_cluster.
LocalCluster``, or ``--redis standalone``: ``devtools.redis_server.LocalRedis``), the
bundled orders service (``seckill-gateway orders serve``) on a SQLite file, and the
gateway (``seckill-gateway serve``) on free local ports, with a fresh key prefix, SKU,
admin token, orders token and payment secret; the orders service sends releases to the
gateway, the gateway's relay delivers to the orders service. Every child process goes
through ``devtools.processes.ChildProcess``. Then Locust runs headless for
``--run-time`` (HTML report, CSV stats, the record file and the outcome table in
``loadtest/reports/``), then ``loadtest.verify`` checks the invariants of every sale the
scenarios set up (the main sale, EarlyCrowd's, Abandoners', QueueCrowd's with its
waiting room), then ``loadtest.timeline`` draws units sold, released and sold again
(``reports/timeline.png``) and ``loadtest.queue_picture`` the waiting room
(``reports/waiting-room.png``; ``--queue-picture PATH`` writes it there too).
Everything it started is stopped at the end, also on Ctrl-C or SIGTERM.

With ``--host URL`` nothing is started: Locust runs against ``URL`` (the admin token
comes from ``SECKILL_ADMIN_TOKEN``; Abandoners needs ``SECKILL_LT_ORDERS_URL``,
``SECKILL_ORDERS_TOKEN`` and ``SECKILL_PAYMENT_SECRET``) and the verifier reads the
Redis and orders store given by the usual ``SECKILL_*`` variables (skip it with
``--no-verify``).

Exit status: 1 if the verifier found violations in any sale, else 2 if it could not
verify one, else Locust's (1 when any request failed a check).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from devtools.processes import ChildProcess, NotReady, free_port, http_answers
from devtools.redis_cluster import ClusterNotReady, LocalCluster
from devtools.redis_server import LocalRedis
from loadtest import queue_picture, records, timeline, verify

LOADTEST_DIR = Path(__file__).resolve().parent
REPO = LOADTEST_DIR.parent
PYTHON = sys.executable
SCENARIOS = ("FlashCrowd", "RetryStorm", "GreedyUser", "SkewedCrowd", "LateCrowd", "EarlyCrowd", "Abandoners",
             "QueueCrowd")
QUEUE_OPTIONS = ("crowd", "late", "stock", "rate", "users", "lead")  # --queue-X -> the locustfile's --lt-queue-X
STARTUP_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """What Locust and the verifier talk to: the gateway, where its Redis and orders
    store are, and the environment for Locust (secrets included)."""

    host: str
    env: dict[str, str]
    verify_args: list[str] = field(default_factory=list)  # where Redis and the DB are
    database_url: str | None = None


# -- the local stack -------------------------------------------------------------------------

def start_redis(args: argparse.Namespace, stack: ExitStack) -> tuple[str, str]:
    """Start the local Redis, stopped when ``stack`` closes; returns (url, mode)."""
    if args.redis == "cluster":
        log(f"starting a local Redis Cluster ({args.primaries} primaries, {args.replicas} replica(s) each)")
        cluster = stack.enter_context(LocalCluster(primaries=args.primaries, replicas_per_primary=args.replicas))
        return cluster.url, "cluster"
    server = stack.enter_context(LocalRedis())
    return server.url, "standalone"


def start_child(stack: ExitStack, name: str, argv: list[str], env: dict[str, str], logfile: Path,
                health_url: str) -> ChildProcess:
    """A ``python -m gateway …`` service, ready when ``health_url`` answers 200; stopped
    (SIGTERM, then SIGKILL) when ``stack`` closes."""
    child = ChildProcess(name, argv, logfile, env=env, cwd=REPO)
    stack.callback(child.stop)
    child.start(http_answers(health_url, ok_only=True), STARTUP_TIMEOUT)
    log(f"started {name} (pid {child.pid}), log {logfile}")
    return child


def start_stack(args: argparse.Namespace, stack: ExitStack, sku: str, reports: Path) -> Target:
    redis_url, redis_mode = start_redis(args, stack)
    gateway_url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ,
           "SECKILL_REDIS_URL": redis_url, "SECKILL_REDIS_MODE": redis_mode,
           "SECKILL_ADMIN_TOKEN": secrets.token_urlsafe(16),
           "SECKILL_KEY_PREFIX": f"lt{secrets.token_hex(4)}",
           "SECKILL_SHARDS": str(args.shards)}
    target = Target(gateway_url, env, ["--redis-url", redis_url, "--redis-mode", redis_mode,
                                       "--key-prefix", env["SECKILL_KEY_PREFIX"]])
    if args.no_orders:
        log("no orders service (--no-orders): verifying Redis only; Abandoners skips itself")
        target.verify_args.append("--no-db")
    else:
        start_orders_service(stack, target, gateway_url, sku, reports)
    port = gateway_url.rsplit(":", 1)[1]
    start_child(stack, "gateway", [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", port,
                                   "--workers", str(args.gateway_workers)],
                env, reports / "gateway.log", f"{gateway_url}/healthz")
    log(f"gateway up at {gateway_url}, Redis {redis_mode} at {redis_url}")
    return target


def start_orders_service(stack: ExitStack, target: Target, gateway_url: str, sku: str, reports: Path) -> None:
    """The bundled orders service on a fresh SQLite file: the relay's endpoint, and the
    sender of releases (expired, cancelled orders) back to the gateway."""
    db = reports / f"orders-{sku}.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    orders_url = f"http://127.0.0.1:{free_port()}"
    token = secrets.token_urlsafe(16)
    target.database_url = f"sqlite:///{db}"
    target.env.update({
        "SECKILL_DATABASE_URL": target.database_url,
        "SECKILL_ORDERS_TOKEN": token,       # what the orders service requires ...
        "SECKILL_UPSTREAM_TOKEN": token,     # ... and what the relay sends it
        "SECKILL_PAYMENT_SECRET": secrets.token_urlsafe(16),
        "SECKILL_GATEWAY_URL": gateway_url,  # where releases go (with SECKILL_ADMIN_TOKEN)
        "SECKILL_UPSTREAM_URL": f"{orders_url}/orders",
        "SECKILL_LT_ORDERS_URL": orders_url,  # Abandoners pays and cancels there
    })
    start_child(stack, "orders service", [PYTHON, "-m", "gateway", "orders", "serve", "--host", "127.0.0.1",
                                          "--port", orders_url.rsplit(":", 1)[1]],
                target.env, reports / "orders.log", f"{orders_url}/healthz")
    target.verify_args += ["--database-url", target.database_url]


def deployed_target(args: argparse.Namespace) -> Target:
    env = dict(os.environ)
    if not env.get("SECKILL_ADMIN_TOKEN"):
        log("SECKILL_ADMIN_TOKEN is not set: the sale must exist already; EarlyCrowd and Abandoners skip")
    database_url = env.get("SECKILL_DATABASE_URL")  # the deployment's store, only when named (not ./orders.db)
    return Target(args.host, env, [] if database_url else ["--no-db"], database_url)


# -- Locust ----------------------------------------------------------------------------------

def locust_argv(args: argparse.Namespace, host: str, sku: str, record: Path, reports: Path) -> list[str]:
    argv = [PYTHON, "-m", "locust", "-f", str(LOADTEST_DIR / "locustfile.py"), "--headless",
            "--host", host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
            "--run-time", args.run_time, "--stop-timeout", "5",
            "--html", str(reports / "report.html"), "--csv", str(reports / "locust"),
            "--lt-sku", sku, "--lt-stock", str(args.stock), "--lt-limit", str(args.limit),
            "--lt-shards", str(args.shards), "--lt-record", str(record)]
    if args.processes != 1:
        argv += ["--processes", str(args.processes)]
    for name in QUEUE_OPTIONS:
        value = getattr(args, f"queue_{name}", None)
        if value is not None:
            argv += [f"--lt-queue-{name}", str(value)]
    return argv + list(args.locust_args) + list(args.classes)


def run_locust(stack: ExitStack, argv: list[str], env: dict[str, str]) -> int:
    """Locust in the foreground (its output on this terminal); stopped if we are."""
    locust = ChildProcess("locust", argv, None, env=env, cwd=REPO)
    stack.callback(locust.stop)
    locust.start()
    while locust.running:
        time.sleep(0.2)
    return locust.returncode or 0


# -- verifying every sale --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SaleCheck:
    sku: str
    scenario: str
    expect_sold_out: bool


def sold_out_seen(outcomes: Path, sku: str, main: bool) -> bool:
    """The gateway answered SOLD_OUT for ``sku`` at least once: by the contract no unit
    may then be left (rows of old tables, without a SKU, count for the main sale)."""
    try:
        rows = json.loads(outcomes.read_text())
    except (OSError, ValueError):
        return False
    return any(r["status"] == 410 and r["code"] == "SOLD_OUT" and r["count"] > 0
               and r.get("sku", sku if main else None) == sku for r in rows)


def plan_checks(record: records.Record, sku: str, outcomes: Path, choice: str) -> list[SaleCheck]:
    """The sales to verify: the main one always, the lifecycle ones the run set up.
    ``--expect-sold-out`` (auto: a SOLD_OUT was answered) rules the main sale;
    EarlyCrowd's and QueueCrowd's sales must sell out once they said SOLD_OUT (to a
    purchase or in the waiting room); Abandoners' never must
    (units come back after the buyers stopped)."""
    main = SaleCheck(sku, "main", sold_out_seen(outcomes, sku, True) if choice == "auto" else choice == "yes")
    checks = [main]
    for note in record.sales:
        if note.sku == sku or not note.usable or note.sku in {c.sku for c in checks}:
            continue
        sold_out = note.scenario in ("EarlyCrowd", "QueueCrowd") and sold_out_seen(outcomes, note.sku, False)
        checks.append(SaleCheck(note.sku, note.scenario, sold_out))
    return checks


def skipped(record: records.Record) -> list[records.SaleNote]:
    return [n for n in record.sales if not n.usable]


def verify_sales(checks: Sequence[SaleCheck], target: Target, record_path: Path, wait: float) -> dict[str, int]:
    """Run the verifier for each sale; its exit status by SKU."""
    results: dict[str, int] = {}
    for check in checks:
        argv = ["--sku", check.sku, "--admitted", str(record_path), *target.verify_args]
        if target.database_url and "--no-db" not in argv:
            argv += ["--wait-delivery", str(wait)]
        if check.expect_sold_out:
            argv.append("--expect-sold-out")
        log(f"verify {check.scenario} sale: python -m loadtest.verify {' '.join(argv)}")
        results[check.sku] = verify.main(argv)
        log(f"verifier for {check.sku} exited with {results[check.sku]}")
    return results


def draw(record_path: Path, database_url: str | None, reports: Path, queue_copy: Path | None = None) -> None:
    try:
        path = timeline.draw_run(record_path, database_url, reports / "timeline.png")
        log(f"timeline: {path}" if path else "timeline: nothing was sold, nothing to draw")
    except Exception as exc:  # the picture is a view of the run, not its verdict
        log(f"could not draw the timeline: {type(exc).__name__}: {exc}")
    for out in (reports / "waiting-room.png", queue_copy):
        if out is None:
            continue
        try:
            path = queue_picture.draw_run(record_path, out)
        except Exception as exc:
            log(f"could not draw the waiting room: {type(exc).__name__}: {exc}")
            return
        if path is None:
            log("waiting room: no queue answers, nothing to draw")
            return
        log(f"waiting room: {path}")


def verdict(results: dict[str, int], locust_rc: int) -> int:
    if any(rc == 1 for rc in results.values()):
        return 1
    if any(rc for rc in results.values()):
        return 2
    return locust_rc


# -- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0],
                                epilog="Arguments after -- go to Locust as they are.")
    p.add_argument("classes", nargs="*", metavar="SCENARIO",
                   help=f"user classes to run (default: all): {', '.join(SCENARIOS)}")
    p.add_argument("--host", help="a deployed gateway's URL: start nothing, test it")
    p.add_argument("--run-time", default="30s", help="Locust --run-time [30s]")
    p.add_argument("--users", type=int, default=100,
                   help="Locust users [100]; EarlyCrowd and Abandoners take a fixed number of them first")
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
                   help="verifier: wait up to this long for orders to settle [30, when an orders store is used]")
    p.add_argument("--expect-sold-out", choices=("auto", "yes", "no"), default="auto",
                   help="verifier --expect-sold-out for the main sale [auto: if any SOLD_OUT was answered]")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier")
    p.add_argument("--reports", default=str(LOADTEST_DIR / "reports"), help="output directory")
    q = p.add_argument_group("QueueCrowd (the locustfile's --lt-queue-* options; unset: its defaults)")
    q.add_argument("--queue-crowd", type=int, help="buyers who join before the start [1800]")
    q.add_argument("--queue-late", type=int, help="buyers who join after the start [400]")
    q.add_argument("--queue-stock", type=int, help="its sale's stock [2000]")
    q.add_argument("--queue-rate", type=float, help="its admit_rate, per second [200]")
    q.add_argument("--queue-users", type=int, help="Locust users the crowd is shared among [10]")
    q.add_argument("--queue-lead", type=float, help="seconds from the test's start to starts_at [12]")
    q.add_argument("--queue-picture", type=Path, help="also draw the waiting room's picture here")
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace | None:
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
        return None
    return args


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    record_path = reports / "admitted.jsonl"
    record_path.unlink(missing_ok=True)
    (reports / "outcomes.json").unlink(missing_ok=True)
    sku = args.sku or os.environ.get("SECKILL_LT_SKU") or f"lt-{time.strftime('%Y%m%d-%H%M%S')}"
    target = deployed_target(args) if args.host else start_stack(args, stack, sku, reports)
    target.env.update({"SECKILL_LT_RECORD": str(record_path), "SECKILL_LT_SKU": sku})
    command = locust_argv(args, target.host, sku, record_path, reports)
    log(f"locust: {' '.join(command[2:])}")
    locust_rc = run_locust(stack, command, target.env)
    log(f"locust exited with {locust_rc}; report {reports / 'report.html'}")
    record = records.read_record(record_path)
    for note in skipped(record):
        log(f"{note.scenario} was skipped ({note.outcome}): {note.message}")
    results: dict[str, int] = {}
    if not args.no_verify:
        checks = plan_checks(record, sku, reports / "outcomes.json", args.expect_sold_out)
        results = verify_sales(checks, target, record_path, args.wait_delivery)
    draw(record_path, target.database_url, reports, args.queue_picture)
    return verdict(results, locust_rc)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args is None:
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    with ExitStack() as stack:  # closed in reverse: Locust, gateway, orders service, Redis
        try:
            return run(args, stack)
        except KeyboardInterrupt:
            log("interrupted; stopping what was started")
            return 130
        except (NotReady, ClusterNotReady, FileNotFoundError) as exc:
            log(f"error: {exc}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
