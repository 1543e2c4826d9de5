"""Several worker processes: our supervisor (``serve --workers``) next to gunicorn, in one run.

    python -m loadtest.bench_workers [--workers 2] [--duration 5] [--connections 64]
                                     [--repeat 3] [--json FILE]

Needs ``wrk`` and ``gunicorn`` (``pip install gunicorn``). Starts a throw-away Redis and,
on free local ports, each with ``--workers`` processes:

- ``ours_bare`` / ``gunicorn_bare``: a trivial JSON route (a fixed body on any path),
  served by ``gateway.http.server.run`` (our supervisor, SO_REUSEPORT, ``GatewayRunner``)
  and by gunicorn's ``aiohttp.GunicornUVLoopWebWorker`` with the same runner;
- ``ours_token`` / ``gunicorn_token``: the gateway's ``/api/token`` (``seckill-gateway
  serve --workers N --no-relay``, and ``gateway.http.server:gunicorn_app``), each request
  a new user; a token needs no Redis call (``SECKILL_TOKEN_SECRET`` is set);
- ``gunicorn_shared_*``: gunicorn without ``--reuse-port`` (one socket shared by the
  workers, gunicorn's default) for both routes.

wrk drives every target in turn, ``--repeat`` interleaved rounds after a warm-up; the
medians and the ratios to our supervisor on the same route are printed. CPU per request
is the sum over the target's processes (the parent and its workers) from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devtools.processes import free_port
from loadtest.bench import BARE_BODY, Sample, Stack, Target, cpu_seconds, run_wrk

GUNICORN_WORKER = "aiohttp.GunicornUVLoopWebWorker"


@dataclass(frozen=True)
class Server:
    name: str
    route: str  # "bare" or "token": which of ours this is compared with
    path: str
    argv: list[str]
    health: str


def bare_app() -> Any:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=BARE_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def bare_gunicorn() -> Any:
    """gunicorn's factory for the bare app: the runner ``serve`` uses."""
    from gateway.http.server import make_runner

    return make_runner(bare_app())


def serve_bare(port: int, workers: int) -> int:
    from gateway.http.server import run

    return run(lambda _worker: bare_app(), "127.0.0.1", port, workers)


def servers(workers: int) -> list[Server]:
    py = sys.executable
    gunicorn = [py, "-m", "gunicorn", "--worker-class", GUNICORN_WORKER, "--workers", str(workers),
                "--graceful-timeout", "30", "--log-level", "warning"]
    out = []
    for shared in (False, True):
        prefix = "gunicorn_shared" if shared else "gunicorn"
        reuse = [] if shared else ["--reuse-port"]
        port = free_port()
        out.append(Server(f"{prefix}_bare", "bare", "/", [*gunicorn, *reuse, "--bind",
                          f"127.0.0.1:{port}", "loadtest.bench_workers:bare_gunicorn"],
                          f"http://127.0.0.1:{port}/healthz"))
        port = free_port()
        out.append(Server(f"{prefix}_token", "token", "/api/token", [*gunicorn, *reuse, "--bind",
                          f"127.0.0.1:{port}", "gateway.http.server:gunicorn_app"],
                          f"http://127.0.0.1:{port}/healthz"))
    port = free_port()
    ours = [Server("ours_bare", "bare", "/", [py, "-m", "loadtest.bench_workers", "--serve-bare",
                   "--port", str(port), "--workers", str(workers)], f"http://127.0.0.1:{port}/healthz")]
    port = free_port()
    ours.append(Server("ours_token", "token", "/api/token",
                       [py, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                        "--workers", str(workers), "--no-relay"], f"http://127.0.0.1:{port}/healthz"))
    return ours + out


def wait_healthy(url: str, workdir: Path, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} not healthy:\n{(workdir / f'{name}.log').read_text()[-2000:]}")


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return cpu_seconds(pid) + sum(cpu_seconds(int(child)) for child in children)


