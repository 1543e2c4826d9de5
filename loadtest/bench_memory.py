"""Redis bytes per admitted purchase and per recorded outcome; the memory of a sold-out storm.

    python -m loadtest.bench_memory [--buy-seconds 3] [--storm-requests 1000000]
                                    [--storm-budget 180] [--chunk 10] [--json FILE]

Starts a throw-away standalone Redis and the gateway (one process,
``SECKILL_KEY_MODE=client``, no relay, ``SECKILL_IDEMPOTENCY_TTL`` as in the
environment, default 300), then:

1. **Per admitted purchase.** wrk buys on a 16-shard sale for ``--buy-seconds``. What
   one purchase writes, by ``MEMORY USAGE ... SAMPLES 0`` (exact): the idempotency
   record and the order record (the mean over a sample of those keys), and the growth
   of the shards' purchase streams, buyers hashes and order indexes divided by the
   purchases; beside it the growth of ``used_memory`` per purchase, which counts
   everything (the keyspace's and the expiry table's own entries too).
2. **Per recorded SOLD_OUT outcome, and a sold-out storm.** wrk sends purchases to a
   sale that is sold out, in chunks of ``--chunk`` seconds, until
   ``--storm-requests`` answers or ``--storm-budget`` seconds. After each chunk: the
   answers so far, Redis ``used_memory`` and the gateway's RSS. The bytes per recorded
   outcome are the growth of ``used_memory`` over the outcomes recorded (SOLD_OUT
   answers less those the gateway answered from its fast path, read from
   ``seckill_fast_path_answers_total`` when the gateway has it: with the fast path,
   sold-out answers are not recorded). If the budget ends the storm first, the
   figures for the full count are extrapolated linearly from the measured growth,
   and the output says so.

Every record lives for ``SECKILL_IDEMPOTENCY_TTL``; a storm longer than that would reach
a steady state instead of growing (the storm here is shorter than 300 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from loadtest.bench import (
    ADMIN_TOKEN,
    REPORTS,
    Stack,
    Target,
    _http,
    _put_sale,
    gateway_counts,
    gateway_env,
    parse_wrk,
    wrk_args,
)

BIG_STOCK = 10_000_000
KEY_SAMPLE = 500


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def sample_keys(client: redis.Redis, pattern: str, count: int = KEY_SAMPLE) -> list[str]:
    found: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        found.append(key)
        if len(found) >= count:
            break
    return found


def run_wrk(target: Target, seconds: float, connections: int) -> dict[str, Any]:
    out = subprocess.run(wrk_args(target, connections, seconds, 1), capture_output=True, text=True,
                         timeout=seconds + 60)
    sample = parse_wrk(out.stdout, out.stderr)
    return {"requests": sample.requests, "rps": sample.rps, "errors": sample.errors}


def per_purchase(client: redis.Redis, prefix: str, base: str, target: Target, seconds: float,
                 connections: int) -> dict[str, Any]:
    from gateway.store.keys import KeySpace

    keys = KeySpace(prefix)
    shards = [keys.shard(target.path.rsplit("/", 1)[1], s) for s in range(16)]
    groups = {"stream": [k.stream for k in shards], "buyers": [k.buyers for k in shards],
              "order_index": [k.order_index for k in shards]}
    def sold_so_far() -> int:
        status, body = _http("GET", f"{base}/admin/sales/{target.path.rsplit('/', 1)[1]}",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200, body
        return int(json.loads(body)["sold"])

    before = {name: sum(usage(client, k) for k in names) for name, names in groups.items()}
    sold_before = sold_so_far()
    memory_before = used_memory(client)
    load = run_wrk(target, seconds, connections)
    sold = sold_so_far() - sold_before
    grown = used_memory(client) - memory_before
    after = {name: sum(usage(client, k) for k in names) for name, names in groups.items()}
    idem = sample_keys(client, f"{{{prefix}:*}}:idem:*")
    orders = sample_keys(client, f"{{{prefix}:*}}:order:*")
    figures = {
        "purchases": sold, "rps": round(load["rps"]),
        "idempotency_record": statistics.mean(usage(client, k) for k in idem),
        "order_record": statistics.mean(usage(client, k) for k in orders),
        "stream_entry": (after["stream"] - before["stream"]) / sold,
        "buyers_fields": (after["buyers"] - before["buyers"]) / sold,
        "order_index_member": (after["order_index"] - before["order_index"]) / sold,
        "used_memory_per_purchase": grown / sold,
        "idem_ttl_s": client.ttl(idem[0]) if idem else None,
    }
    figures["sum_of_keys"] = sum(figures[k] for k in ("idempotency_record", "order_record",
                                                     "stream_entry", "buyers_fields",
                                                     "order_index_member"))
    return figures


def storm(client: redis.Redis, prefix: str, target: Target, gateway_pid: int, total: int,
          budget: float, chunk: float, connections: int) -> dict[str, Any]:
    memory_before = used_memory(client)
    counts_before = gateway_counts(target.port, target.route)
    rss_before, hwm_before = rss_kb(gateway_pid)
    steps: list[dict[str, Any]] = []
    requests, started = 0, time.monotonic()
    peak_rss = rss_before
    while requests < total and time.monotonic() - started < budget:
        left = budget - (time.monotonic() - started)
        load = run_wrk(target, max(1.0, min(chunk, left)), connections)
        requests += load["requests"]
        rss, _ = rss_kb(gateway_pid)
        peak_rss = max(peak_rss, rss)
        steps.append({"requests": requests, "rps": round(load["rps"]),
                      "used_memory": used_memory(client) - memory_before, "rss_kb": rss})
        print(f"  storm: {requests:>9,} answers, Redis +{steps[-1]['used_memory'] / 2**20:7.1f} MiB, "
              f"gateway RSS {rss / 1024:6.1f} MiB", flush=True)
    counts = gateway_counts(target.port, target.route)
    sold_out = counts.codes.get("SOLD_OUT", 0) - counts_before.codes.get("SOLD_OUT", 0)
    fast = counts.fast_path - counts_before.fast_path
    recorded = sold_out - fast
    grown = used_memory(client) - memory_before
    idem = [k for k in sample_keys(client, f"{{{prefix}:*}}:idem:*", 4 * KEY_SAMPLE)
            if client.hget(k, "outcome") == "SOLD_OUT"][:KEY_SAMPLE]
    rss_after, hwm_after = rss_kb(gateway_pid)
    per_outcome = grown / recorded if recorded > 0 else 0.0
    scale = total / requests if requests else 0.0
    info = client.info("memory")
    return {
        "requests": requests, "seconds": round(time.monotonic() - started, 1),
        "sold_out_answers": sold_out, "fast_path_answers": fast, "recorded": recorded,
        "other_answers": {k: v - counts_before.codes.get(k, 0) for k, v in counts.codes.items()
                          if k != "SOLD_OUT" and v - counts_before.codes.get(k, 0)},
        "used_memory_growth": grown, "bytes_per_recorded_outcome": per_outcome,
        "idempotency_record_sample": statistics.mean(usage(client, k) for k in idem) if idem else 0,
        "redis_used_memory_peak": int(info["used_memory_peak"]),
        "redis_fragmentation": float(info.get("mem_fragmentation_ratio", 0)),
        "gateway_rss_before_kb": rss_before, "gateway_rss_after_kb": rss_after,
        "gateway_rss_peak_sampled_kb": peak_rss, "gateway_vmhwm_kb": hwm_after,
        "gateway_vmhwm_before_kb": hwm_before,
        "extrapolated": requests < total, "target_requests": total,
        "used_memory_growth_at_target": grown * scale,
        "steps": steps,
    }


def render(buy: dict[str, Any], storm_: dict[str, Any], ttl: int) -> str:
    lines = [
        f"per admitted purchase ({buy['purchases']:,} purchases at {buy['rps']:,}/s), bytes:",
        f"  idempotency record (hash, TTL {buy['idem_ttl_s']} s)  {buy['idempotency_record']:8.0f}",
        f"  order record (hash, no TTL)                {buy['order_record']:8.0f}",
        f"  purchase stream entry (until delivered)    {buy['stream_entry']:8.0f}",
        f"  buyers fields (user -> units, user:o)      {buy['buyers_fields']:8.0f}",
        f"  order index member (set)                   {buy['order_index_member']:8.0f}",
        f"  sum of the keys                            {buy['sum_of_keys']:8.0f}",
        f"  used_memory growth per purchase            {buy['used_memory_per_purchase']:8.0f}",
        "",
        f"sold-out storm: {storm_['requests']:,} answers in {storm_['seconds']} s "
        f"({storm_['sold_out_answers']:,} SOLD_OUT, {storm_['fast_path_answers']:,} of them from "
        f"the fast path, {storm_['recorded']:,} recorded)",
        f"  Redis used_memory growth                   {storm_['used_memory_growth'] / 2**20:8.1f} MiB",
        f"  per recorded SOLD_OUT outcome              {storm_['bytes_per_recorded_outcome']:8.0f} B"
        f" (one idempotency record by MEMORY USAGE: {storm_['idempotency_record_sample']:.0f} B)",
        f"  gateway RSS before / after / peak sampled  {storm_['gateway_rss_before_kb'] / 1024:.1f} / "
        f"{storm_['gateway_rss_after_kb'] / 1024:.1f} / {storm_['gateway_rss_peak_sampled_kb'] / 1024:.1f}"
        f" MiB (VmHWM {storm_['gateway_vmhwm_kb'] / 1024:.1f} MiB)",
    ]
    if storm_["extrapolated"]:
        lines.append(
            f"  EXTRAPOLATED to {storm_['target_requests']:,} answers (linear in the measured "
            f"growth; not run): Redis +{storm_['used_memory_growth_at_target'] / 2**20:.1f} MiB")
    rate_bytes = storm_["bytes_per_recorded_outcome"]
    lines += ["", f"sizing: recorded outcomes per second x {ttl} s x {rate_bytes:.0f} B, e.g. "
              + ", ".join(f"{rate:,}/s -> {rate * ttl * rate_bytes / 2**30:.1f} GiB"
                          for rate in (10_000, 50_000, 100_000))]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_memory",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--buy-seconds", type=float, default=3.0)
    parser.add_argument("--storm-requests", type=int, default=1_000_000)
    parser.add_argument("--storm-budget", type=float, default=180.0,
                        help="seconds the storm may take at most")
    parser.add_argument("--chunk", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", type=Path, default=REPORTS / "memory.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        parser.error("needs wrk")

    from devtools.redis_server import LocalRedis

    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        stack = Stack(workdir)
        cleanup.callback(stack.stop)
        server = cleanup.enter_context(LocalRedis())
        env = gateway_env(server.url, "standalone")
        port, pid = stack.server("gateway", "gateway", env)
        base = f"http://127.0.0.1:{port}"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        cleanup.callback(client.close)
        ttl = int(os.environ.get("SECKILL_IDEMPOTENCY_TTL", "300"))
        print(f"standalone Redis {client.info('server')['redis_version']}, gateway pid {pid}, "
              f"TTL {ttl} s, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)

        status, body = _put_sale(base, "mem-buy", {"stock": BIG_STOCK, "shards": 16})
        assert status == 201, body
        buy_target = Target("purchase", port, pid, "/api/seckill/mem-buy", "OK")
        run_wrk(buy_target, 1.0, args.connections)  # warm-up: scripts loaded, streams made
        buy = per_purchase(client, env["SECKILL_KEY_PREFIX"], base, buy_target, args.buy_seconds,
                           args.connections)

        status, body = _put_sale(base, "mem-gone", {"stock": 1, "shards": 16})
        assert status == 201, body
        for user, expect in ((1, 200), (2, 410)):
            status, body = _http("POST", f"{base}/api/seckill/mem-gone", {"quantity": 1},
                                 {"X-User-Id": str(user), "X-Idempotency-Key": f"setup-key-{user}"})
            assert status == expect, (status, body)
        gone = Target("sold_out", port, pid, "/api/seckill/mem-gone", "SOLD_OUT")
        result = storm(client, env["SECKILL_KEY_PREFIX"], gone, pid, args.storm_requests,
                       args.storm_budget, args.chunk, args.connections)

    print(render(buy, result, ttl))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"per_purchase": buy, "storm": result, "ttl": ttl}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
