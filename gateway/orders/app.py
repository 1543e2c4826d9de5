"""The bundled orders service's HTTP API: the reference seckill endpoint of the contract.

    POST /orders                      store a delivered purchase (Idempotency-Key: order_no)
    GET  /orders/{order_no}           the order, with state, state_version (also ETag), pay_by
    POST /orders/{order_no}/ship      paid -> shipped, If-Match: <state_version>
    POST /orders/{order_no}/cancel    pending -> cancelled; the units are released
    POST /payments/notify             a payment provider's signed notification, once per notify_id
    GET  /refunds                     payments that arrived for expired or cancelled orders
    GET  /healthz                     open; the database, and releases not yet acknowledged

Who may call: every call but ``/healthz`` and ``/payments/notify`` carries
``Authorization: Bearer <SECKILL_ORDERS_TOKEN>`` (401 ``UNAUTHENTICATED`` otherwise);
``/payments/notify`` carries ``X-Signature`` instead (see ``signing``), checked before
the database is touched (401 ``SIGNATURE_INVALID``).

States: ``pending`` -> ``paid`` -> ``shipped``; ``pending`` -> ``cancelled`` (a call) or
``expired`` (``pay_by`` passed; a background task). Each move bumps ``state_version``.
Cancelling a cancelled order again answers 200 with the order as it is and
``"duplicate": true``; cancelling from any other state is 409 ``INVALID_STATE``. A
SUCCESS payment for a closed order answers 409 ``ORDER_CLOSED``, is recorded once per
notify_id (a repeat answers the same) and is listed by ``/refunds``; a notice with
another status for a closed order is recorded and answered 200, as for any order: no
money came, none is owed.

Every answer is JSON with a ``code``, like the gateway's. A database that is down or
locked answers 503, which the relay retries.
"""

from __future__ import annotations

import hmac
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import uvloop
from aiohttp import web

from gateway.config import Settings
from gateway.http.auth import _bearer, _raw
from gateway.http.errors import HTTP_CODES, ApiError, bad_request, json_response, unavailable
from gateway.orders import signing
from gateway.orders.background import Background, now_ms
from gateway.orders.config import OrdersConfig, with_dev_secrets
from gateway.orders.db import (
    Cancel,
    Insert,
    NewOrder,
    OrdersDb,
    Payment,
    PaymentNotice,
    Ship,
    StoredOrder,
    open_orders_db,
)
from gateway.store.keys import MAX_USER_ID, valid_sku

log = logging.getLogger("gateway.orders")

