"""The gateway's hot paths next to a bare aiohttp endpoint, in one run.

    python -m loadtest.bench [--duration 5] [--connections 64] [--repeat 3] [--quick]
                             [--workers 1] [--redis cluster|standalone] [--only a,b]
                             [--ref GIT_REF ...] [--shards] [--unbatched]
                             [--json FILE] [--png FILE] [--generator auto|wrk|aiohttp]

Starts, on free local ports: a throw-away Redis (a 3-primary Cluster by default, no
replicas unless ``--replicas``; ``--redis standalone``: one node), a bare aiohttp+uvloop
endpoint answering a fixed JSON body, and the gateway (``SECKILL_KEY_MODE=client``, no
relay), each with ``--workers`` processes. Then it drives every target with wrk, in
interleaved rounds, ``--repeat`` times, after a warm-up:

- ``bare``: the bare endpoint, the ceiling of one Python process on this machine;
- ``token``: ``GET /api/token``, a new user per request (no Redis call);
- ``purchase``: ``POST /api/seckill/{sku}`` on a sale too big to sell out (16 shards),
  a new user and key per request: every answer a 200 admission;
- ``sold_out``: the same on a sale of stock 1, already sold out: every answer a 410;
- ``not_started``: the same on a sale that starts in an hour: every answer a 403
  ``SALE_NOT_STARTED``;
- ``queue_join``, ``queue_poll``: the waiting room (``POST /api/queue/{sku}``, ``GET
  /api/queue/{sku}/{ticket}``), when the gateway has one (probed; skipped otherwise);
- with ``--shards``: ``purchase_shards_N``, the purchase path on sales of 1, 4 and 64
  shards; with ``--unbatched``: ``purchase_unbatched``, one EVALSHA per request. Both
  are off by default (a minute of run time); the README has their last figures.
- with ``--ref REF`` (repeatable): every gateway target again, served by the
  ``gateway/`` package of git revision REF (``name@REF``): a change measured against
  its parent in the same run.

Per target: req/s (median of the rounds), the ratio to bare's, p50/p99 latency, and
the CPU time the server processes spent per request (from /proc: user + system over the
target's processes, divided by the requests of the run), beside bare's; the Redis
servers' CPU per request; the share of answers the gateway counted as fast-path answers
(``seckill_fast_path_answers_total``, when the gateway has that counter); and, from the
gateway's own ``/metrics``, the answers that were not the expected code (``wrong``).
On a 2-core machine shared with Redis, wrk and other work, CPU µs per request is the
figure that noise moves least; req/s ratios move with whatever else runs.

The table is printed, and drawn (ratio bars against the goals, CPU µs per request) as a
PNG into ``loadtest/reports/`` with the figures as JSON beside it. Everything started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (the servers under test are)
    sys.path.insert(0, str(ROOT))

from devtools.processes import free_port  # noqa: E402

WRK_DIR = ROOT / "loadtest" / "wrk"
WRK_SCRIPT = WRK_DIR / "seckill.lua"
POLL_SCRIPT = WRK_DIR / "poll.lua"
REPORTS = ROOT / "loadtest" / "reports"
BARE_BODY = (b'{"code":"OK","order_no":"7-0123456789abcdef0123456789abcdef","sku":"bench",'
             b'"user_id":1,"units":[1]}')
BIG_STOCK = 10_000_000
SHARD_COUNTS = (1, 4, 16, 64)
PATHS = ("bare", "token", "purchase", "sold_out", "not_started", "queue_join", "queue_poll")
# Goals: req/s as a ratio to bare's in the same run (and purchase p99 at most 3x bare's).
GOALS = {"token": 0.8, "purchase": 0.5, "sold_out": 0.85, "not_started": 0.9,
         "queue_join": 0.6, "queue_poll": 0.6}  # the issues' targets, as ratios to bare
P99_GOAL = ("purchase", 3.0)
ADMIN_TOKEN = "bench-" + secrets.token_hex(8)
QUEUE_TICKETS = 2000  # users joined before queue_poll, polled round robin


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # the server process (with --workers: the supervisor; its children count too)
    path: str
    expect: str | None = None  # the gateway code(s) every answer must carry, "A|B"
    method: str = "POST"
    route: str = "/api/seckill/"  # prefix of the gateway's route label for this path
    script: Path = WRK_SCRIPT
    script_args: tuple[str, ...] = ()  # wrk script arguments (default: path, users, method)
    workers: int = 1


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # transport errors: connect, read, write, timeout
    failed: int  # answers with a 4xx/5xx status, as the generator saw them
    unexpected: int = 0  # answers other than the target expects
    codes: dict[str, int] = field(default_factory=dict)  # the gateway's own count, by code
    server_cpu_us: float = 0.0  # CPU time of the server processes per request
    redis_cpu_us: float = 0.0  # CPU time of all Redis servers per request
    fast_path: int = 0  # answers counted in seckill_fast_path_answers_total


# -- the servers under test (run as subprocesses of this file) ------------------------------

def bare_app() -> Any:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=BARE_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def serve_bare(port: int, workers: int) -> None:
    if workers <= 1:  # aiohttp as it comes
        import uvloop
        from aiohttp import web

        web.run_app(bare_app(), host="127.0.0.1", port=port, access_log=None, print=None,
                    loop=uvloop.new_event_loop())
        return
    from gateway.http.server import run

    run(lambda _worker: bare_app(), "127.0.0.1", port, workers)


def serve_gateway(port: int, workers: int, batch: bool) -> None:
    """The gateway as ``seckill-gateway serve`` runs it (``gateway.http.server.run``),
    settings from the environment; without the script batcher when ``batch`` is false."""
    from gateway.app import create_app
    from gateway.config import load_settings
    from gateway.http.context import GATEWAY
    from gateway.http.server import run
    from gateway.logs import setup_logging

    setup_logging("WARNING")
    settings = load_settings()

    def make_app(_worker: Any) -> Any:
        app = create_app(settings)
        if not batch:
            app[GATEWAY].store.batcher = None
        return app

    run(make_app, "127.0.0.1", port, workers)


# -- the stack ------------------------------------------------------------------------------

def _http(method: str, url: str, body: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def code_tree(ref: str, into: Path) -> Path:
    """The ``gateway/`` package of git revision ``ref``, unpacked under ``into``."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = into / f"ref-{sha}"
    if not tree.exists():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "gateway"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return tree


