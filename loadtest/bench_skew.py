"""Skew benchmark: purchase throughput with every buyer in one shard vs an even spread.

    python -m loadtest.bench_skew                  # defaults: ~30 s on a 2-core box
    python -m loadtest.bench_skew --json           # the same, one JSON document on stdout
    python -m loadtest.bench_skew --stock 2000 --requests 4000 --concurrency 128 --reps 5

One run starts a throw-away Redis Cluster (``devtools.redis_cluster.LocalCluster``, 3
primaries, no replicas unless ``--replicas``) and the gateway as a subprocess
(``python -m gateway serve --no-relay``, configured by ``SECKILL_*`` variables, client
key mode), like a deployment would. Then, ``--reps`` times, with the order of the two
shapes alternating from one repetition to the next, it creates a fresh sale of
``--stock`` units over 16 shards and sends ``--requests`` purchases, one per distinct
user, ``--concurrency`` in flight (an aiohttp client):

* ``one-shard``: every user id is 3 mod 16, so every purchase lands in shard 3 and all
  other shards' units must move there;
* ``even``:      consecutive user ids, the same number of buyers in every shard.

Reported per shape (medians over the repetitions): requests/s over the whole run,
latency p50/p99 of the purchases, answers by status, and the number of unit moves:
counted in Redis (every applied move leaves its id in the receiver's ``transfers-in`` set) and
read from the gateway's ``seckill_unit_moves_total`` metric (0 while the gateway does
not wire ``Rebalancer.on_move`` to ``Metrics.moves``). Each run is also checked: sold =
min(stock, requests), every unit at most once, nothing but 200 and 410 answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector

from devtools.processes import ChildProcess, free_port, http_answers
from devtools.redis_cluster import LocalCluster

SHARDS = 16
HOT_SHARD = 3
SHAPES = ("one-shard", "even")


def log(message: str) -> None:
    print(f"[bench_skew] {message}", file=sys.stderr, flush=True)



def users_for(shape: str, count: int, offset: int) -> list[int]:
    """Distinct users; ``offset`` keeps the users of each run apart (per-user limits)."""
    if shape == "one-shard":
        return [SHARDS * (offset + i) + HOT_SHARD for i in range(count)]
    return [SHARDS * offset + i for i in range(count)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class RunResult:
    shape: str
    rep: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    sold: int
    moves: int
    moves_metric: float
    problems: list[str] = field(default_factory=list)


class Gateway:
    """The gateway as a child process on a free port (``devtools.processes``: its own
    session, so its workers stop with it; always stopped, also at interpreter exit)."""

    def __init__(self, redis_url: str, redis_mode: str, workers: int, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_hex(16)
        self.prefix = f"bench{secrets.token_hex(4)}"
        env = {**os.environ,
               "SECKILL_REDIS_URL": redis_url, "SECKILL_REDIS_MODE": redis_mode,
               "SECKILL_KEY_MODE": "client", "SECKILL_ADMIN_TOKEN": self.admin_token,
               "SECKILL_KEY_PREFIX": self.prefix, "SECKILL_SHARDS": str(SHARDS)}
        env.pop("SECKILL_UPSTREAM_URL", None)
        self.child = ChildProcess(
            "gateway", [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                        "--port", str(self.port), "--workers", str(workers), "--no-relay"],
            log_dir / "gateway.log", env=env)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait for ``/healthz`` to answer 200 (NotReady, with the log's
        tail, if it exits or does not come up)."""
        self.child.start(http_answers(f"{self.url}/healthz", ok_only=True), timeout)

    def stop(self) -> None:
        self.child.stop()


