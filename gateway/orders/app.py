"""The bundled orders service's HTTP API: the reference seckill endpoint of the contract.

    POST /orders                      store a delivered purchase (Idempotency-Key: order_no)
    GET  /orders/{order_no}           the order, with state and state_version (also ETag)
    POST /orders/{order_no}/ship      paid -> shipped, If-Match: <state_version>
    POST /payments/notify             a payment provider's notification, once per notify_id
    GET  /healthz

Every answer is JSON with a ``code``, like the gateway's. A database that is down or
locked answers 503, which the relay retries.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Awaitable, Callable

import orjson
import uvloop
from aiohttp import web

from gateway.http.errors import HTTP_CODES, ApiError, bad_request, json_response, unavailable
from gateway.store.keys import MAX_USER_ID, valid_sku
from gateway.orders.db import (Insert, NewOrder, OrdersDb, Payment, PaymentNotice, Ship, StoredOrder,
                 open_orders_db)

log = logging.getLogger("gateway.orders")

ORDERS_DB = web.AppKey("orders_db", OrdersDb)
ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_UNIT = 2**31 - 1
MAX_AMOUNT = 2**63 - 1
MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _db(request: web.Request) -> OrdersDb:
    return request.app[ORDERS_DB]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON with a code for every answer; a database outage is a 503, never a 500."""
    db = request.app[ORDERS_DB]
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(exc.status, {"code": HTTP_CODES.get(exc.status, "HTTP_ERROR"),
                                          "message": exc.reason})
    except db.failures as exc:
        log.warning("database unavailable", extra={"error": repr(exc)})
        return unavailable("the orders database is unavailable").response()
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return json_response(500, {"code": "INTERNAL", "message": "internal error"})


# -- request parsing ----------------------------------------------------------------------

async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise bad_request("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def _int(data: dict, name: str, lo: int, hi: int, *, required: bool = True) -> int | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer between {lo} and {hi}")
    return value


def _ident(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or ID_RE.fullmatch(value) is None:
        raise bad_request(f"{name} must be 1-128 chars of [A-Za-z0-9_.:-]")
    return value


def _new_order(data: dict, idempotency_key: str | None) -> NewOrder:
    order_no = _ident(data, "order_no")
    if idempotency_key is not None and idempotency_key != order_no:
        raise bad_request("Idempotency-Key must equal order_no")
    sku = data.get("sku")
    if not isinstance(sku, str) or not valid_sku(sku):
        raise bad_request("sku must be 1-64 chars of [A-Za-z0-9_.:-]")
    units = data.get("units")
    if (not isinstance(units, list) or not units
            or not all(isinstance(u, int) and not isinstance(u, bool) and 1 <= u <= MAX_UNIT
                       for u in units)
            or len(set(units)) != len(units)):
        raise bad_request("units must be a non-empty list of distinct positive integers")
    quantity = _int(data, "quantity", 1, 1_000_000)
    if quantity != len(units):
        raise bad_request("quantity must equal the number of units")
    return NewOrder(
        order_no=order_no, sku=sku, user_id=_int(data, "user_id", 0, MAX_USER_ID - 1),
        units=tuple(units), quantity=quantity, amount=_int(data, "amount", 0, MAX_AMOUNT),
        admitted_at=_int(data, "admitted_at", 0, MAX_AMOUNT, required=False),
    )


def _if_match(request: web.Request) -> int:
    raw = request.headers.get("If-Match")
    if raw is None:
        raise ApiError(428, "PRECONDITION_REQUIRED", "send If-Match: <state_version>")
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise bad_request("If-Match must be the order's state_version")
    return int(value)


def _order_response(status: int, code: str, order: StoredOrder) -> web.Response:
    return json_response(status, {"code": code, **order.public()},
                         {"ETag": f'"{order.state_version}"'})


def _not_found() -> ApiError:
    return ApiError(404, "ORDER_NOT_FOUND", "no such order")


# -- handlers -----------------------------------------------------------------------------

async def post_order(request: web.Request) -> web.Response:
    order = _new_order(await _json_object(request), request.headers.get("Idempotency-Key"))
    result = await _db(request).insert_order(order)
    if result.outcome is Insert.STORED:
        assert result.order is not None
        return _order_response(201, "CREATED", result.order)
    if result.outcome is Insert.ORDER_EXISTS:
        assert result.order is not None
        return json_response(409, {"code": "ORDER_EXISTS", "message": "this order_no is stored",
                                   "order": result.order.public()})
    return json_response(409, {"code": "UNIT_TAKEN", "message": "units belong to other orders",
                               "units": list(result.taken)})


async def get_order(request: web.Request) -> web.Response:
    order = await _db(request).get_order(request.match_info["order_no"])
    if order is None:
        raise _not_found()
    return _order_response(200, "OK", order)


async def ship(request: web.Request) -> web.Response:
    version = _if_match(request)
    result = await _db(request).ship(request.match_info["order_no"], version)
    order = result.order
    if result.outcome is Ship.NO_ORDER or order is None:
        raise _not_found()
    if result.outcome is Ship.SHIPPED:
        return _order_response(200, "OK", order)
    if result.outcome is Ship.STALE_VERSION:
        raise ApiError(412, "PRECONDITION_FAILED", "the order changed; read it again",
                       {"ETag": f'"{order.state_version}"'},
                       {"state": order.state, "state_version": order.state_version})
    raise ApiError(409, "INVALID_STATE", f"cannot ship an order that is {order.state}",
                   extra={"state": order.state, "state_version": order.state_version})


async def payment_notify(request: web.Request) -> web.Response:
    data = await _json_object(request)
    status = data.get("status")
    if not isinstance(status, str) or not 1 <= len(status) <= 32:
        raise bad_request("status must be a string such as SUCCESS")
    notice = PaymentNotice(_ident(data, "notify_id"), _ident(data, "order_no"),
                           _int(data, "amount", 0, MAX_AMOUNT), status)  # type: ignore[arg-type]
    result = await _db(request).record_payment(notice)
    order = result.order
    if result.outcome is Payment.NO_ORDER or order is None:
        raise _not_found()
    if result.outcome is Payment.AMOUNT_MISMATCH:
        raise ApiError(422, "AMOUNT_MISMATCH", f"the order's amount is {order.amount}",
                       extra={"amount": order.amount})
    if result.outcome is Payment.NOTIFY_ID_REUSED:
        raise ApiError(409, "NOTIFY_ID_REUSED", "this notify_id was used for another payment")
    return json_response(200, {"code": "OK", "order_no": order.order_no, "state": order.state,
                               "state_version": order.state_version,
                               "duplicate": result.outcome is Payment.REPEAT})


async def healthz(request: web.Request) -> web.Response:
    await _db(request).ping()
    return json_response(200, {"code": "OK", "database": "up"})


def create_orders_app(db: OrdersDb) -> web.Application:
    """The service on ``db``; the app opens it on startup and closes it on cleanup."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[ORDERS_DB] = db

    async def lifecycle(app: web.Application):
        await db.open()
        yield
        await db.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/orders", post_order)
    app.router.add_get(r"/orders/{order_no:[^/]+}", get_order)
    app.router.add_post(r"/orders/{order_no:[^/]+}/ship", ship)
    app.router.add_post("/payments/notify", payment_notify)
    app.router.add_get("/healthz", healthz)
    return app


def serve_orders(database_url: str, host: str, port: int) -> None:
    """Run the service until SIGTERM/SIGINT (``seckill-gateway orders serve``)."""
    from gateway.http.server import serve_app

    uvloop.run(serve_app(create_orders_app(open_orders_db(database_url)), host, port))
