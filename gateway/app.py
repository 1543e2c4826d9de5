"""Builds the aiohttp application: routes, the error/metrics middleware, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from aiohttp import web

from .config import Settings
from .errors import HTTP_CODES, RESPONSE_CODE, ApiError, json_response, unavailable
from .handlers import add_routes
from .redis_conn import REDIS_FAILURES, RedisClient
from .state import GATEWAY, Gateway

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# (route, code) -> (requests counter, latency histogram) children, per app: labels() on
# every request cost more than the rest of the metrics work together.
_METRIC_CHILDREN = web.AppKey("metric_children", dict)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer is JSON with a code; Redis failing is a 503, never a 500; the
    number of requests in flight is capped so a slow Redis cannot pile them up."""
    gw: Gateway = request.app[GATEWAY]
    started = time.perf_counter()
    route = _route_name(request)
    gw.in_flight += 1
    try:
        if gw.in_flight > gw.settings.max_in_flight:
            gw.metrics.shed.labels("in_flight").inc()
            response: web.StreamResponse = unavailable("the gateway is overloaded").response()
        else:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
                response = json_response(exc.status, {"code": code, "message": exc.reason})
            except REDIS_FAILURES as exc:
                gw.metrics.redis_errors.labels(type(exc).__name__).inc()
                log.warning("redis failure on %s: %s", route, type(exc).__name__)
                response = unavailable().response()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unhandled error on %s", route)
                response = json_response(500, {"code": "INTERNAL", "message": "internal error"})
    finally:
        gw.in_flight -= 1
    key = (route, _code_of(response))
    children = request.app[_METRIC_CHILDREN]
    pair = children.get(key)
    if pair is None:
        pair = children[key] = (gw.metrics.requests.labels(*key), gw.metrics.latency.labels(route))
    pair[0].inc()
    pair[1].observe(time.perf_counter() - started)
    return response


def _code_of(response: web.StreamResponse) -> str:
    return response.get(RESPONSE_CODE) or str(response.status)


def create_app(settings: Settings, client: RedisClient | None = None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=settings.max_body_bytes)
    gateway = Gateway.build(settings, client)
    app[GATEWAY] = gateway
    app[_METRIC_CHILDREN] = {}
    add_routes(app)

    async def lifecycle(app: web.Application):
        gateway.start_background()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifecycle)
    return app
