"""What the lifecycle scenarios (EarlyCrowd, Abandoners) decide, as pure functions:
when a sale starts, how long to honour a ``Retry-After``, what becomes of an order
after its ``200``, and the signed payment notice a provider would send.

Kept apart from ``locustfile.py`` so that it is tested without Locust; it imports no
``loadtest`` module, so the locustfile can load it beside itself when Locust is run
from elsewhere (``locust -f loadtest/locustfile.py``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.orders import signing

PAY, ABANDON, LATE, CANCEL = "pay", "abandon", "late", "cancel"
FATES = (PAY, ABANDON, LATE, CANCEL)


@dataclass(frozen=True, slots=True)
class Mix:
    """Relative weights of what buyers do after a 200: pay at once, never pay, pay
    after the deadline, cancel. ``pay=5,abandon=3,late=1,cancel=1`` by default."""

    pay: int = 5
    abandon: int = 3
    late: int = 1
    cancel: int = 1

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``"pay=5,abandon=3"``: the named weights (the others 0). ValueError when a
        name is unknown, a weight is negative or every weight is 0."""
        weights = dict.fromkeys(FATES, 0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in weights:
                raise ValueError(f"{part!r}: expected one of {', '.join(FATES)} as name=weight")
            weights[name] = int(value)
            if weights[name] < 0:
                raise ValueError(f"{part!r}: a weight cannot be negative")
        if not any(weights.values()):
            raise ValueError(f"{text!r}: at least one weight must be positive")
        return cls(**weights)

    def choose(self, rng: random.Random | None = None) -> str:
        weights = [self.pay, self.abandon, self.late, self.cancel]
        return (rng or random).choices(FATES, weights=weights)[0]


def starts_at_ms(now_s: float, lead_s: float) -> int:
    """A start ``lead_s`` seconds from now, on a whole second (RFC 3339 with seconds)."""
    return math.ceil(now_s + lead_s) * 1000


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (delta-seconds form); None when absent or not a
    number (the HTTP-date form is not used by the gateway)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def poll_delay(retry: float | None, *, floor: float = 0.05, default: float = 1.0) -> float:
    """How long a client that honours ``Retry-After`` waits before asking again: what it
    was told (never a hot loop on ``0``), or ``default`` when it was told nothing."""
    return default if retry is None else max(retry, floor)


def notice(secret: str, notify_id: str, order_no: str, amount: int, now_s: float,
           status: str = "SUCCESS") -> tuple[bytes, dict[str, str]]:
    """The body and headers of a payment notification signed as a provider signs it
    (what ``seckill-gateway orders sign-notify`` prints)."""
    body = orjson.dumps({"notify_id": notify_id, "order_no": order_no, "amount": amount, "status": status})
    headers = {"Content-Type": "application/json", signing.HEADER: signing.sign(secret, body, int(now_s))}
    return body, headers


def json_or_empty(text: str | None) -> dict[str, Any]:
    """A response body as a dict ({} when it is not a JSON object)."""
    try:
        data = orjson.loads(text or b"")
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
