"""HTTP handlers of the gateway: the public API and the admin API."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from .errors import ApiError, bad_request, json_response
from .keys import CLIENT_KEY_RE, valid_sku
from .metrics import CONTENT_TYPE
from .models import Sale
from .openapi import MAX_LIMIT, MAX_PRICE, MAX_SHARDS, MAX_STOCK
from .ratelimit import retry_after
from .state import Gateway, GATEWAY

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


async def _json_object(request: web.Request, allowed: set[str]) -> dict:
    try:
        raw = await request.read()
    except web.RequestPayloadError:
        # A body the parser could not decode (a broken gzip/deflate stream, bad chunking
        # after the headers): the client's fault, not ours.
        raise bad_request("the body could not be read (content encoding or framing)") from None
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    unknown = set(data) - allowed
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    return data


def _int_field(data: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer between {lo} and {hi}")
    return value


def _sku(request: web.Request) -> str:
    sku = request.match_info["sku"]
    if not valid_sku(sku):
        raise bad_request("the SKU must be 1-64 chars of [A-Za-z0-9_.:-], starting with a letter or digit")
    return sku


# -- public API -------------------------------------------------------------------------

def _rate_limit(gw: Gateway, request: web.Request, user_id: int) -> None:
    """Per user and per client address; 429 with Retry-After when over."""
    wait = max(gw.user_limiter.acquire(user_id), gw.ip_limiter.acquire(request.remote))
    if wait > 0:
        gw.metrics.shed.labels("rate_limited").inc()
        raise ApiError(429, "RATE_LIMITED", "too many requests; slow down",
                       {"Retry-After": retry_after(wait)})


async def token(request: web.Request) -> web.Response:
    gw = _gateway(request)
    user_id = gw.auth.user_id(request)
    _rate_limit(gw, request, user_id)
    issuer = await gw.token_issuer()
    return json_response(200, {"code": "OK", "token": issuer.issue(user_id),
                               "expires_in": gw.settings.idempotency_ttl})


async def seckill(request: web.Request) -> web.Response:
    gw = _gateway(request)
    user_id = gw.auth.user_id(request)
    _rate_limit(gw, request, user_id)
    key = request.headers.get("X-Idempotency-Key") or request.headers.get("Idempotency-Key")
    if not key:
        raise ApiError(400, "IDEMPOTENCY_KEY_REQUIRED", "send X-Idempotency-Key (or Idempotency-Key)")
    pattern = CLIENT_KEY_RE if gw.settings.key_mode == "client" else TOKEN_SHAPE
    if pattern.fullmatch(key) is None:
        raise bad_request("malformed idempotency key")
    body = await _json_object(request, {"quantity"})
    quantity = _int_field(body, "quantity", 1, 1, MAX_LIMIT)
    sku = _sku(request)
    outcome = await gw.purchases.buy(user_id, sku, key, quantity)
    return json_response(outcome.status, outcome.body, outcome.headers)


async def order(request: web.Request) -> web.Response:
    gw = _gateway(request)
    user_id = gw.auth.user_id(request)
    found = await gw.store.get_order(request.match_info["order_no"])
    if found is None or found.user_id != user_id:
        raise ApiError(404, "ORDER_NOT_FOUND", "no such order")
    return json_response(200, {"code": "OK", **found.public()})


async def healthz(request: web.Request) -> web.Response:
    gw = _gateway(request)
    await gw.store.ping()
    return json_response(200, {"code": "OK", "redis": "up"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_gateway(request).openapi_json, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    gw = _gateway(request)
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


# -- admin API --------------------------------------------------------------------------

async def put_sale(request: web.Request) -> web.Response:
    gw = _gateway(request)
    gw.auth.require_admin(request)
    sku = _sku(request)
    data = await _json_object(request, {"stock", "price", "per_user_limit", "shards"})
    if "stock" not in data:
        raise bad_request("stock is required")
    sale = Sale(
        sku=sku,
        stock=_int_field(data, "stock", 0, 1, MAX_STOCK),
        price=_int_field(data, "price", 0, 0, MAX_PRICE),
        per_user_limit=_int_field(data, "per_user_limit", 1, 1, MAX_LIMIT),
        shards=_int_field(data, "shards", gw.settings.shards, 1, MAX_SHARDS),
    )
    if not await gw.store.create_sale(sale):
        raise ApiError(409, "SALE_EXISTS", "a sale with this SKU exists")
    gw.sales.forget(sku)
    return json_response(201, {"code": "CREATED", "sku": sku, "stock": sale.stock, "price": sale.price,
                               "per_user_limit": sale.per_user_limit, "shards": sale.shards})


async def get_sale(request: web.Request) -> web.Response:
    gw = _gateway(request)
    gw.auth.require_admin(request)
    sku = _sku(request)
    status = await gw.sale_status(sku)
    if status is None:
        raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
    return json_response(200, {"code": "OK", **status})


async def delete_sale(request: web.Request) -> web.Response:
    gw = _gateway(request)
    gw.auth.require_admin(request)
    sku = _sku(request)
    sale = await gw.store.get_sale(sku)
    if sale is None:
        raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
    await gw.store.delete_sale(sale)
    gw.sales.forget(sku)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/api/token", token, name="token")
    app.router.add_route("POST", "/api/token", token)
    app.router.add_route("POST", r"/api/seckill/{sku:[^/]+}", seckill, name="seckill")
    app.router.add_route("GET", r"/api/orders/{order_no:[^/]+}", order, name="order")
    app.router.add_route("PUT", r"/admin/sales/{sku:[^/]+}", put_sale, name="admin_sale")
    app.router.add_route("GET", r"/admin/sales/{sku:[^/]+}", get_sale)
    app.router.add_route("DELETE", r"/admin/sales/{sku:[^/]+}", delete_sale)
    app.router.add_route("GET", "/healthz", healthz, name="healthz")
    app.router.add_route("GET", "/metrics", metrics, name="metrics")
    app.router.add_route("GET", "/openapi.json", openapi, name="openapi")
