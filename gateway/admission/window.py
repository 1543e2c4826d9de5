"""A sale's window: no purchase before ``starts_at``, none after ``ends_at``.

Checked first from the process's memory of the sale (a crowd polling before the start
costs no Redis call), and again by the purchase script on Redis's clock, so that a
process whose clock or memory is off cannot admit outside the window. Nothing is
recorded either way: a key sent too early is still good at the start.
"""

from __future__ import annotations

import math

from gateway.admission.outcomes import Outcome
from gateway.clock import sale_time_text, to_rfc3339
from gateway.models import Sale

# Returned, not raised: a crowd polling before the start is the hot case, and an answer
# returned costs ~4 µs less than one raised through the middleware.
ENDED_BODY = {"code": "SALE_ENDED", "message": "the sale has ended"}
_ENDED = Outcome(410, ENDED_BODY)


def outside(sale: Sale, now: int) -> Outcome | None:
    """The refusal of a purchase at ``now`` (None: the window is open)."""
    if sale.starts_at and now < sale.starts_at:
        return not_started(sale.starts_at, now)
    if sale.ends_at and now >= sale.ends_at:
        return ended()
    return None


def not_started(starts_at: int, now: int) -> Outcome:
    wait = max(1, math.ceil((starts_at - now) / 1000))
    return Outcome(403, {"code": "SALE_NOT_STARTED", "message": "the sale has not started yet",
                         "starts_at": sale_time_text(starts_at), "server_time": to_rfc3339(now)},
                   {"Retry-After": str(wait)})


def ended() -> Outcome:
    return _ENDED
