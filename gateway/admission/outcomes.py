"""What a purchase's outcome looks like to the client: its HTTP status and body.

The purchase script records an outcome *code* against the key (``OK``,
``ALREADY_PURCHASED``, ``SOLD_OUT``, ``INSUFFICIENT_STOCK``); this module alone maps a
code to its status and body, the first time and on every replay of the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.http.errors import ApiError, bad_request
from gateway.models import Sale
from gateway.store.scripts.purchase import Code, Reply

STATUS = {"OK": 200, "ALREADY_PURCHASED": 409, "INSUFFICIENT_STOCK": 409, "SOLD_OUT": 410}
MESSAGES = {
    "ALREADY_PURCHASED": "you already hold the per-user limit for this sale",
    "INSUFFICIENT_STOCK": "fewer units are left than the quantity asked for",
    "SOLD_OUT": "no units left in this sale",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


def outcome_body(code: str, sku: str, user_id: int, order_no: str, units: tuple[int, ...]) -> dict[str, Any]:
    """The body of a recorded outcome; built the same way the first time and on every
    replay of its key."""
    if code == "OK":
        return {"code": "OK", "order_no": order_no, "sku": sku, "user_id": user_id,
                "units": list(units)}
    body: dict[str, Any] = {"code": code, "message": MESSAGES.get(code, "")}
    if code == "ALREADY_PURCHASED":
        body["order_no"] = order_no or None
    return body


def render(reply: Reply, sale: Sale, user_id: int, duplicate_response: str) -> Outcome:
    """The answer for a final reply of the purchase script (not NEED_UNITS, not a
    mismatch with the sale, which the purchase path resolves first)."""
    code = reply.code
    if code is Code.KEY_REUSED:
        raise ApiError(422, "IDEMPOTENCY_KEY_REUSED",
                       "this key was used before with a different SKU or quantity")
    if code is Code.BAD_QUANTITY:
        raise bad_request("quantity is over the per-user limit")
    body = outcome_body(reply.outcome, sale.sku, user_id, reply.order_no, reply.units)
    status = STATUS[reply.outcome]
    if code is not Code.DUPLICATE or reply.same_attempt:
        # A first outcome, or a client library resending this very call after losing
        # the reply: the outcome is this request's own, not a duplicate's.
        return Outcome(status, body)
    if duplicate_response == "replay":
        headers = {"Idempotent-Replayed": "true"}
        if reply.order_status:
            # The original body, as promised; what became of the order since.
            headers["Order-Status"] = reply.order_status
        return Outcome(status, body, headers)
    conflict = {"code": "IDEMPOTENT_CONFLICT",
                "message": "this key was used before; the original outcome is attached",
                "original": {"status": status, "body": body}}
    if reply.order_status:
        conflict["order_status"] = reply.order_status
    return Outcome(409, conflict)
