"""The gateway's one middleware: every answer JSON with a code, Redis failing a 503
(never a 500), a deadline on every request, a cap on requests in flight, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.http.context import gateway_of
from gateway.http.errors import HTTP_CODES, RESPONSE_CODE, ApiError, json_response, unavailable
from gateway.store.connection import is_redis_failure

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    gw = gateway_of(request)
    started = time.perf_counter()
    route = _route_name(request)
    gw.in_flight += 1
    try:
        if gw.in_flight > gw.settings.max_in_flight:
            gw.metrics.shed.labels("in_flight").inc()
            response: web.StreamResponse = unavailable("the gateway is overloaded").response()
        else:
            try:
                # A bound on every request: a slow or unreachable Redis (or a cluster
                # client busy rediscovering its nodes) must not hold callers for long.
                async with asyncio.timeout(gw.settings.request_timeout):
                    response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
                response = json_response(exc.status, {"code": code, "message": exc.reason})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_redis_failure(exc):
                    log.exception("unhandled error", extra={"route": route})
                    response = json_response(500, {"code": "INTERNAL", "message": "internal error"})
                else:
                    kind = type(exc).__name__
                    gw.metrics.redis_errors.labels(kind).inc()
                    if gw.log_throttle.allow(kind):
                        log.warning("redis failure", extra={"route": route, "error": kind,
                                                            "detail": str(exc)[:200]})
                    response = _unavailable_for(exc).response()
    finally:
        gw.in_flight -= 1
    gw.metrics.answers.observe(route, response.get(RESPONSE_CODE) or str(response.status),
                               time.perf_counter() - started)
    return response


def _unavailable_for(exc: BaseException) -> ApiError:
    """A timeout is not "nothing admitted": the script may have run after we stopped
    waiting. Say so; the same key, sent again, returns what happened."""
    if isinstance(exc, (asyncio.TimeoutError, RedisTimeoutError)):
        error = unavailable("Redis did not answer in time; the purchase may have been made: "
                            "retry with the same key to learn its outcome")
        error.extra["outcome_unknown"] = True
        return error
    return unavailable()
