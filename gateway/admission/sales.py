"""A short-lived, per-process memory of sales, so the purchase path needs no extra
Redis read. Sales do not change once created; a deleted or re-created sale is caught by
the purchase script (SALE_NOT_FOUND, SHARDS_MISMATCH), which drops the entry.

A miss is read once however many requests meet it: the first starts the read, the
others wait for it. At a sale's first second (or a fresh process's) thousands of
requests miss at once; a read each would be thousands of concurrent Redis calls (and,
through redis-py's Cluster client, a new connection each), enough to pass the requests'
deadlines."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.aio import SingleFlight
from gateway.models import Sale
from gateway.store.store import Store

FOUND_TTL = 5.0
MISSING_TTL = 0.5
MAX_ENTRIES = 10_000


@dataclass(slots=True)
class _Entry:
    sale: Sale | None
    expires: float


@dataclass(slots=True)
class SaleCache:
    store: Store
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _reads: SingleFlight[str, Sale | None] = field(default_factory=SingleFlight)  # one per SKU

    async def get(self, sku: str) -> Sale | None:
        entry = self._entries.get(sku)
        if entry is not None and entry.expires >= time.monotonic():
            return entry.sale
        # A waiter cancelled (its deadline) stops waiting; the read goes on for the others
        # and is remembered. A failed read fails every waiter and is not remembered.
        return await self._reads.run(sku, lambda: self._read(sku))

    async def _read(self, sku: str) -> Sale | None:
        started = time.monotonic()
        sale = await self.store.get_sale(sku)
        if self._reads.running(sku) is asyncio.current_task():  # else forgotten meanwhile
            if len(self._entries) > MAX_ENTRIES:
                self._entries.clear()
            self._entries[sku] = _Entry(sale, started + (FOUND_TTL if sale else MISSING_TTL))
        return sale

    def cached(self, sku: str) -> Sale | None:
        """The sale as this process remembers it (no Redis call; None: not remembered)."""
        entry = self._entries.get(sku)
        return entry.sale if entry is not None else None

    def forget(self, sku: str) -> None:
        """Drop what is remembered of ``sku``. A read under way is not remembered when it
        ends, and the next ``get`` reads again (it would not see a change made before the
        forget, e.g. the sale deleted and created again)."""
        self._entries.pop(sku, None)
        self._reads.forget(sku)
