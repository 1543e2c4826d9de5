"""What QueueCrowd decides about the waiting room's answers, as pure functions: whether an
answer keeps the contract, and how a crowd is shared among Locust users.

Kept apart from ``locustfile.py`` so that it is tested without Locust (like
``lifecycle.py``); it imports no ``loadtest`` module, so that the locustfile can load it
beside itself when Locust is run from elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

OVERLOAD = {(503, "UNAVAILABLE"), (429, "RATE_LIMITED")}
SOLD_OUT = (410, "SOLD_OUT")
SALE_ENDED = (410, "SALE_ENDED")
ADMITTED = (200, "ADMITTED")
QUEUED = (202, "QUEUED")


@dataclass
class QueueReply:
    """One answer of the waiting room."""

    status: int
    code: str
    body: dict
    retry_after: float | None

    @property
    def pair(self) -> tuple[int, str]:
        return self.status, self.code


def share(total: int, parts: int) -> int:
    """One Locust user's part of ``total`` buyers, rounded up (so the crowd comes out at
    most ``parts - 1`` larger than asked when ``parts`` does not divide it)."""
    return math.ceil(max(0, total) / parts)


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def queue_problem(reply: QueueReply, headers: Any, ticket: str | None, last_position: int | None,
                  allowed: set[tuple[int, str]] | None = None) -> str | None:
    """What is wrong with a waiting-room answer, by the contract (None: nothing)."""
    body, pair = reply.body, reply.pair
    if allowed is not None and pair not in allowed and pair not in OVERLOAD:
        return f"QueueCrowd: {pair[0]} {pair[1]} is not an allowed answer here: {json.dumps(body)[:160]}"
    if pair in OVERLOAD:
        return None if headers.get("Retry-After") else f"{pair[0]} {pair[1]} without Retry-After"
    if pair == ADMITTED:
        if not isinstance(body.get("pass"), str) or not body["pass"]:
            return f"200 ADMITTED without a pass: {json.dumps(body)[:160]}"
        if number(body.get("expires_in")) is None:
            return "200 ADMITTED without expires_in"
        return None
    if pair == QUEUED:
        missing = [k for k in ("ticket", "position", "eta_s", "units_left") if k not in body]
        if missing:
            return f"202 QUEUED without {', '.join(missing)}: {json.dumps(body)[:160]}"
        if reply.retry_after is None:
            return "202 QUEUED without Retry-After"
        if ticket is not None and body["ticket"] != ticket:
            return f"the ticket changed: {ticket} then {body['ticket']}"
        position = body["position"]
        if position is not None and (not isinstance(position, int) or isinstance(position, bool) or position < 0):
            return f"position {position!r} is not a number of places"
        if position is not None and last_position is not None and position > last_position:
            return f"position grew from {last_position} to {position}"
        if integer(body["units_left"]) is None or number(body["eta_s"]) is None:
            return f"units_left / eta_s not numbers: {json.dumps(body)[:160]}"
        return None
    if pair in (SOLD_OUT, SALE_ENDED):
        return None
    return f"QueueCrowd: {pair[0]} {pair[1]} from the waiting room: {json.dumps(body)[:160]}"
