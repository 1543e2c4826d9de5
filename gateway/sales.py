"""A short-lived, per-process memory of sales, so the purchase path needs no extra
Redis read. Sales do not change once created; a deleted or re-created sale is caught by
the purchase script (SALE_NOT_FOUND, SHARDS_MISMATCH), which drops the entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .models import Sale
from .store import Store

FOUND_TTL = 5.0
MISSING_TTL = 0.5
SOLD_OUT_TTL = 0.5


@dataclass(slots=True)
class _Entry:
    sale: Sale | None
    expires: float
    sold_out_until: float = 0.0


@dataclass(slots=True)
class SaleCache:
    store: Store
    _entries: dict[str, _Entry] = field(default_factory=dict)

    async def get(self, sku: str) -> Sale | None:
        now = time.monotonic()
        entry = self._entries.get(sku)
        if entry is None or entry.expires < now:
            sale = await self.store.get_sale(sku)
            sold_out = bool(sale) and await self.store.is_sold_out(sku)
            entry = _Entry(sale, now + (FOUND_TTL if sale else MISSING_TTL),
                           now + SOLD_OUT_TTL if sold_out else 0.0)
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[sku] = entry
        return entry.sale

    def sold_out(self, sku: str) -> bool:
        """Known, within the last SOLD_OUT_TTL seconds, to have no units anywhere."""
        entry = self._entries.get(sku)
        return entry is not None and entry.sold_out_until > time.monotonic()

    def mark_sold_out(self, sku: str) -> None:
        entry = self._entries.get(sku)
        if entry is not None:
            entry.sold_out_until = time.monotonic() + SOLD_OUT_TTL

    def forget(self, sku: str) -> None:
        self._entries.pop(sku, None)
