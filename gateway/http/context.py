"""Where a handler finds the gateway's state: on the app, under one key (no globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.app import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]
