"""CPU µs per request of the gateway's HTTP layer, in process: no sockets, no load generator.

    python -m loadtest.bench_inprocess [--requests 50000] [--repeat 5] [--ref REV ...]

What ``loadtest.bench`` measures over the network moves with everything else on the
machine (a loaded machine also raises the CPU per request: fewer requests per loop
wake-up). This measures only what runs in the server process between the HTTP parser
and the socket write: routing, the middleware, the handler and building the response
object, by calling ``app._handle(request)`` on ready-made requests in a loop and reading
the process's CPU time. It is the figure to compare changes of the HTTP layer with;
``--ref REV`` runs the same on the ``gateway/`` package of another revision, in turns
with this checkout's (each in a process of its own), medians of ``--repeat`` turns.

Paths: ``bare`` (aiohttp, a handler returning a fixed body; the floor), ``guard`` (the
gateway's app with a trivial route added: the middleware's own cost), ``token`` (``GET
/api/token``), ``not_started`` (``POST /api/seckill/{sku}`` on a sale starting in an
hour: the whole refusal, no Redis call), ``not_found`` (an unknown path). The purchase
and sold-out paths wait on Redis and are left to ``loadtest.bench``. Needs a Redis only
for the gateway to start (one is started).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("bare", "guard", "token", "not_started", "not_found")


class _Transport:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def is_closing(self) -> bool:
        return False


class _Protocol:
    """What a Request asks of its connection, without mocks (a Mock costs more than
    the code measured)."""

    _reading_paused = False
    max_field_size = max_line_length = 8190
    max_headers = 128
    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8080)

    def __init__(self) -> None:
        self.transport = _Transport()
        self.writer = None

    def pause_reading(self, **_: Any) -> None:
        pass

    def resume_reading(self, **_: Any) -> None:
        pass


async def measure(redis_url: str, requests: int) -> dict[str, float]:
    """CPU µs per request of each path (run in the process whose code is measured)."""
    import asyncio
    import gc
    import secrets
    import time

    from aiohttp import web
    from aiohttp.http_parser import HttpVersion, RawRequestMessage
    from aiohttp.streams import StreamReader
    from aiohttp.web_request import Request
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from gateway.app import create_app
    from gateway.clock import now_ms
    from gateway.config import Settings
    from gateway.http.context import GATEWAY
    from gateway.models import Sale

    loop = asyncio.get_running_loop()
    protocol = _Protocol()
    body = (b'{"code":"OK","order_no":"7-0123456789abcdef0123456789abcdef","sku":"bench",'
            b'"user_id":1,"units":[1]}')

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    bare = web.Application()
    bare.router.add_route("*", "/{tail:.*}", answer)
    settings = Settings(redis_url=redis_url, key_mode="client", admin_token="bench", relay=False,
                        token_secret="s" * 32, key_prefix="inproc" + secrets.token_hex(4))
    app = create_app(settings)
    app.router.add_route("GET", "/bench-trivial", answer)
    for application in (bare, app):
        application.freeze()
    gw = app[GATEWAY]
    await gw.create_sale(Sale("bench-later", 100, shards=16, starts_at=now_ms() + 3_600_000))

    def request(method: str, path: str, headers: dict[str, str], data: bytes) -> Request:
        payload = StreamReader(protocol, 2**16, loop=loop)  # type: ignore[arg-type]
        if data:
            payload.feed_data(data)
        payload.feed_eof()
        message = RawRequestMessage(method, path, HttpVersion(1, 1),
                                    CIMultiDictProxy(CIMultiDict(headers)), (), False, None, False,
                                    False, URL(path))
        return Request(message, payload, protocol, None, None, loop,  # type: ignore[arg-type]
                       client_max_size=settings.max_body_bytes)

    purchase = {"X-Idempotency-Key": "bench-0123456789", "Content-Type": "application/json"}
    cases = {
        "bare": (bare, "POST", "/api/seckill/bench-later", purchase, b'{"quantity":1}'),
        "guard": (app, "GET", "/bench-trivial", {}, b""),
        "token": (app, "GET", "/api/token", {}, b""),
        "not_started": (app, "POST", "/api/seckill/bench-later", purchase, b'{"quantity":1}'),
        "not_found": (app, "GET", "/no/such/path", {}, b""),
    }
    made: dict[str, float] = {}
    result: dict[str, float] = {}
    for name, (application, method, path, headers, data) in cases.items():
        async def one(user: int) -> int:
            req = request(method, path, {**headers, "X-User-Id": str(user)}, data)  # noqa: B023
            return (await application._handle(req)).status  # noqa: B023

        for user in range(500):  # warm-up: caches, the sale in memory
            await one(user)
        gc.collect()
        started = time.process_time()
        for user in range(10**9, 10**9 + requests):
            await one(user)
        spent = time.process_time() - started
        # Making the requests is not the server's work (the parser does it): subtract it.
        started = time.process_time()
        for user in range(requests):
            request(method, path, {**headers, "X-User-Id": str(user)}, data)
        made[name] = time.process_time() - started
        result[name] = (spent - made[name]) * 1e6 / requests
    await gw.close()
    return result


def child(redis_url: str, requests: int) -> None:
    import uvloop

    print(json.dumps(uvloop.run(measure(redis_url, requests))), flush=True)


def run_in(code: Path, redis_url: str, requests: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys((str(code), str(ROOT))))}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", redis_url,
                          "--requests", str(requests)], env=env, capture_output=True, text=True,
                         check=False, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_inprocess",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="per path and turn")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ref", action="append", default=[],
                        help="also the gateway of this git revision (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.requests)
        return 0

    from devtools.redis_server import LocalRedis
    from loadtest.bench import code_tree

    workdir = Path(tempfile.mkdtemp(prefix="bench-inprocess-"))
    versions = {"this checkout": ROOT}
    for ref in args.ref:
        versions[f"@{ref}"] = code_tree(ref, workdir)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    with LocalRedis() as redis_server:
        for turn in range(args.repeat):
            for name, code in versions.items():
                runs[name].append(run_in(code, redis_server.url, args.requests))
                print(f"  turn {turn + 1} {name:<16} " + "  ".join(
                    f"{p} {runs[name][-1][p]:5.2f}" for p in PATHS), flush=True)
    print(f"\nCPU µs per request in process (medians of {args.repeat}; "
          f"{args.requests:,} requests per path and turn; load {os.getloadavg()[0]:.2f})")
    print(f"{'path':<14}" + "".join(f"{name:>16}" for name in versions))
    for path in PATHS:
        print(f"{path:<14}" + "".join(
            f"{statistics.median(r[path] for r in runs[name]):>16.2f}" for name in versions))
    bare = {name: statistics.median(r["bare"] for r in runs[name]) for name in versions}
    print("more than bare:")
    for path in PATHS[1:]:
        print(f"  {path:<12}" + "".join(
            f"{statistics.median(r[path] for r in runs[name]) - bare[name]:>+16.2f}"
            for name in versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
