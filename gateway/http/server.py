"""Running the gateway: one process on uvloop, several sharing one port under our
supervisor (``serve --workers N``, see ``supervisor.py``), or under gunicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.config import Settings, load_settings
from gateway.http.context import GATEWAY
from gateway.http.errors import HTTP_CODES, json_response
from gateway.http.supervisor import Supervisor, WorkerInfo
from gateway.logs import LogThrottle

log = logging.getLogger("gateway.server")

AppFactory = Callable[[], Awaitable[web.Application] | web.Application]

# aiohttp's HTTP parser limits (its defaults, stated here): a longer request line or
# header, or more headers, is refused by the parser before any handler runs.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128

_client_errors = LogThrottle(every=10.0)


def _parser_problem(exc: BaseException | None) -> str:
    """What was wrong with a request the parser refused, without echoing any of it
    (aiohttp's own text quotes the offending bytes: a header with a secret in it)."""
    if isinstance(exc, LineTooLong):
        return "the request line or a header is too long"
    if isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc.message):
        return f"more than {MAX_HEADERS} headers"
    return "malformed HTTP request"


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection protocol, answering the errors it produces itself (the HTTP
    parser refusing a request: bad bytes, too long a line, too many headers; a handler
    failing outside the app's middleware) in JSON with a ``code``, like every other
    answer of the gateway, and without a traceback or the request's bytes; and logging
    a client's malformed request as a throttled warning, not a traceback per request."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("response already sent, cannot send an error answer")
        if status >= 500:
            self.logger.error("error handling request", exc_info=exc)
            body = {"code": "INTERNAL" if status == 500 else HTTP_CODES.get(status, "UNAVAILABLE"),
                    "message": "internal error"}
        else:
            problem = _parser_problem(exc)
            self._log_client_error(exc)
            body = {"code": HTTP_CODES.get(status, "BAD_REQUEST"), "message": problem}
        response = json_response(status, body)
        response.force_close()
        return response

    def log_exception(self, *args: object, **kw: object) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            # The client's fault (e.g. a body that fails to decompress, met while aiohttp
            # drains it after the answer): not an error of ours.
            self._log_client_error(exc)
            return
        super().log_exception(*args, **kw)

    def _log_client_error(self, exc: BaseException | None) -> None:
        kind = type(exc).__name__ if exc is not None else "unknown"
        if _client_errors.allow(kind):
            self.logger.warning("malformed request refused", extra={"kind": kind})


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer parser-level errors in JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same server object, with our protocol factory (Server has no __slots__;
        # aiohttp offers no parameter for the protocol class).
        server.__class__ = _JsonErrorServer
        return server


def make_runner(app: web.Application, shutdown_timeout: float = 10.0) -> GatewayRunner:
    """The runner every way of serving the gateway uses (one process, ``--workers``,
    gunicorn): JSON answers for parser-level errors, no access log, aiohttp's parser
    limits stated, and no signal handling of its own (the caller drains on SIGTERM)."""
    return GatewayRunner(app, access_log=None, handle_signals=False,
                         shutdown_timeout=shutdown_timeout, max_line_size=MAX_LINE_SIZE,
                         max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS)


def freeze_heap() -> None:
    """Everything allocated so far lives as long as the process: keep it out of the
    collector's full passes, which otherwise show up as 15-25 ms stalls in p99."""
    gc.collect()
    gc.freeze()


async def serve_app(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                    shutdown_timeout: float = 10.0, ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and drain in-flight requests."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before listening: no window of default death
        loop.add_signal_handler(sig, stop.set)
    runner = make_runner(app, shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=4096)
    await site.start()
    freeze_heap()
    log.info("listening", extra={"host": host, "port": port, "pid": os.getpid()})
    if ready:
        ready()
    await stop.wait()
    log.info("draining", extra={"pid": os.getpid()})
    await runner.cleanup()
    log.info("stopped", extra={"pid": os.getpid()})


# A worker's app: ``None`` when the gateway runs as one process, without a supervisor.
AppMaker = Callable[[WorkerInfo | None], web.Application]


def run(make_app: AppMaker, host: str, port: int, workers: int = 1) -> int:
    """Serve ``make_app(...)`` in this process, or in ``workers`` supervised processes
    sharing the port (SO_REUSEPORT: the kernel spreads connections over them). The exit
    status: 0 after a clean stop, non-zero when the workers could not be kept alive."""
    if workers <= 1:
        uvloop.run(serve_app(make_app(None), host, port))
        return 0

    def worker_main(info: WorkerInfo) -> None:
        uvloop.run(serve_app(make_app(info), host, port, reuse_port=True))

    return Supervisor(worker_main, workers).run()


def serve_gateway(settings: Settings, host: str, port: int, workers: int = 1) -> int:
    from gateway.app import create_app

    def make_app(worker: WorkerInfo | None) -> web.Application:
        if worker is None:
            return create_app(settings)
        # The relay of a worker that died is named like its replacement's: the new
        # worker reads its predecessor's pending entries at once, not after the claim time.
        app = create_app(settings, relay_consumer=f"{socket.gethostname()}-{port}-w{worker.slot}")
        app[GATEWAY].metrics.worker_restarts.read = worker.restarts
        return app

    return run(make_app, host, port, workers)


async def gunicorn_app() -> web.AppRunner:
    """The gateway for gunicorn's aiohttp worker, settings from the environment::

        gunicorn gateway.http.server:gunicorn_app --worker-class aiohttp.GunicornUVLoopWebWorker \\
            --workers 2 --reuse-port --bind 0.0.0.0:8080 --graceful-timeout 30

    The worker runs the runner returned here (so parser-level errors are answered in
    JSON, as with ``serve``), drains it on SIGTERM and restarts dead workers; the heap is
    frozen once the app has started. Keep ``--reuse-port`` (a socket per worker, as
    ``serve --workers`` has): with gunicorn's default shared socket the same two workers
    served 12-14 % fewer requests (medians of five runs of ``loadtest.bench_workers``).

    What differs from ``serve --workers``: ``seckill_worker_restarts_total`` stays 0
    (gunicorn's log says when it restarts a worker); gunicorn gives up only when a
    worker fails while booting, so with ``--reuse-port`` a port held by another program
    makes it restart workers forever (each retries the bind for 5 s) instead of exiting;
    the port closes up to 1 s after SIGTERM. In exchange it offers HUP reloads and a
    hang watchdog."""
    from gateway.app import create_app
    from gateway.logs import setup_logging

    setup_logging()  # our loggers in JSON; gunicorn's own keep their handlers
    app = create_app(load_settings())
    app.on_startup.append(_freeze_heap_when_started)
    return make_runner(app)


async def _freeze_heap_when_started(_app: web.Application) -> None:
    freeze_heap()
