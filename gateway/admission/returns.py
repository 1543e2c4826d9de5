"""Units that come back to a sale: the one path by which a purchase is undone.

A delivery the endpoint refused (``rejected``), or an order left unpaid past its
deadline or cancelled before payment (``released``, by the orders service through
``POST /admin/orders/{no}/release``). The units go back to the purchase's shard, the
buyer's per-user count is freed, and the sale is no longer known to be sold out, so the
next buyers get those units. A repeat moves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.admission.soldout import SoldOut
from gateway.models import Order
from gateway.store.scripts.compensate import Compensated, Result
from gateway.store.store import Store

RELEASE_REASONS = ("expired", "cancelled")


@dataclass(slots=True)
class Returns:
    store: Store
    sold_out: SoldOut

    async def reject(self, order: Order, reason: str, keep_units: Iterable[int] = ()) -> Compensated:
        """The endpoint refused the order; ``keep_units`` it says another order holds
        (they stay sold). Safe to repeat."""
        return (await self._give_back(order, reason, keep_units, "rejected")).outcome

    async def release(self, order: Order, reason: str) -> Result:
        """Unpaid past its deadline (``expired``) or cancelled (``cancelled``): also a
        delivered order. An order not yet delivered is then never delivered. Safe to
        repeat: the answer says what the order is."""
        return await self._give_back(order, reason, (), "released")

    async def _give_back(self, order: Order, reason: str, keep_units: Iterable[int],
                         status: str) -> Result:
        # Announced before, counted after: no sold-out mark can be set in between on a
        # read of the shards made before the units were back (see mark_sold_out.lua).
        await self.store.count_return(order, "begin")
        result = await self.store.compensate(order, reason, keep_units, status)
        # Also after ALREADY: a return that ran before a Redis error may not have been
        # counted; a needless count only costs the next sold-out check one more read.
        await self.store.count_return(order, "cancel" if result.outcome is Compensated.NO_ORDER
                                      else "end")
        self.sold_out.forget(order.sku)
        return result
