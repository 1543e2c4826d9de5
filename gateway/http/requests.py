"""Reading what a client sent: JSON bodies, bounded integers, SKUs. Bad input is a 400
naming the field, never a 500."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.http.errors import bad_request
from gateway.store.keys import valid_sku


async def json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
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


def int_field(data: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer between {lo} and {hi}")
    return value


def sku_of(request: web.Request) -> str:
    sku = request.match_info["sku"]
    if not valid_sku(sku):
        raise bad_request("the SKU must be 1-64 chars of [A-Za-z0-9_.:-], starting with a letter or digit")
    return sku
