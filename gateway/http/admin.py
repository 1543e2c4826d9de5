"""The admin API (bearer ``SECKILL_ADMIN_TOKEN``): sales, and releases of orders."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admission.returns import RELEASE_REASONS
from gateway.clock import now_ms, parse_rfc3339, to_rfc3339
from gateway.http.context import gateway_of
from gateway.http.errors import ApiError, bad_request, json_response
from gateway.http.openapi import MAX_ADMIT_RATE, MAX_LIMIT, MAX_PAYMENT_TTL, MAX_PRICE, MAX_SHARDS, MAX_STOCK
from gateway.http.requests import int_field, json_object, sku_of
from gateway.models import Sale


async def put_sale(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    sale = parse_sale(sku_of(request), await json_object(request, SALE_FIELDS), gw.settings.shards)
    if not await gw.create_sale(sale):
        raise ApiError(409, "SALE_EXISTS", "a sale with this SKU exists (or is being made)")
    return json_response(201, {"code": "CREATED", **sale_settings(sale)})


SALE_FIELDS = {"stock", "price", "per_user_limit", "shards", "starts_at", "ends_at", "payment_ttl",
               "waiting_room"}


def parse_sale(sku: str, data: dict[str, Any], default_shards: int) -> Sale:
    """A sale from a PUT body (or the CLI's flags), or a 400 naming the bad field."""
    if "stock" not in data:
        raise bad_request("stock is required")
    starts_at, ends_at = _time_field(data, "starts_at"), _time_field(data, "ends_at")
    if ends_at and ends_at <= max(starts_at, now_ms()):
        raise bad_request("ends_at must be after starts_at and in the future")
    return Sale(
        sku=sku,
        stock=int_field(data, "stock", 0, 1, MAX_STOCK),
        price=int_field(data, "price", 0, 0, MAX_PRICE),
        per_user_limit=int_field(data, "per_user_limit", 1, 1, MAX_LIMIT),
        shards=int_field(data, "shards", default_shards, 1, MAX_SHARDS),
        starts_at=starts_at, ends_at=ends_at,
        payment_ttl=int_field(data, "payment_ttl", 0, 0, MAX_PAYMENT_TTL),
        admit_rate=_admit_rate(data),
    )


def _time_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        return 0
    try:
        return parse_rfc3339(value)
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be an RFC 3339 date-time with a zone, "
                          f"e.g. 2026-12-01T12:00:00Z") from None


def _admit_rate(data: dict[str, Any]) -> float:
    room = data.get("waiting_room")
    if room is None:
        return 0.0
    if not isinstance(room, dict) or set(room) != {"admit_rate"}:
        raise bad_request('waiting_room must be {"admit_rate": R}')
    rate = room["admit_rate"]
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) \
            or not 0 < rate <= MAX_ADMIT_RATE:
        raise bad_request(f"waiting_room.admit_rate must be a number above 0 and at most "
                          f"{MAX_ADMIT_RATE}")
    return float(rate)


def sale_settings(sale: Sale) -> dict[str, Any]:
    """What a sale was created with, as the admin API shows it."""
    return {"sku": sale.sku, "stock": sale.stock, "price": sale.price,
            "per_user_limit": sale.per_user_limit, "shards": sale.shards,
            "starts_at": to_rfc3339(sale.starts_at) if sale.starts_at else None,
            "ends_at": to_rfc3339(sale.ends_at) if sale.ends_at else None,
            "payment_ttl": sale.payment_ttl,
            "waiting_room": {"admit_rate": sale.admit_rate} if sale.admit_rate else None}


async def get_sale(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    status = await gw.sale_status(sku_of(request))
    if status is None:
        raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
    return json_response(200, {"code": "OK", **status})


async def delete_sale(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    sku = sku_of(request)
    if not await gw.delete_sale(sku):
        raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
    return web.Response(status=204)


async def release_order(request: web.Request) -> web.Response:
    """The orders service gives back an order's units: unpaid past its deadline
    (``expired``) or cancelled before payment (``cancelled``). Once: a repeat answers the
    same and moves nothing."""
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    data = await json_object(request, {"reason"})
    reason = data.get("reason")
    if reason not in RELEASE_REASONS:
        raise bad_request(f"reason must be one of {', '.join(RELEASE_REASONS)}")
    order = await gw.release_order(request.match_info["order_no"], str(reason))
    if order is None:
        raise ApiError(404, "ORDER_NOT_FOUND", "no such order")
    return json_response(200, {"code": "OK", **order.public()})


async def resume_delivery(request: web.Request) -> web.Response:
    """Deliver again after the relay paused (a wrong endpoint, refused credentials). Each
    process's relay also resumes by itself once a probe delivery is accepted."""
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    if gw.relay is None:
        raise ApiError(404, "NO_RELAY", "no relay runs in this process")
    gw.relay.breaker.resume()
    return json_response(200, {"code": "OK", "delivery": gw.relay.state()})
