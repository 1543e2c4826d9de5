"""The one owner of "sold out": no units left anywhere in a sale.

Decided only after a consistent read of every shard (``admission.moves``) and recorded
in Redis only if no unit came back since the decision began (``mark_sold_out.lua``
compares a counter of returns: a mark can never outlive units given back). Every gateway
process reads it, and remembers it for ``memory_ttl`` seconds so that a crowd on an
empty sale does not re-read it per request. ``units_returned`` is the other side: a
refused, expired or cancelled order gave units back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.models import Sale
from gateway.store.store import SoldOutState, Store


@dataclass(slots=True)
class SoldOut:
    store: Store
    memory_ttl: float = 0.5
    _known_until: dict[str, float] = field(default_factory=dict)

    def known(self, sku: str) -> bool:
        """Known, within the last ``memory_ttl`` seconds, to have no units anywhere."""
        return self._known_until.get(sku, 0.0) > time.monotonic()

    async def read(self, sale: Sale) -> SoldOutState:
        """The shared state, read before a consistent read of the shards (its counter
        of returns is what ``confirm`` compares); remembered when sold out."""
        state = await self.store.sold_out_state(sale)
        if state.sold_out:
            self._remember(sale.sku)
        return state

    async def confirm(self, sale: Sale, seen: SoldOutState) -> bool:
        """A consistent read of every shard, begun after ``seen`` was read, found no unit
        and no move in flight. Recorded (and True) unless units came back meanwhile."""
        if await self.store.mark_sold_out(sale, seen):
            self._remember(sale.sku)
            return True
        return False

    async def units_returned(self, sku: str) -> None:
        """Units came back to the sale: whatever was known about it is stale."""
        self._known_until.pop(sku, None)
        await self.store.count_return(sku)

    def forget(self, sku: str) -> None:
        self._known_until.pop(sku, None)

    def _remember(self, sku: str) -> None:
        if len(self._known_until) > 10_000:
            self._known_until.clear()
        self._known_until[sku] = time.monotonic() + self.memory_ttl
