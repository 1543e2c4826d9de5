"""``seckill-gateway relay``: the relay as a process of its own, with ``/metrics`` and
``/healthz`` on a port of its own (a relay outside ``serve`` has no gateway port to be
scraped on)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config import ConfigError, Settings
from gateway.delivery.relay import Relay, RelayConfig
from gateway.metrics import Metrics
from gateway.store.connection import is_redis_failure

log = logging.getLogger("gateway.relay")

RELAY: web.AppKey[Relay] = web.AppKey("relay")
ADMIN_TOKEN: web.AppKey[str] = web.AppKey("admin_token")
HEALTH_TIMEOUT = 2.0  # seconds a /healthz may wait for Redis (the relay's socket timeout is longer)


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where the relay serves ``/metrics`` and ``/healthz``; port 0: nowhere."""

    host: str = "127.0.0.1"
    port: int = 9108

    @property
    def enabled(self) -> bool:
        return self.port != 0


async def run_relay(settings: Settings, config: RelayConfig | None = None,
                    metrics_at: MetricsAddress | None = None) -> None:
    """``seckill-gateway relay``: deliver until SIGTERM/SIGINT, then drain and stop.
    The metrics endpoint stays up while the relay drains, and stops last."""
    relay = Relay.from_settings(settings, Metrics(), config=config)
    relay.admin_token = settings.admin_token
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await serve_metrics(relay, metrics_at) if metrics_at and metrics_at.enabled else None
    relay.start()
    try:
        await stop.wait()
    finally:
        await relay.stop()
        if runner is not None:
            await runner.cleanup()


async def serve_metrics(relay: Relay, at: MetricsAddress) -> web.AppRunner:
    """Start the relay's ``/metrics`` and ``/healthz``; a port in use is a setting to fix."""
    runner = web.AppRunner(metrics_app(relay, relay.admin_token), access_log=None,
                           handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, at.host, at.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"relay metrics on {at.host}:{at.port}: {exc.strerror or exc}") from None
    log.info("relay metrics listening", extra={"host": at.host, "port": at.port})
    return runner


def metrics_app(relay: Relay, admin_token: str | None = None) -> web.Application:
    app = web.Application()
    app[RELAY] = relay
    app[ADMIN_TOKEN] = admin_token or ""
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/admin/delivery/resume", _resume)
    return app


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[RELAY].metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    """200 when the relay's Redis answers (it can read and acknowledge), else 503."""
    relay = request.app[RELAY]
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await relay.store.ping()
    except Exception as exc:
        if not is_redis_failure(exc) and not isinstance(exc, TimeoutError):
            raise
        return _json(503, {"code": "UNAVAILABLE", "redis": "down"})
    return _json(200, {"code": "OK", "redis": "up", "in_flight": relay.in_flight,
                       "delivery": relay.state()})


async def _resume(request: web.Request) -> web.Response:
    """``POST /admin/delivery/resume`` (bearer SECKILL_ADMIN_TOKEN): deliver again."""
    token = request.app[ADMIN_TOKEN]
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not token:
        return _json(403, {"code": "FORBIDDEN", "message": "no SECKILL_ADMIN_TOKEN set"})
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
        return _json(401, {"code": "UNAUTHENTICATED", "message": "admin bearer token required"})
    relay = request.app[RELAY]
    relay.breaker.resume()
    return _json(200, {"code": "OK", "delivery": relay.state()})


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
