"""Where a handler finds the gateway's state: on the app, under one key (no globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.admission.purchase import Progress
    from gateway.app import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
# A purchase's progress, read by the middleware when the request fails (outcome_unknown).
PURCHASE_PROGRESS: web.RequestKey[Progress] = web.RequestKey("purchase_progress")


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]
