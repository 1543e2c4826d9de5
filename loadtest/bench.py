"""Throughput of the gateway's hot paths next to a bare aiohttp endpoint, in one run.

    python -m loadtest.bench [--duration 5] [--connections 64] [--repeat 3] [--quick]
                             [--json FILE] [--threads 1] [--generator auto|wrk|aiohttp]
                             [--replicas 0] [--no-unbatched] [--pin]

Starts, on free local ports: a throw-away Redis Cluster (``LocalCluster``, 3 primaries,
no replicas unless ``--replicas``), a bare aiohttp+uvloop endpoint answering a fixed
JSON body, and the gateway (one process, ``SECKILL_KEY_MODE=client``, no relay) with the
script batcher, and (unless ``--no-unbatched``) a second gateway without it. Then it
drives every target with the same load generator, interleaved, ``--repeat`` times:

- ``bare``: the bare endpoint, the ceiling of one Python process on this machine;
- ``purchase``: ``POST /api/seckill/{sku}`` on a sale too big to sell out (16 shards),
  each request a new user and a new idempotency key: every answer is a 200 admission;
- ``sold_out``: the same on a sale of stock 1, already sold out: every answer a 410
  (one script call still runs: the key's outcome must be checked and recorded);
- ``purchase_shards_N``: the purchase path on sales of 1, 4 and 64 shards;
- ``purchase_unbatched``: the purchase path, one EVALSHA round trip per request.

The load generator is wrk with ``loadtest/wrk/seckill.lua`` (unique ``X-User-Id`` and
``X-Idempotency-Key`` per request), or an aiohttp client when wrk is missing (slower:
it shares the CPU with the servers and saturates first, so its req/s ratios say little).
Medians over the repetitions are reported with ratios to the bare endpoint; the
gateway's own counters check that every answer was the expected one (``wrong``).

Besides req/s and latency, each run reads the CPU time the server process (and the
Redis servers) spent per request from /proc: ``cpu x`` (bare CPU per request / this
target's) is what one gateway process can serve next to the bare one with a core to
itself. On a 2-core machine shared with Redis, wrk and anything else running, it is the
figure that noise moves least. Everything started is stopped at the end.
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
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.processes import free_port

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "seckill.lua"
BARE_BODY = (b'{"code":"OK","order_no":"7-0123456789abcdef0123456789abcdef","sku":"bench",'
             b'"user_id":1,"units":[1]}')
BIG_STOCK = 10_000_000
SHARD_COUNTS = (1, 4, 16, 64)
# Goals, as ratios to the bare endpoint measured in the same run.
GOALS = {"purchase_rps": 0.6, "sold_out_rps": 0.85, "purchase_p99_max": 3.0}
ADMIN_TOKEN = "bench-" + secrets.token_hex(8)


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # the server process, for its CPU time
    path: str
    expect: str | None = None  # the gateway code every answer must carry


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
    server_cpu_us: float = 0.0  # CPU time of the server process per request
    redis_cpu_us: float = 0.0  # CPU time of all Redis servers per request


# -- the servers under test (run as subprocesses of this module) --------------------------

def serve_bare(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=BARE_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


def serve_gateway(port: int, batch: bool) -> None:
    """The gateway app, as ``seckill-gateway serve`` runs it, with the script batcher
    attached when the app did not make one itself (or removed, for the comparison)."""
    import uvloop

    from gateway.app import create_app
    from gateway.config import load_settings
    from gateway.http.context import GATEWAY
    from gateway.http.server import serve_app
    from gateway.logs import setup_logging
    from gateway.store.transport import make_batcher

    setup_logging("WARNING")
    settings = load_settings()
    app = create_app(settings)
    store = app[GATEWAY].store
    if batch and store.batcher is None:
        batcher = make_batcher(store.client, settings, on_batch=app[GATEWAY].metrics.batch_size.observe)
        store.batcher = batcher

        async def close_batcher(_app: Any) -> None:
            if batcher is not None:
                await batcher.aclose()

        app.on_cleanup.append(close_batcher)
    elif not batch:
        store.batcher = None
    uvloop.run(serve_app(app, "127.0.0.1", port))


# -- the stack ------------------------------------------------------------------------------


def _http(method: str, url: str, body: dict | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Stack:
    """The processes under test. Stops only what it started."""

    def __init__(self, workdir: Path, pin: bool) -> None:
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

    def server(self, name: str, serve: str, env: dict[str, str] | None = None) -> tuple[int, int]:
        """Start a server under test; its port and pid once it answers."""
        port = free_port()
        proc = self.spawn(name, [sys.executable, str(Path(__file__).resolve()), "--serve", serve,
                                 "--port", str(port)], env)
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{port}/healthz"
        while True:
            try:
                if _http("GET", url)[0] == 200:
                    return port, proc.pid
            except OSError:
                pass
            if time.monotonic() > deadline:
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


def run_wrk(stack: Stack, target: Target, connections: int, duration: float,
            threads: int) -> Sample:
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{target.port}",
            "--", target.path, str(_next_users())]
    cpus = stack.cpus("generator")
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len("WRK_JSON "):])
    errors = data["errors"]
    lat = data["latency_us"]
    return Sample(data["requests"] / (data["duration_us"] / 1e6), lat["p50"] / 1000,
                  lat["p99"] / 1000, data["requests"],
                  errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
                  errors["status"])


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
                async with session.post(url, data=b'{"quantity":1}', headers={
                        "X-User-Id": str(user), "X-Idempotency-Key": f"bench-{user}",
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


# -- the gateway's own count of answers ----------------------------------------------------

_REQUESTS_LINE = re.compile(r'^seckill_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def gateway_codes(port: int) -> dict[str, int]:
    """Answers of the seckill route so far, by code (from /metrics)."""
    status, body = _http("GET", f"http://127.0.0.1:{port}/metrics")
    counts: dict[str, int] = {}
    for line in body.decode().splitlines():
        match = _REQUESTS_LINE.match(line)
        if match and 'route="/api/seckill/{sku}"' in match["labels"]:
            code = re.search(r'code="([^"]*)"', match["labels"])
            counts[code.group(1) if code else "?"] = int(float(match["value"]))
    return counts


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stack: Stack, target: Target, generator: Any, connections: int,
            duration: float, threads: int, redis_pids: Sequence[int] = ()) -> Sample:
    before = gateway_codes(target.port) if target.expect else {}
    server_cpu, redis_cpu = cpu_seconds(target.pid), sum(map(cpu_seconds, redis_pids))
    sample = generator(stack, target, connections, duration, threads)
    if sample.requests:
        sample.server_cpu_us = (cpu_seconds(target.pid) - server_cpu) * 1e6 / sample.requests
        sample.redis_cpu_us = (sum(map(cpu_seconds, redis_pids)) - redis_cpu) * 1e6 \
            / sample.requests
    if target.expect:
        sample.codes = _delta(gateway_codes(target.port), before)
        sample.unexpected = sum(n for code, n in sample.codes.items() if code != target.expect)
    else:
        sample.unexpected = sample.failed
    return sample


# -- the run ---------------------------------------------------------------------------------

def build_targets(stack: Stack, cluster_url: str, unbatched: bool) -> list[Target]:
    env = {
        "SECKILL_REDIS_URL": cluster_url, "SECKILL_REDIS_MODE": "cluster",
        "SECKILL_KEY_MODE": "client", "SECKILL_ADMIN_TOKEN": ADMIN_TOKEN,
        "SECKILL_KEY_PREFIX": "bench" + secrets.token_hex(4), "SECKILL_RELAY": "false",
        "SECKILL_UPSTREAM_URL": "",
    }
    bare, bare_pid = stack.server("bare", "bare")
    gateway, gateway_pid = stack.server("gateway", "gateway", env)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{gateway}"
    for shards in SHARD_COUNTS:
        status, body = _http("PUT", f"{base}/admin/sales/bench-s{shards}",
                             {"stock": BIG_STOCK, "shards": shards}, admin)
        assert status == 201, body
    status, body = _http("PUT", f"{base}/admin/sales/bench-gone", {"stock": 1, "shards": 16}, admin)
    assert status == 201, body
    for user, expect in ((1, 200), (2, 410)):  # the one unit goes; then it is sold out
        status, body = _http("POST", f"{base}/api/seckill/bench-gone", {"quantity": 1},
                             {"X-User-Id": str(user), "X-Idempotency-Key": f"setup-key-{user}"})
        assert status == expect, (status, body)

    targets = [
        Target("bare", bare, bare_pid, "/api/seckill/bench-s16"),
        Target("purchase", gateway, gateway_pid, "/api/seckill/bench-s16", "OK"),
        Target("sold_out", gateway, gateway_pid, "/api/seckill/bench-gone", "SOLD_OUT"),
    ]
    targets += [Target(f"purchase_shards_{n}", gateway, gateway_pid, f"/api/seckill/bench-s{n}",
                       "OK") for n in SHARD_COUNTS if n != 16]
    if unbatched:
        plain, plain_pid = stack.server("gateway-unbatched", "gateway-unbatched", env)
        targets.append(Target("purchase_unbatched", plain, plain_pid, "/api/seckill/bench-s16",
                              "OK"))
    return targets


def summarize(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        summary[name] = {
            "rps": statistics.median(s.rps for s in runs),
            "p50_ms": statistics.median(s.p50_ms for s in runs),
            "p99_ms": statistics.median(s.p99_ms for s in runs),
            "rps_runs": [round(s.rps) for s in runs],
            "server_cpu_us": statistics.median(s.server_cpu_us for s in runs),
            "redis_cpu_us": statistics.median(s.redis_cpu_us for s in runs),
            "requests": sum(s.requests for s in runs),
            "errors": sum(s.errors for s in runs),
            "unexpected": sum(s.unexpected for s in runs),
        }
    bare = summary["bare"]
    for row in summary.values():
        row["rps_ratio"] = row["rps"] / bare["rps"]
        # What one server process could serve, next to the bare one, were it alone on
        # its core: the measure that the load of other processes disturbs least.
        row["cpu_ratio"] = bare["server_cpu_us"] / row["server_cpu_us"] \
            if row["server_cpu_us"] else float("nan")
        row["p99_ratio"] = row["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else float("nan")
    return summary


def goals(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    checks = {
        "purchase_rps": (summary["purchase"]["rps_ratio"], ">=", GOALS["purchase_rps"]),
        "sold_out_rps": (summary["sold_out"]["rps_ratio"], ">=", GOALS["sold_out_rps"]),
        "purchase_p99": (summary["purchase"]["p99_ratio"], "<=", GOALS["purchase_p99_max"]),
    }
    return {name: {"value": round(value, 3), "goal": f"{op} {goal}",
                   "met": value >= goal if op == ">=" else value <= goal}
            for name, (value, op, goal) in checks.items()}


def render(summary: dict[str, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'target':<22}{'req/s':>9}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}{'p99 x':>7}"
             f"{'cpu us':>8}{'cpu x':>7}{'redis us':>9}{'errors':>8}{'wrong':>7}  runs (req/s)"]
    for name, row in summary.items():
        lines.append(f"{name:<22}{row['rps']:>9.0f}{row['rps_ratio']:>7.2f}{row['p50_ms']:>9.2f}"
                     f"{row['p99_ms']:>9.2f}{row['p99_ratio']:>7.2f}{row['server_cpu_us']:>8.1f}"
                     f"{row['cpu_ratio']:>7.2f}{row['redis_cpu_us']:>9.1f}{row['errors']:>8}"
                     f"{row['unexpected']:>7}  {row['rps_runs']}")
    by_shards = {n: summary.get("purchase" if n == 16 else f"purchase_shards_{n}")
                 for n in SHARD_COUNTS}
    lines.append("purchase by shard count: " + ", ".join(
        f"{n}: {row['rps']:.0f}" for n, row in by_shards.items() if row))
    lines.append("ratio: req/s / bare req/s; p99 x: p99 / bare p99; cpu us: server CPU per "
                 "request; cpu x: bare cpu us / cpu us; redis us: all Redis servers' CPU per "
                 "request")
    lines.append("goals (ratios to bare): " + ", ".join(
        f"{name} {v['value']} {v['goal']} {'met' if v['met'] else 'MISSED'}"
        for name, v in verdicts.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 round, no warm-up")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary")
    parser.add_argument("--no-unbatched", action="store_true",
                        help="skip the gateway without the script batcher")
    parser.add_argument("--pin", action="store_true",
                        help="servers on CPU 0; load generator and Redis on the others")
    parser.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--serve", choices=("bare", "gateway", "gateway-unbatched"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve == "bare":
        serve_bare(args.port)
        return 0
    if args.serve:
        serve_gateway(args.port, batch=args.serve == "gateway")
        return 0

    if args.quick:
        args.duration, args.repeat = 2.0, 1
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk"))
    generator = run_wrk if use_wrk else run_aiohttp

    from devtools.redis_cluster import LocalCluster

    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        stack = Stack(workdir, args.pin)
        cleanup.callback(stack.stop)
        cluster = cleanup.enter_context(LocalCluster(primaries=3,
                                                     replicas_per_primary=args.replicas))
        if stack.pin:
            for node in cluster.nodes:
                os.sched_setaffinity(node.pid, stack.cpus("redis"))
        targets = build_targets(stack, cluster.url, not args.no_unbatched)
        redis_pids = [node.pid for node in cluster.nodes if node.pid is not None]
        print(f"generator: {'wrk' if use_wrk else 'aiohttp'}, {args.connections} connections, "
              f"{args.duration:g} s x {args.repeat}, cpus: {os.cpu_count()}, "
              f"pinned: {stack.pin}", flush=True)
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
                print(f"  round {round_no + 1} {target.name:<20} {sample.rps:8.0f} req/s "
                      f"p50 {sample.p50_ms:6.2f} ms p99 {sample.p99_ms:6.2f} ms"
                      f"{f'  errors {sample.errors}' if sample.errors else ''}"
                      f"{f'  wrong {sample.unexpected}' if sample.unexpected else ''}",
                      flush=True)

    summary = summarize(samples)
    verdicts = goals(summary)
    print(render(summary, verdicts))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"duration": args.duration, "connections": args.connections,
                         "repeat": args.repeat, "threads": args.threads,
                         "generator": "wrk" if use_wrk else "aiohttp", "pinned": args.pin,
                         "replicas": args.replicas, "cpus": os.cpu_count()},
            "summary": summary, "goals": verdicts,
            "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
