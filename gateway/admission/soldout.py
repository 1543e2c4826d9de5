"""The one owner of "sold out": no units left anywhere in a sale.

Decided only after a consistent read of every shard (see ``admission.moves``), kept
in Redis as a flag that every gateway process reads, and remembered in each process for
``memory_ttl`` seconds so that a crowd on an empty sale does not re-read it per request.
Units that come back (a refused delivery) clear it: ``units_returned``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.store.store import Store


@dataclass(slots=True)
class SoldOut:
    store: Store
    memory_ttl: float = 0.5
    _known_until: dict[str, float] = field(default_factory=dict)

    def known(self, sku: str) -> bool:
        """Known, within the last ``memory_ttl`` seconds, to have no units anywhere."""
        return self._known_until.get(sku, 0.0) > time.monotonic()

    async def flagged(self, sku: str) -> bool:
        """Whether another process (or this one) found the sale sold out; remembered."""
        if await self.store.sold_out_flag(sku):
            self._remember(sku)
            return True
        return False

    async def confirm(self, sku: str) -> None:
        """A consistent read of every shard found no unit and no move in flight."""
        await self.store.set_sold_out_flag(sku, True)
        self._remember(sku)

    async def units_returned(self, sku: str) -> None:
        """Units came back to the sale: whatever was known about it is stale."""
        self._known_until.pop(sku, None)
        await self.store.set_sold_out_flag(sku, False)

    def forget(self, sku: str) -> None:
        self._known_until.pop(sku, None)

    def _remember(self, sku: str) -> None:
        if len(self._known_until) > 10_000:
            self._known_until.clear()
        self._known_until[sku] = time.monotonic() + self.memory_ttl