ORDERS_DB = web.AppKey("orders_db", OrdersDb)
ORDERS_CONFIG = web.AppKey("orders_config", OrdersConfig)
BACKGROUND = web.AppKey("orders_background", Background)
#: Routes (by name) that take no bearer: health, and the provider's signed notices.
OPEN_ROUTES = frozenset({"healthz", "payment_notify"})
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


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The bearer token, compared in constant time, on every route but the open ones
    (unknown paths included: a caller without the token learns nothing)."""
    if request.match_info.route.name not in OPEN_ROUTES:
        expected = request.app[ORDERS_CONFIG].orders_token.encode()
        if not hmac.compare_digest(_raw(_bearer(request) or ""), expected):
            raise ApiError(401, "UNAUTHENTICATED", "Authorization: Bearer <SECKILL_ORDERS_TOKEN> "
                           "required", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


# -- request parsing ----------------------------------------------------------------------

def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def _int(data: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer between {lo} and {hi}")
    return value


def _optional_int(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    return None if data.get(name) is None else _int(data, name, lo, hi)


def _ident(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or ID_RE.fullmatch(value) is None:
        raise bad_request(f"{name} must be 1-128 chars of [A-Za-z0-9_.:-]")
    return value


def _new_order(data: dict[str, Any], idempotency_key: str | None) -> NewOrder:
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
        admitted_at=_optional_int(data, "admitted_at", 0, MAX_AMOUNT),
        pay_by=_optional_int(data, "pay_by", 0, MAX_AMOUNT),
    )


def _if_match(request: web.Request) -> int:
    raw = request.headers.get("If-Match")
    if raw is None:
        raise ApiError(428, "PRECONDITION_REQUIRED", "send If-Match: <state_version>")
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise bad_request("If-Match must be the order's state_version")
    return int(value)


def _order_response(status: int, code: str, order: StoredOrder, **extra: Any) -> web.Response:
    return json_response(status, {"code": code, **order.public(), **extra},
                         {"ETag": f'"{order.state_version}"'})


def _not_found() -> ApiError:
    return ApiError(404, "ORDER_NOT_FOUND", "no such order")


def _invalid_state(action: str, order: StoredOrder) -> ApiError:
    return ApiError(409, "INVALID_STATE", f"cannot {action} an order that is {order.state}",
                    extra={"state": order.state, "state_version": order.state_version})


# -- handlers -----------------------------------------------------------------------------

async def post_order(request: web.Request) -> web.Response:
    order = _new_order(_json_object(await request.read()), request.headers.get("Idempotency-Key"))
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
    raise _invalid_state("ship", order)


async def cancel(request: web.Request) -> web.Response:
    result = await _db(request).cancel(request.match_info["order_no"], now_ms())
    order = result.order
    if result.outcome is Cancel.NO_ORDER or order is None:
        raise _not_found()
    if result.outcome is Cancel.CANCELLED:
        request.app[BACKGROUND].releases_queued()
        return _order_response(200, "OK", order, duplicate=False)
    if result.outcome is Cancel.ALREADY_CANCELLED:
        return _order_response(200, "OK", order, duplicate=True)
    raise _invalid_state("cancel", order)


def _check_signature(request: web.Request, body: bytes) -> None:
    config = request.app[ORDERS_CONFIG]
    if not signing.verify(config.payment_secret, request.headers.get(signing.HEADER), body,
                          time.time(), config.signature_tolerance):
        raise ApiError(401, "SIGNATURE_INVALID",
                       f"{signing.HEADER} is missing, malformed, stale or does not sign this body")


async def payment_notify(request: web.Request) -> web.Response:
    body = await request.read()
    _check_signature(request, body)  # before parsing it, and before any database access
    data = _json_object(body)
    status = data.get("status")
    if not isinstance(status, str) or not 1 <= len(status) <= 32:
        raise bad_request("status must be a string such as SUCCESS")
    notice = PaymentNotice(_ident(data, "notify_id"), _ident(data, "order_no"),
                           _int(data, "amount", 0, MAX_AMOUNT), status)
    result = await _db(request).record_payment(notice)
    order = result.order
    if result.outcome is Payment.NO_ORDER or order is None:
        raise _not_found()
    if result.outcome is Payment.AMOUNT_MISMATCH:
        raise ApiError(422, "AMOUNT_MISMATCH", f"the order's amount is {order.amount}",
                       extra={"amount": order.amount})
    if result.outcome is Payment.NOTIFY_ID_REUSED:
        raise ApiError(409, "NOTIFY_ID_REUSED", "this notify_id was used for another payment")
    answer = {"order_no": order.order_no, "state": order.state,
              "state_version": order.state_version, "duplicate": result.duplicate}
    if result.outcome is Payment.ORDER_CLOSED:
        return json_response(409, {"code": "ORDER_CLOSED", "message": f"the order is {order.state}: "
                                   "the payment is recorded as due for refund", **answer})
    return json_response(200, {"code": "OK", **answer})


async def refunds(request: web.Request) -> web.Response:
    due = await _db(request).refunds()
    return json_response(200, {"code": "OK", "refunds": [refund.public() for refund in due]})


async def healthz(request: web.Request) -> web.Response:
    pending = await _db(request).releases_pending()
    return json_response(200, {"code": "OK", "database": "up", "releases_pending": pending})


def create_orders_app(db: OrdersDb, config: OrdersConfig) -> web.Application:
    """The service on ``db``; the app opens it on startup, runs the expirer and the
    release sender while it runs, and closes it on cleanup. ``config`` carries the
    secrets, so there is no app without them."""
    app = web.Application(middlewares=[guard, authenticate], client_max_size=MAX_BODY)
    app[ORDERS_DB] = db
    app[ORDERS_CONFIG] = config
    app[BACKGROUND] = background = Background(db, config)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await db.open()
        await background.start()
        try:
            yield
        finally:
            await background.stop()
            await db.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/orders", post_order)
    app.router.add_get(r"/orders/{order_no:[^/]+}", get_order)
    app.router.add_post(r"/orders/{order_no:[^/]+}/ship", ship)
    app.router.add_post(r"/orders/{order_no:[^/]+}/cancel", cancel)
    app.router.add_post("/payments/notify", payment_notify, name="payment_notify")
    app.router.add_get("/refunds", refunds)
    app.router.add_get("/healthz", healthz, name="healthz")
    return app


def serve_orders(settings: Settings, host: str, port: int, *, dev: bool = False) -> None:
    """Run the service until SIGTERM/SIGINT (``seckill-gateway orders serve``). Without
    the secrets it refuses (``ConfigError``), unless ``dev``: then missing secrets are
    made up and printed to stdout, for the developer to call it with."""
    from gateway.http.server import serve_app

    if dev:
        settings, made = with_dev_secrets(settings)
        _announce_dev_secrets(made)
    app = create_orders_app(open_orders_db(settings.database_url), OrdersConfig.from_settings(settings))
    uvloop.run(serve_app(app, host, port))


def _announce_dev_secrets(made: dict[str, str]) -> None:
    if not made:
        return
    lines = ["# development run: random secrets for this run only (export them to call it)"]
    lines += [f"export {name}={value}" for name, value in made.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
