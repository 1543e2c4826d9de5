"""The waiting room's public API: join a sale's queue, poll a ticket."""

from __future__ import annotations

from aiohttp import web

from gateway.admission.waiting_room import Answer
from gateway.http.context import gateway_of
from gateway.http.errors import json_response
from gateway.http.public import rate_limit
from gateway.http.requests import sku_of


def _respond(answer: Answer) -> web.Response:
    return json_response(answer.status, answer.body, answer.headers)


async def join(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    user_id = gw.auth.user_id(request)
    rate_limit(gw, request, user_id)
    return _respond(await gw.room.join(user_id, sku_of(request)))


async def poll(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    user_id = gw.auth.user_id(request)
    rate_limit(gw, request, user_id)
    return _respond(await gw.room.poll(user_id, sku_of(request), request.match_info["ticket"]))