async def moves_metric(session: ClientSession, gw: Gateway) -> float:
    async with session.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    match = re.search(r"^seckill_unit_moves_total\s+(\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def moves_in_redis(cluster: LocalCluster, gw: Gateway, sku: str) -> int:
    """Applied moves of the sale: one transfer id per move in its receiver's set."""
    client = cluster.cluster_client()
    try:
        return sum(client.scard(f"{{{gw.prefix}:{shard}}}:transfers-in:{sku}") for shard in range(SHARDS))
    finally:
        client.close()


async def one_run(session: ClientSession, cluster: LocalCluster, gw: Gateway, shape: str, rep: int,
                  stock: int, requests: int, concurrency: int, offset: int) -> RunResult:
    sku = f"bench-{shape}-{rep}-{secrets.token_hex(3)}"
    async with session.put(f"{gw.url}/admin/sales/{sku}", headers=gw.admin,
                           json={"stock": stock, "shards": SHARDS}) as resp:
        if resp.status != 201:
            raise RuntimeError(f"creating the sale: {resp.status} {await resp.text()}")
    metric_before = await moves_metric(session, gw)
    queue = users_for(shape, requests, offset)
    queue.reverse()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    units: list[int] = []
    url = f"{gw.url}/api/seckill/{sku}"

    async def worker() -> None:
        while queue:
            user = queue.pop()
            headers = {"X-User-Id": str(user), "X-Idempotency-Key": f"bench-{sku}-{user}"}
            started = time.perf_counter()
            async with session.post(url, headers=headers) as resp:
                body = await resp.json()
            latencies.append(time.perf_counter() - started)
            key = f"{resp.status} {body.get('code')}"
            statuses[key] = statuses.get(key, 0) + 1
            if resp.status == 200:
                units.extend(body["units"])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started

    async with session.get(f"{gw.url}/admin/sales/{sku}", headers=gw.admin) as resp:
        view = await resp.json()
    moves = await moves_in_redis(cluster, gw, sku)
    metric = await moves_metric(session, gw) - metric_before
    async with session.delete(f"{gw.url}/admin/sales/{sku}", headers=gw.admin):
        pass

    problems = []
    expected = min(stock, requests)
    if view["sold"] != expected or len(units) != expected:
        problems.append(f"sold {view['sold']} (answered 200: {len(units)}), expected {expected}")
    if len(set(units)) != len(units) or not set(units) <= set(range(1, stock + 1)):
        problems.append("a unit was given twice or out of range")
    unexpected = {k: n for k, n in statuses.items() if k not in ("200 OK", "410 SOLD_OUT")}
    if unexpected:
        problems.append(f"unexpected answers: {unexpected}")
    latencies.sort()
    return RunResult(shape, rep, requests, round(seconds, 3), round(requests / seconds, 1),
                     round(percentile(latencies, 50) * 1000, 2), round(percentile(latencies, 99) * 1000, 2),
                     statuses, view["sold"], moves, metric, problems)


def summarize(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    summary = {}
    for shape in SHAPES:
        runs = [r for r in results if r.shape == shape]
        summary[shape] = {
            "reps": len(runs),
            "rps": round(statistics.median(r.rps for r in runs), 1),
            "p50_ms": round(statistics.median(r.p50_ms for r in runs), 2),
            "p99_ms": round(statistics.median(r.p99_ms for r in runs), 2),
            "seconds": round(statistics.median(r.seconds for r in runs), 3),
            "moves": statistics.median(r.moves for r in runs),
            "moves_metric": statistics.median(r.moves_metric for r in runs),
            "rps_each": [r.rps for r in runs],
            "problems": sum(len(r.problems) for r in runs),
        }
    return summary


def print_table(summary: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    rows = [("requests/s (median)", "rps"), ("latency p50 ms", "p50_ms"), ("latency p99 ms", "p99_ms"),
            ("run seconds", "seconds"), ("unit moves (Redis)", "moves"),
            ("unit moves (metric)", "moves_metric"), ("requests/s each rep", "rps_each"),
            ("check failures", "problems")]
    print(f"stock {config['stock']}, {config['requests']} purchases a run, concurrency "
          f"{config['concurrency']}, {config['reps']} reps a shape, {SHARDS} shards, "
          f"Redis Cluster {config['primaries']} primaries, gateway workers {config['workers']}")
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  {'one-shard':>22}  {'even':>22}")
    for label, key in rows:
        a, b = (summary[shape][key] for shape in SHAPES)
        print(f"{label:<{width}}  {str(a):>22}  {str(b):>22}")
    ratio = summary["one-shard"]["rps"] / summary["even"]["rps"] if summary["even"]["rps"] else float("nan")
    print(f"one-shard / even throughput: {ratio:.2f}")
    if summary["one-shard"]["moves"] and not summary["one-shard"]["moves_metric"]:
        print("(seckill_unit_moves_total stays 0: this gateway does not wire Rebalancer.on_move "
              "to Metrics.moves; the Redis count is the true one)")


async def bench(args: argparse.Namespace, cluster: LocalCluster, gw: Gateway) -> list[RunResult]:
    connector = TCPConnector(limit=args.concurrency + 8)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=30)) as session:
        offset = 1
        # Warm-up: connections, the Lua scripts on every primary, the gateway's caches.
        await one_run(session, cluster, gw, "even", 0, args.warmup, args.warmup,
                      args.concurrency, offset)
        offset += args.requests
        results = []
        for rep in range(1, args.reps + 1):
            order = SHAPES if rep % 2 else tuple(reversed(SHAPES))
            for shape in order:
                result = await one_run(session, cluster, gw, shape, rep, args.stock, args.requests,
                                       args.concurrency, offset)
                offset += args.requests
                log(f"rep {rep} {shape:>9}: {result.rps:8.1f} req/s  p50 {result.p50_ms} ms  "
                    f"p99 {result.p99_ms} ms  moves {result.moves}  {result.statuses}"
                    + (f"  PROBLEMS {result.problems}" if result.problems else ""))
                results.append(result)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_skew", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", type=int, default=6000, help="units per sale [6000]")
    parser.add_argument("--requests", type=int, default=6000,
                        help="purchases per run, one per user [6000: demand = stock]")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight [64]")
    parser.add_argument("--reps", type=int, default=4, help="repetitions of each shape [4]")
    parser.add_argument("--warmup", type=int, default=500, help="purchases in the warm-up run [500]")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes [1]")
    parser.add_argument("--primaries", type=int, default=3, help="Redis Cluster primaries [3]")
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary [0]")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="bench-skew-"))
    log(f"starting a Redis Cluster ({args.primaries} primaries) and the gateway; logs in {log_dir}")
    with LocalCluster(primaries=args.primaries, replicas_per_primary=args.replicas) as cluster:
        gw = Gateway(cluster.url, "cluster", args.workers, log_dir)
        try:
            gw.start()
            results = asyncio.run(bench(args, cluster, gw))
        finally:
            gw.stop()
    config = {k: getattr(args, k) for k in ("stock", "requests", "concurrency", "reps", "warmup",
                                           "workers", "primaries", "replicas")}
    summary = summarize(results)
    if args.json:
        print(json.dumps({"config": config, "summary": summary,
                          "runs": [asdict(r) for r in results]}, indent=2))
    else:
        print_table(summary, config)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
