"""The admin API (bearer ``SECKILL_ADMIN_TOKEN``): sales."""

from __future__ import annotations

from aiohttp import web

from gateway.http.context import gateway_of
from gateway.http.errors import ApiError, bad_request, json_response
from gateway.http.openapi import MAX_LIMIT, MAX_PRICE, MAX_SHARDS, MAX_STOCK
from gateway.http.requests import int_field, json_object, sku_of
from gateway.models import Sale


async def put_sale(request: web.Request) -> web.Response:
    gw = gateway_of(request)
    gw.auth.require_admin(request)
    sku = sku_of(request)
    data = await json_object(request, {"stock", "price", "per_user_limit", "shards"})
    if "stock" not in data:
        raise bad_request("stock is required")
    sale = Sale(
        sku=sku,
        stock=int_field(data, "stock", 0, 1, MAX_STOCK),
        price=int_field(data, "price", 0, 0, MAX_PRICE),
        per_user_limit=int_field(data, "per_user_limit", 1, 1, MAX_LIMIT),
        shards=int_field(data, "shards", gw.settings.shards, 1, MAX_SHARDS),
    )
    if not await gw.create_sale(sale):
        raise ApiError(409, "SALE_EXISTS", "a sale with this SKU exists (or is being made)")
    return json_response(201, {"code": "CREATED", "sku": sku, "stock": sale.stock, "price": sale.price,
                               "per_user_limit": sale.per_user_limit, "shards": sale.shards})


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
