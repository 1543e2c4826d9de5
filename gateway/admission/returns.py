"""Units that come back to a sale: the one path by which a purchase is undone.

Today: a delivery the endpoint refused (``rejected``). The units go back to the
purchase's shard, the buyer's per-user count is freed, and the sale is no longer known
to be sold out, so the next buyers get those units.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.admission.soldout import SoldOut
from gateway.models import Order
from gateway.store.scripts.compensate import Compensated
from gateway.store.store import Store


@dataclass(slots=True)
class Returns:
    store: Store
    sold_out: SoldOut

    async def reject(self, order: Order, reason: str, keep_units: Iterable[int] = ()) -> Compensated:
        """The endpoint refused the order; ``keep_units`` it says another order holds
        (they stay sold). Safe to repeat."""
        result = await self.store.compensate(order, reason, keep_units)
        if result is not Compensated.NO_ORDER:
            # Units came back: the sale may be buyable again. (Also after ALREADY: a
            # compensation that ran before a Redis error may not have cleared it; a
            # needless clear only costs one consistent read of the sale.)
            await self.sold_out.units_returned(order.sku)
        return result
