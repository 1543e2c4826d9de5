"""What operators and tools read: health, metrics, the OpenAPI document."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

from gateway.http.context import gateway_of
from gateway.http.errors import json_response, unavailable

# Of the request deadline, how long /healthz waits for the start-up work to end before
# it answers 503 (the rest is for the ping).
START_WAIT = 0.5


async def healthz(request: web.Request) -> web.Response:
    """200 while Redis answers, with what is degraded named in the body (a primary
    without the replicas purchases wait for; delivery paused); else 503. Also 503 until
    the process's start-up work is done (topology, connections, scripts, token secret):
    a crowd let in before then would each do it again, at once."""
    gw = gateway_of(request)
    if not await gw.started(gw.settings.request_timeout * START_WAIT):
        raise unavailable("the gateway is starting")
    await gw.store.ping()
    return json_response(200, {"code": "OK", "redis": "up", **gw.health()})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=gateway_of(request).openapi_json, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=gateway_of(request).metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE})
