"""A short-lived, per-process memory of sales, so the purchase path needs no extra
Redis read. Sales do not change once created; a deleted or re-created sale is caught by
the purchase script (SALE_NOT_FOUND, SHARDS_MISMATCH), which drops the entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.models import Sale
from gateway.store.store import Store

FOUND_TTL = 5.0
MISSING_TTL = 0.5


@dataclass(slots=True)
class _Entry:
    sale: Sale | None
    expires: float


@dataclass(slots=True)
class SaleCache:
    store: Store
    _entries: dict[str, _Entry] = field(default_factory=dict)

    async def get(self, sku: str) -> Sale | None:
        now = time.monotonic()
        entry = self._entries.get(sku)
        if entry is None or entry.expires < now:
            sale = await self.store.get_sale(sku)
            entry = _Entry(sale, now + (FOUND_TTL if sale else MISSING_TTL))
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[sku] = entry
        return entry.sale

    def cached(self, sku: str) -> Sale | None:
        """The sale as this process remembers it (no Redis call; None: not remembered)."""
        entry = self._entries.get(sku)
        return entry.sale if entry is not None else None

    def forget(self, sku: str) -> None:
        self._entries.pop(sku, None)