def measure(stack: Stack, target: Target, connections: int, duration: float) -> Sample:
    before = family_cpu(target.pid)
    sample = run_wrk(stack, target, connections, duration, threads=1)
    if sample.requests:
        sample.server_cpu_us = (family_cpu(target.pid) - before) * 1e6 / sample.requests
    return sample


def summarize(samples: dict[str, list[Sample]], routes: dict[str, str]) -> dict[str, dict[str, Any]]:
    summary = {name: {"route": routes[name], "rps": statistics.median(s.rps for s in runs),
                      "p50_ms": statistics.median(s.p50_ms for s in runs),
                      "p99_ms": statistics.median(s.p99_ms for s in runs),
                      "cpu_us": statistics.median(s.server_cpu_us for s in runs),
                      "rps_runs": [round(s.rps) for s in runs],
                      "errors": sum(s.errors + s.failed for s in runs)}
               for name, runs in samples.items()}
    for row in summary.values():
        ours = summary[f"ours_{row['route']}"]
        row["rps_ratio"] = row["rps"] / ours["rps"]
        row["cpu_ratio"] = row["cpu_us"] / ours["cpu_us"] if ours["cpu_us"] else float("nan")
    return summary


def render(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'target':<22}{'req/s':>9}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>8}"
             f"{'cpu x':>7}{'errors':>8}  runs (req/s)"]
    for name, row in sorted(summary.items(), key=lambda kv: (kv[1]["route"], kv[0])):
        lines.append(f"{name:<22}{row['rps']:>9.0f}{row['rps_ratio']:>7.3f}{row['p50_ms']:>9.2f}"
                     f"{row['p99_ms']:>9.2f}{row['cpu_us']:>8.1f}{row['cpu_ratio']:>7.3f}"
                     f"{row['errors']:>8}  {row['rps_runs']}")
    lines.append("ratio: req/s / ours on the same route; cpu us: CPU of all the target's "
                 "processes per request; cpu x: cpu us / ours")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_workers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        return serve_bare(args.port, args.workers)
    if not shutil.which("wrk"):
        print("needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2

    from devtools.redis_server import LocalRedis

    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        stack = Stack(workdir, pin=False)
        cleanup.callback(stack.stop)
        redis = cleanup.enter_context(LocalRedis())
        env = {"SECKILL_REDIS_URL": redis.url, "SECKILL_KEY_PREFIX": "bw" + secrets.token_hex(4),
               "SECKILL_TOKEN_SECRET": secrets.token_hex(16), "SECKILL_RELAY": "false",
               "SECKILL_UPSTREAM_URL": "", "PYTHONUNBUFFERED": "1"}
        targets, routes = [], {}
        for server in servers(args.workers):
            proc = stack.spawn(server.name, server.argv, env)
            wait_healthy(server.health, workdir, server.name)
            port = int(server.health.split(":")[2].split("/")[0])
            targets.append(Target(server.name, port, proc.pid, server.path))
            routes[server.name] = server.route
        print(f"wrk, {args.connections} connections, {args.duration:g} s x {args.repeat}, "
              f"{args.workers} workers per target, cpus: {os.cpu_count()}", flush=True)
        for target in targets:  # warm-up
            measure(stack, target, args.connections, 1.0)
        samples: dict[str, list[Sample]] = {t.name: [] for t in targets}
        for round_no in range(args.repeat):
            shift = round_no % len(targets)
            for target in targets[shift:] + targets[:shift]:
                sample = measure(stack, target, args.connections, args.duration)
                samples[target.name].append(sample)
                print(f"  round {round_no + 1} {target.name:<22} {sample.rps:8.0f} req/s "
                      f"p99 {sample.p99_ms:6.2f} ms cpu {sample.server_cpu_us:6.1f} us"
                      f"{f'  errors {sample.errors + sample.failed}' if sample.errors + sample.failed else ''}",
                      flush=True)

    summary = summarize(samples, routes)
    print(render(summary))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"workers": args.workers, "duration": args.duration,
                         "connections": args.connections, "repeat": args.repeat,
                         "cpus": os.cpu_count()},
            "summary": summary,
            "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
