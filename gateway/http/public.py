"""The public API: tokens, purchases, a buyer's order."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.http.context import gateway_of
from gateway.http.errors import ApiError, bad_request, json_response
from gateway.http.openapi import MAX_LIMIT
from gateway.http.ratelimit import retry_after
from gateway.http.requests import int_field, json_object, sku_of
from gateway.store.keys import CLIENT_KEY_RE

if TYPE_CHECKING:
    from gateway.app import Gateway

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def rate_limit(gw: Gateway, request: web.Request, user_id: int) -> None:
    """Per user and per client address; 429 with Retry-After when over."""
    users, addresses = gw.user_limiter, gw.ip_limiter
    if not (users.rate or addresses.rate):
        return  # both off (the default): not even the client's address is looked up
    wait = max(users.acquire(user_id), addresses.acquire(request.remote))
    if wait > 0:
        gw.metrics.shed.labels("rate_limited").inc()
        raise ApiError(429, "RATE_LIMITED", "too many requests; slow down",
                       {"Retry-After": retry_after(wait)})


async def token(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    user_id = gw.auth.user_id(request)
    rate_limit(gw, request, user_id)
    issuer = await gw.token_issuer()
    return json_response(200, {"code": "OK", "token": issuer.issue(user_id),
                               "expires_in": gw.settings.idempotency_ttl})


async def seckill(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    user_id = gw.auth.user_id(request)
    rate_limit(gw, request, user_id)
    key = request.headers.get("X-Idempotency-Key") or request.headers.get("Idempotency-Key")
    if not key:
        raise ApiError(400, "IDEMPOTENCY_KEY_REQUIRED", "send X-Idempotency-Key (or Idempotency-Key)")
    pattern = CLIENT_KEY_RE if gw.settings.key_mode == "client" else TOKEN_SHAPE
    if pattern.fullmatch(key) is None:
        raise bad_request("malformed idempotency key")
    body = await json_object(request, {"quantity"})
    quantity = int_field(body, "quantity", 1, 1, MAX_LIMIT)
    sku = sku_of(request)
    outcome = await gw.purchases.buy(user_id, sku, key, quantity,
                                     request.headers.get("X-Queue-Pass"))
    return json_response(outcome.status, outcome.body, outcome.headers)


async def order(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    user_id = gw.auth.user_id(request)
    found = await gw.store.get_order(request.match_info["order_no"])
    if found is None or found.user_id != user_id:
        raise ApiError(404, "ORDER_NOT_FOUND", "no such order")
    return json_response(200, {"code": "OK", **found.public()})
