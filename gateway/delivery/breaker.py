"""The delivery breaker: a wrong upstream must not empty a sale.

Every refusal from the endpoint (a 4xx) gives the order's units back. An endpoint that
refuses everything (a wrong ``SECKILL_UPSTREAM_URL`` answering 404, a credential it does
not accept) would so reject every admitted order. So:

- 401 or 403 is a configuration fault, never a refusal: delivery pauses at once and
  nothing is given back;
- ``threshold`` refusals in a row with the same status, for distinct orders, pause
  delivery too (the last of them is not given back); a success in between resets the
  count, so a genuine refusal of one order among successes still gives its units back;
  ``UNIT_TAKEN`` (a unit another order holds: a Redis failover lost a write) is always
  genuine and never counts.

While paused, nothing is posted but one probe every ``probe_every`` seconds: a delivery
the endpoint accepts resumes delivery; an admin can resume it too. Deliveries cut off
by the pause stay pending and are posted again once it resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gateway.relay")


@dataclass(slots=True)
class Breaker:
    threshold: int = 5
    probe_every: float = 5.0
    reason: str = ""               # why delivery is paused ("": it is not)
    since: float = 0.0             # time.time() of the pause
    _streak: int = 0
    _streak_status: int = 0
    _streak_orders: set[str] = field(default_factory=set)
    _running: asyncio.Event = field(default_factory=asyncio.Event)
    _next_probe: float = 0.0       # loop time of the next probe allowed
    trips: int = 0

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("threshold must be at least 1")
        self._running.set()

    @property
    def paused(self) -> bool:
        return bool(self.reason)

    def state(self) -> dict[str, Any]:
        if not self.paused:
            return {"state": "delivering"}
        return {"state": "paused", "reason": self.reason, "since": round(self.since, 3)}

    def delivered(self) -> None:
        """The endpoint accepted an order: it works; a pause (a probe) ends."""
        self._streak, self._streak_status = 0, 0
        self._streak_orders.clear()
        if self.paused:
            log.warning("relay: delivery resumed (the endpoint accepted an order)",
                        extra={"paused_for_s": round(time.time() - self.since, 1)})
            self.resume()

    def refused(self, status: int, order_no: str, misconfigured: bool) -> bool:
        """The endpoint refused an order. True: give its units back; False: delivery is
        (now) paused and the order waits to be posted again."""
        if misconfigured:
            self._pause(f"the endpoint answered {status}: it refuses the relay's credentials "
                        f"(SECKILL_UPSTREAM_TOKEN); nothing is given back")
            return False
        if self.paused:
            return False
        if status != self._streak_status:
            self._streak, self._streak_status = 0, status
            self._streak_orders.clear()
        if order_no not in self._streak_orders:
            self._streak_orders.add(order_no)
            self._streak += 1
        if self._streak >= self.threshold:
            self._pause(f"{self._streak} orders in a row refused with {status}: a wrong "
                        f"SECKILL_UPSTREAM_URL? nothing more is given back")
            return False
        return True

    def resume(self) -> None:
        """Deliver again (a probe succeeded, or an admin said so)."""
        self.reason = ""
        self._streak, self._streak_status = 0, 0
        self._streak_orders.clear()
        self._running.set()

    async def may_post(self) -> bool:
        """Wait until delivery runs, or until this caller may probe a paused endpoint.
        True: post as usual; False: post as the probe (a refusal keeps the pause)."""
        while True:
            if not self.paused:
                return True
            loop = asyncio.get_running_loop()
            wait = self._next_probe - loop.time()
            if wait <= 0:
                self._next_probe = loop.time() + self.probe_every
                return False
            try:
                await asyncio.wait_for(self._running.wait(), wait)
            except TimeoutError:
                pass

    def _pause(self, reason: str) -> None:
        if not self.paused:
            self.trips += 1
            self.since = time.time()
            log.error("relay: delivery paused", extra={"reason": reason})
            self._next_probe = asyncio.get_running_loop().time() + self.probe_every
        self.reason = reason
        self._running.clear()