class Stack:
    """The processes under test. Stops only what it started."""

    def __init__(self, workdir: Path, pin: bool = False) -> None:
        self.workdir = workdir
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.procs: list[subprocess.Popen[bytes]] = []

    def cpus(self, role: str) -> set[int] | None:
        """With --pin: the server under test on CPU 0, the generator and Redis on the rest."""
        if not self.pin:
            return None
        return {0} if role == "server" else set(range(1, os.cpu_count() or 2))

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None,
              role: str = "server") -> subprocess.Popen[bytes]:
        cpus = self.cpus(role)
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        log.close()
        self.procs.append(proc)
        return proc

    def server(self, name: str, serve: str, env: dict[str, str] | None = None, workers: int = 1,
               code: Path = ROOT) -> tuple[int, int]:
        """Start a server under test, importing ``gateway`` from ``code``; its port and
        pid once it answers."""
        port = free_port()
        env = {**(env or {}), "PYTHONPATH": os.pathsep.join(dict.fromkeys((str(code), str(ROOT))))}
        proc = self.spawn(name, [sys.executable, str(Path(__file__).resolve()), "--serve", serve,
                                 "--port", str(port), "--workers", str(workers)], env)
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{port}/healthz"
        while True:
            try:
                if _http("GET", url)[0] == 200:
                    return port, proc.pid
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not come up on port {port}:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


