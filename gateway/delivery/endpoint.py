"""The seckill endpoint's side of delivery: what its answers mean.

2xx, or 409 for an order it holds already: delivered. 409 ``UNIT_TAKEN`` or another
4xx: refused (the units go back). 401 and 403: not a refusal of the order but of the
relay's credentials, a configuration fault (nothing goes back; delivery pauses). 5xx,
408/425/429, timeouts, refused connections: no decision yet; ask again later (honouring
``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

#: 4xx answers that mean "not now" rather than "no": retried, never compensated.
RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Verdict:
    """The endpoint's decision on one purchase."""

    delivered: bool
    reason: str = ""
    taken: tuple[int, ...] = ()  # units the endpoint says other orders hold
    status: int = 0              # the HTTP status of a refusal
    misconfigured: bool = False  # 401/403: the endpoint refuses the relay, not the order


def judge(status: int, body: bytes, units: tuple[int, ...]) -> Verdict | None:
    """The endpoint's answer as a verdict; None: no decision, ask again later."""
    if 200 <= status < 300:
        return Verdict(True)
    if status >= 500 or status in RETRYABLE_4XX or status < 400:
        return None
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        data = {}
    code = data.get("code", "") if isinstance(data, dict) else ""
    if status in (401, 403):
        return Verdict(False, f"{status} {code}".strip(), status=status, misconfigured=True)
    if status == 409 and code == "UNIT_TAKEN":
        # Units held elsewhere are sold: they must not go back on sale, or the next buyer
        # is refused too. An endpoint that does not say which: keep them all back.
        reported = data.get("units")
        held = {u for u in reported if isinstance(u, int)} if isinstance(reported, list) else set()
        return Verdict(False, "UNIT_TAKEN", tuple(u for u in units if u in held) if held else units,
                       status=status)
    if status == 409:
        return Verdict(True)  # the endpoint has this order already
    return Verdict(False, f"{status} {code}".strip(), status=status)


def retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