# -- load generators ------------------------------------------------------------------------

_first_user = 10**11


def _next_users() -> int:
    """A fresh user id range per run (wrk threads add up to 1e10 each)."""
    global _first_user
    _first_user += 10**11
    return _first_user


def wrk_args(target: Target, connections: int, duration: float, threads: int) -> list[str]:
    script_args = list(target.script_args) or [target.path, str(_next_users()), target.method]
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(target.script), f"http://127.0.0.1:{target.port}",
            "--", *script_args]


def parse_wrk(stdout: str, stderr: str = "") -> Sample:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{stdout}\n{stderr}")
    data = json.loads(line[len("WRK_JSON "):])
    errors = data["errors"]
    lat = data["latency_us"]
    return Sample(data["requests"] / (data["duration_us"] / 1e6), lat["p50"] / 1000,
                  lat["p99"] / 1000, data["requests"],
                  errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
                  errors["status"])


def run_wrk(stack: Stack, target: Target, connections: int, duration: float,
            threads: int) -> Sample:
    cpus = stack.cpus("generator")
    out = subprocess.run(wrk_args(target, connections, duration, threads), capture_output=True,
                         text=True, timeout=duration + 60,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return parse_wrk(out.stdout, out.stderr)


async def _aiohttp_load(target: Target, connections: int, duration: float) -> Sample:
    import aiohttp

    url = f"http://127.0.0.1:{target.port}{target.path}"
    latencies: list[float] = []
    errors = failed = 0
    first = _next_users()
    counter = iter(range(first, first + 10**10))
    deadline = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, failed
        while time.monotonic() < deadline:
            user = next(counter)
            started = time.perf_counter()
            try:
                async with session.request(
                        target.method, url, data=b'{"quantity":1}' if target.method == "POST" else None,
                        headers={"X-User-Id": str(user), "X-Idempotency-Key": f"bench-{user}",
                                 "Content-Type": "application/json"}) as response:
                    await response.read()
                    failed += response.status >= 400
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.monotonic() - started
    return Sample(len(latencies) / elapsed, _percentile_ms(latencies, 0.50),
                  _percentile_ms(latencies, 0.99), len(latencies), errors, failed)


def _percentile_ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def run_aiohttp(stack: Stack, target: Target, connections: int, duration: float,
                threads: int) -> Sample:
    import uvloop

    return uvloop.run(_aiohttp_load(target, connections, duration))


Generator = Callable[[Stack, Target, int, float, int], Sample]


# -- the gateway's own count of answers ----------------------------------------------------

# Label values may hold braces (route="/api/seckill/{sku}"): the labels end at the last "} ".
_SAMPLE_LINE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>.*)\} (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Counts:
    codes: dict[str, int]  # answers by code, of the routes asked for
    fast_path: int  # seckill_fast_path_answers_total, all paths
    in_flight: int = 0  # seckill_in_flight_requests (this scrape is one)


def parse_counts(text: str, route_prefix: str) -> tuple[str, Counts]:
    """(the worker's pid, its counts) from one scrape of /metrics."""
    codes: dict[str, int] = {}
    fast = 0
    worker = ""
    for line in text.splitlines():
        match = _SAMPLE_LINE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        name, value = match["name"], int(float(match["value"]))
        if name == "seckill_requests_total" and labels.get("route", "").startswith(route_prefix):
            codes[labels.get("code", "?")] = codes.get(labels.get("code", "?"), 0) + value
        elif name == "seckill_fast_path_answers_total":
            fast += value
        elif name == "seckill_worker":
            worker = labels.get("pid", "")
    in_flight = re.search(r"^seckill_in_flight_requests (\S+)$", text, re.M)
    return worker, Counts(codes, fast, int(float(in_flight[1])) if in_flight else 0)


def gateway_counts(port: int, route_prefix: str, workers: int = 1) -> Counts:
    """The gateway's count of answers so far (summed over its workers: each scrape is
    answered by one of them; scrape until every worker has answered)."""
    per_worker: dict[str, Counts] = {}
    deadline = time.monotonic() + 3.0
    while True:
        _status, body = _http("GET", f"http://127.0.0.1:{port}/metrics")
        worker, counts = parse_counts(body.decode(), route_prefix)
        if counts.in_flight > 1 and time.monotonic() < deadline:
            # Requests of the previous run still in flight (wrk left; the gateway still
            # answers what it read): let them end, or they count in this run's window.
            time.sleep(0.05)
            continue
        per_worker[worker] = counts
        if len(per_worker) >= workers or time.monotonic() > deadline + 2.0:
            break
    total = Counts({}, sum(c.fast_path for c in per_worker.values()))
    for counts in per_worker.values():
        for code, n in counts.codes.items():
            total.codes[code] = total.codes.get(code, 0) + n
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a supervisor's workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


def measure(stack: Stack, target: Target, generator: Generator, connections: int,
            duration: float, threads: int, redis_pids: Sequence[int] = ()) -> Sample:
    before = gateway_counts(target.port, target.route, target.workers) if target.expect else None
    server_cpu, redis_cpu = family_cpu(target.pid), sum(map(cpu_seconds, redis_pids))
    sample = generator(stack, target, connections, duration, threads)
    if sample.requests:
        sample.server_cpu_us = (family_cpu(target.pid) - server_cpu) * 1e6 / sample.requests
        sample.redis_cpu_us = (sum(map(cpu_seconds, redis_pids)) - redis_cpu) * 1e6 \
            / sample.requests
    if before is not None and target.expect:
        after = gateway_counts(target.port, target.route, target.workers)
        sample.codes = {k: v - before.codes.get(k, 0) for k, v in after.codes.items()
                        if v - before.codes.get(k, 0)}
        sample.fast_path = after.fast_path - before.fast_path
        expected = set(target.expect.split("|"))
        sample.unexpected = sum(n for code, n in sample.codes.items() if code not in expected)
    else:
        sample.unexpected = sample.failed
    return sample


# -- the run ---------------------------------------------------------------------------------

def gateway_env(redis_url: str, mode: str) -> dict[str, str]:
    return {
        "SECKILL_REDIS_URL": redis_url, "SECKILL_REDIS_MODE": mode,
        "SECKILL_KEY_MODE": "client", "SECKILL_ADMIN_TOKEN": ADMIN_TOKEN,
        "SECKILL_KEY_PREFIX": "bench" + secrets.token_hex(4), "SECKILL_RELAY": "false",
        "SECKILL_UPSTREAM_URL": "", "SECKILL_TOKEN_SECRET": secrets.token_hex(16),
    }


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def _put_sale(base: str, sku: str, body: dict[str, Any]) -> tuple[int, bytes]:
    status, answer = _http("PUT", f"{base}/admin/sales/{sku}", body, _admin())
    return status, answer


def gateway_targets(port: int, pid: int, workers: int, paths: Sequence[str], shards: bool,
                    suffix: str, workdir: Path) -> list[Target]:
    """Create the sales the paths need on this gateway; its targets."""
    base = f"http://127.0.0.1:{port}"
    common = {"port": port, "pid": pid, "workers": workers}
    targets: list[Target] = []
    if "token" in paths:
        targets.append(Target("token" + suffix, path="/api/token", expect="OK", method="GET",
                              route="/api/token", **common))
    if "purchase" in paths or shards:
        for n in SHARD_COUNTS if shards else (16,):
            status, body = _put_sale(base, f"bench-s{n}", {"stock": BIG_STOCK, "shards": n})
            assert status == 201, body
            name = "purchase" if n == 16 else f"purchase_shards_{n}"
            targets.append(Target(name + suffix, path=f"/api/seckill/bench-s{n}", expect="OK",
                                  **common))
    if "sold_out" in paths:
        status, body = _put_sale(base, "bench-gone", {"stock": 1, "shards": 16})
        assert status == 201, body
        for user, expect in ((1, 200), (2, 410)):  # the one unit goes; then it is sold out
            status, body = _http("POST", f"{base}/api/seckill/bench-gone", {"quantity": 1},
                                 {"X-User-Id": str(user), "X-Idempotency-Key": f"setup-key-{user}"})
            assert status == expect, (status, body)
        targets.append(Target("sold_out" + suffix, path="/api/seckill/bench-gone",
                              expect="SOLD_OUT", **common))
    if "not_started" in paths:
        starts = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        status, body = _put_sale(base, "bench-later", {"stock": 1000, "shards": 16,
                                                       "starts_at": starts})
        assert status == 201, body
        status, body = _http("POST", f"{base}/api/seckill/bench-later", {"quantity": 1},
                             {"X-User-Id": "1", "X-Idempotency-Key": "setup-key-1"})
        assert status == 403 and b"SALE_NOT_STARTED" in body, (status, body)
        targets.append(Target("not_started" + suffix, path="/api/seckill/bench-later",
                              expect="SALE_NOT_STARTED", **common))
    if "queue_join" in paths or "queue_poll" in paths:
        targets += queue_targets(base, common, paths, suffix, workdir)
    return targets


def queue_targets(base: str, common: dict[str, Any], paths: Sequence[str], suffix: str,
                  workdir: Path) -> list[Target]:
    """The waiting room's join and poll, when this gateway has one (the hook for it:
    nothing is measured while ``POST /api/queue/{sku}`` is an unknown route)."""
    sku = "bench-room"
    status, _ = _put_sale(base, sku, {"stock": BIG_STOCK, "shards": 16,
                                      "waiting_room": {"admit_rate": 1}})
    if status != 201:
        return []
    joined: list[tuple[int, str]] = []
    for user in range(1, QUEUE_TICKETS + 1):
        status, body = _http("POST", f"{base}/api/queue/{sku}", None, {"X-User-Id": str(user)})
        if status == 405 or status == 404 and b'"NOT_FOUND"' in body:
            return []  # no such route: no waiting room in this gateway
        ticket = json.loads(body).get("ticket") if status == 202 else None
        if ticket:
            joined.append((user, ticket))
        if "queue_poll" not in paths:
            break
    expect = "QUEUED|ADMITTED"
    targets = []
    if "queue_join" in paths:
        targets.append(Target("queue_join" + suffix, path=f"/api/queue/{sku}", expect=expect,
                              route="/api/queue/", **common))
    if "queue_poll" in paths and joined:
        tickets = workdir / f"tickets{suffix.replace('@', '-')}.txt"
        tickets.write_text("".join(f"{user} {ticket}\n" for user, ticket in joined))
        targets.append(Target("queue_poll" + suffix, path=f"/api/queue/{sku}/", expect=expect,
                              method="GET", route="/api/queue/", script=POLL_SCRIPT,
                              script_args=(f"/api/queue/{sku}/", str(tickets)), **common))
    return targets


def build_targets(stack: Stack, redis_url: str, mode: str, args: argparse.Namespace) -> list[Target]:
    paths = args.only
    targets: list[Target] = []
    if "bare" in paths:
        port, pid = stack.server("bare", "bare", workers=args.workers)
        targets.append(Target("bare", port, pid, "/api/seckill/bench-s16", workers=args.workers))
    gateway_paths = [p for p in paths if p != "bare"]
    variants: list[tuple[str, Path]] = [("", ROOT)]
    variants += [(f"@{ref}", code_tree(ref, stack.workdir)) for ref in args.ref]
    for suffix, code in variants:
        if not gateway_paths and not args.shards:
            break
        name = "gateway" + suffix.replace("@", "-")
        port, pid = stack.server(name, "gateway", gateway_env(redis_url, mode), args.workers, code)
        targets += gateway_targets(port, pid, args.workers, gateway_paths, args.shards, suffix,
                                   stack.workdir)
    if args.unbatched:
        port, pid = stack.server("gateway-unbatched", "gateway-unbatched",
                                 gateway_env(redis_url, mode), args.workers)
        base = f"http://127.0.0.1:{port}"
        status, body = _put_sale(base, "bench-s16", {"stock": BIG_STOCK, "shards": 16})
        assert status == 201, body
        targets.append(Target("purchase_unbatched", port, pid, "/api/seckill/bench-s16", "OK",
                              workers=args.workers))
    return targets


def base_name(name: str) -> str:
    return name.split("@", 1)[0]


def summarize(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        summary[name] = {
            "rps": statistics.median(s.rps for s in runs),
            "p50_ms": statistics.median(s.p50_ms for s in runs),
            "p99_ms": statistics.median(s.p99_ms for s in runs),
            "rps_runs": [round(s.rps) for s in runs],
            "server_cpu_us": statistics.median(s.server_cpu_us for s in runs),
            "cpu_runs": [round(s.server_cpu_us, 1) for s in runs],
            "redis_cpu_us": statistics.median(s.redis_cpu_us for s in runs),
            "requests": sum(s.requests for s in runs),
            "errors": sum(s.errors for s in runs),
            "unexpected": sum(s.unexpected for s in runs),
            "fast_path_share": sum(s.fast_path for s in runs) / max(1, sum(s.requests for s in runs)),
        }
    bare = summary.get("bare")
    for row in summary.values():
        if bare is None:
            row["rps_ratio"] = row["cpu_ratio"] = row["p99_ratio"] = float("nan")
            continue
        row["rps_ratio"] = row["rps"] / bare["rps"]
        # What one server process could serve, next to the bare one, were it alone on
        # its core: the measure that the load of other processes disturbs least.
        row["cpu_ratio"] = bare["server_cpu_us"] / row["server_cpu_us"] \
            if row["server_cpu_us"] else float("nan")
        row["p99_ratio"] = row["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else float("nan")
    return summary


def goals(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    checks: dict[str, tuple[float, str, float]] = {}
    for name, goal in GOALS.items():
        if name in summary:
            checks[f"{name} req/s"] = (summary[name]["rps_ratio"], ">=", goal)
    name, most = P99_GOAL
    if name in summary:
        checks[f"{name} p99"] = (summary[name]["p99_ratio"], "<=", most)
    return {check: {"value": round(value, 3), "goal": f"{op} {goal}",
                    "met": value >= goal if op == ">=" else value <= goal}
            for check, (value, op, goal) in checks.items()}


def render(summary: dict[str, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> str:
    bare_cpu = summary.get("bare", {}).get("server_cpu_us", float("nan"))
    lines = [f"{'target':<24}{'req/s':>8}{'ratio':>7}{'goal':>6}{'p50 ms':>8}{'p99 ms':>8}"
             f"{'p99 x':>7}{'cpu us':>8}{'bare us':>8}{'cpu x':>7}{'redis us':>9}{'fast':>6}"
             f"{'errors':>7}{'wrong':>7}  runs (req/s)"]
    for name, row in summary.items():
        goal = GOALS.get(base_name(name))
        lines.append(
            f"{name:<24}{row['rps']:>8.0f}{row['rps_ratio']:>7.2f}"
            f"{(f'{goal:.2f}' if goal else ''):>6}{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}"
            f"{row['p99_ratio']:>7.2f}{row['server_cpu_us']:>8.1f}{bare_cpu:>8.1f}"
            f"{row['cpu_ratio']:>7.2f}{row['redis_cpu_us']:>9.1f}"
            f"{row['fast_path_share']:>6.0%}{row['errors']:>7}{row['unexpected']:>7}"
            f"  {row['rps_runs']}")
    by_shards = {n: summary.get("purchase" if n == 16 else f"purchase_shards_{n}")
                 for n in SHARD_COUNTS}
    if sum(1 for row in by_shards.values() if row) > 1:
        lines.append("purchase by shard count: " + ", ".join(
            f"{n}: {row['rps']:.0f}" for n, row in by_shards.items() if row))
    lines.append("ratio: req/s / bare req/s; p99 x: p99 / bare p99; cpu us: server CPU per "
                 "request (all its processes); cpu x: bare cpu us / cpu us; redis us: all "
                 "Redis servers' CPU per request; fast: answers from the fast path")
    if verdicts:
        lines.append("goals (ratios to bare): " + ", ".join(
            f"{name} {v['value']} {v['goal']} {'met' if v['met'] else 'MISSED'}"
            for name, v in verdicts.items()))
    return "\n".join(lines)


def draw(summary: dict[str, dict[str, Any]], conditions: str, path: Path) -> None:
    """Two panels: req/s as a ratio to bare (the goals marked), and CPU µs per request
    (the gateway's and Redis's, bare's as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)[::-1]  # top to bottom as in the table
    ys = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 2.2 + 0.45 * len(names)), sharey=True)
    ratios = [summary[n]["rps_ratio"] for n in names]
    colors = []
    for name, ratio in zip(names, ratios):
        goal = GOALS.get(base_name(name))
        colors.append("#888888" if goal is None else "#2a9d3a" if ratio >= goal else "#d1495b")
    left.barh(ys, ratios, color=colors)
    for y, name, ratio in zip(ys, names, ratios):
        goal = GOALS.get(base_name(name))
        if goal is not None:
            left.plot([goal, goal], [y - 0.4, y + 0.4], color="black", linewidth=2)
        left.text(max(ratio, goal or 0.0) + 0.015, y, f"{ratio:.2f}  ({summary[name]['rps']:,.0f}/s)",
                  va="center", fontsize=8)
    cpu_ratios = [summary[n]["cpu_ratio"] for n in names]
    left.scatter(cpu_ratios, list(ys), marker="D", facecolors="white", edgecolors="black", zorder=3,
                 label="CPU ratio: bare's µs per request / this one's")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    left.set_yticks(list(ys), names)
    left.set_xlim(0, max(1.25, max(ratios) + 0.3))
    left.set_xlabel("req/s, ratio to bare aiohttp (black tick: goal)")
    cpu = [summary[n]["server_cpu_us"] for n in names]
    redis = [summary[n]["redis_cpu_us"] for n in names]
    right.barh(ys, cpu, color="#3b6ea5", label="server process(es)")
    right.barh(ys, redis, left=cpu, color="#f4a259", label="Redis servers")
    bare = summary.get("bare")
    if bare:
        right.axvline(bare["server_cpu_us"], color="black", linestyle="--", linewidth=1,
                      label="bare aiohttp")
    for y, c, r in zip(ys, cpu, redis):
        right.text(c + r + 1, y, f"{c:.0f}" + (f" + {r:.0f}" if r >= 0.5 else ""), va="center",
                   fontsize=8)
    right.set_xlabel("CPU µs per request")
    right.set_xlim(0, max(c + r for c, r in zip(cpu, redis)) * 1.25)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False, ncol=3)
    fig.suptitle(conditions, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paths(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(chosen) - set(PATHS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 round, no warm-up")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes per server (bare and gateway alike)")
    parser.add_argument("--redis", choices=("cluster", "standalone"), default="cluster")
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary (cluster)")
    parser.add_argument("--only", type=_paths, default=list(PATHS),
                        help=f"comma-separated paths to measure, of: {', '.join(PATHS)}")
    parser.add_argument("--ref", action="append", default=[],
                        help="also measure the gateway of this git revision (repeatable)")
    parser.add_argument("--shards", action="store_true",
                        help="also the purchase path on sales of 1, 4 and 64 shards")
    parser.add_argument("--unbatched", action="store_true",
                        help="also a gateway without the script batcher")
    parser.add_argument("--json", type=Path, help="the figures (default: beside the PNG)")
    parser.add_argument("--png", type=Path,
                        help="the picture (default: loadtest/reports/bench[-quick].png)")
    parser.add_argument("--pin", action="store_true",
                        help="servers on CPU 0; load generator and Redis on the others")
    parser.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--serve", choices=("bare", "gateway", "gateway-unbatched"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeat = 2.0, 1
    if args.png is None:
        args.png = REPORTS / ("bench-quick.png" if args.quick else "bench.png")
    if args.json is None:
        args.json = args.png.with_suffix(".json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve == "bare":
        serve_bare(args.port, args.workers)
        return 0
    if args.serve:
        serve_gateway(args.port, args.workers, batch=args.serve == "gateway")
        return 0

    use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk"))
    generator: Generator = run_wrk if use_wrk else run_aiohttp

    from devtools.redis_cluster import LocalCluster
    from devtools.redis_server import LocalRedis

    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        stack = Stack(workdir, args.pin)
        cleanup.callback(stack.stop)
        if args.redis == "cluster":
            cluster = cleanup.enter_context(LocalCluster(primaries=3,
                                                         replicas_per_primary=args.replicas))
            redis_url, redis_pids = cluster.url, [n.pid for n in cluster.nodes if n.pid]
        else:
            server = cleanup.enter_context(LocalRedis())
            assert server.node is not None and server.node.pid is not None
            redis_url, redis_pids = server.url, [server.node.pid]
        if stack.pin:
            for pid in redis_pids:
                os.sched_setaffinity(pid, stack.cpus("redis") or set())
        targets = build_targets(stack, redis_url, args.redis, args)
        load = os.getloadavg()
        conditions = (f"wrk {args.connections} connections, {args.duration:g} s x {args.repeat}"
                      f"{'' if args.quick else ' (medians)'}, {args.workers} process(es) per "
                      f"server, Redis {args.redis}, {os.cpu_count()} CPUs, load before "
                      f"{load[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
        print(("" if use_wrk else "aiohttp generator, ") + conditions, flush=True)
        if not args.quick:
            for target in targets:  # warm-up: connections, caches, the scripts on every node
                measure(stack, target, generator, args.connections, 1.0, args.threads)
        samples: dict[str, list[Sample]] = {t.name: [] for t in targets}
        for round_no in range(args.repeat):
            shift = round_no % len(targets)
            for target in targets[shift:] + targets[:shift]:
                sample = measure(stack, target, generator, args.connections, args.duration,
                                 args.threads, redis_pids)
                samples[target.name].append(sample)
                print(f"  round {round_no + 1} {target.name:<22} {sample.rps:8.0f} req/s "
                      f"p50 {sample.p50_ms:6.2f} ms p99 {sample.p99_ms:6.2f} ms "
                      f"cpu {sample.server_cpu_us:6.1f} us"
                      f"{f'  errors {sample.errors}' if sample.errors else ''}"
                      f"{f'  wrong {sample.unexpected} {sample.codes}' if sample.unexpected else ''}",
                      flush=True)

    summary = summarize(samples)
    verdicts = goals(summary)
    table = render(summary, verdicts)
    print(table)
    settings = {"duration": args.duration, "connections": args.connections,
                "repeat": args.repeat, "threads": args.threads, "workers": args.workers,
                "generator": "wrk" if use_wrk else "aiohttp", "pinned": args.pin,
                "redis": args.redis, "replicas": args.replicas, "cpus": os.cpu_count(),
                "refs": args.ref, "conditions": conditions}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "settings": settings, "summary": summary, "goals": verdicts, "table": table,
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
    }, indent=2))
    try:
        draw(summary, conditions, args.png)
        print(f"drawn: {args.png}; figures: {args.json}")
    except ImportError:
        print("matplotlib missing (pip install -e '.[load]'): no picture", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
