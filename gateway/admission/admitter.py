"""The admitter: lets a sale's waiting tickets through, at the sale's rate, in order.

One gateway process admits for a sale at a time: the holder of its lease
(``queue_lease.lua``), renewed every tick; when the holder dies, any process serving
the sale's joins or polls takes over once the lease lapses (``lease_ms``). Each tick:

1. read every shard's next tickets from its cursor (``queue_head.lua``, one pipeline
   per node), with their scores and the shard's free units;
2. merge them by score (join time after the start; the shuffle's random number before
   it): the order of admission across shards;
3. ``queue_advance.lua`` admits from that order while the rate's bucket (kept in Redis,
   by Redis's clock) holds one, moves the cursors (only forward) and publishes the
   units left and whether the sale is sold out.

Admission pauses (the bucket still fills, up to one second's burst) before the start,
after the end and while the sale is sold out; it resumes when units come back. A second
admitter running for a while (a lease taken over from a process that was only slow)
costs nothing: the script admits only the ticket at each stored cursor and spends the
one bucket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from dataclasses import dataclass, field

from gateway.admission.room_state import RoomState
from gateway.admission.snapshot import read_sale
from gateway.admission.soldout import SoldOut
from gateway.admission.waiting_room import WaitingRoom
from gateway.clock import now_ms
from gateway.logs import LogThrottle
from gateway.models import Sale
from gateway.store.connection import is_redis_failure
from gateway.store.scripts.queue import Advance, SaleChanged
from gateway.store.store import Store

log = logging.getLogger("gateway.admitter")


@dataclass(slots=True)
class Admitter:
    store: Store
    sold_out: SoldOut
    room: WaitingRoom
    every: float = 0.1
    lease_ms: int = 1000
    max_read: int = 1000  # tickets read per shard and tick at most
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    throttle: LogThrottle = field(default_factory=LogThrottle)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            for sale in list(self.room.active.values()):
                try:
                    await self.tick(sale)
                except SaleChanged:
                    self.room.forget(sale.sku)
                    self.room.sales.forget(sale.sku)
                except Exception as exc:  # the loop must outlive any one tick
                    if not is_redis_failure(exc) and self.throttle.allow("tick"):
                        log.exception("admitter tick failed", extra={"sku": sale.sku})

    async def tick(self, sale: Sale) -> int:
        """One round for the sale; how many tickets it admitted (0: not the lease holder)."""
        if not sale.admit_rate or not await self.store.queue_lease(sale.sku, self.owner,
                                                                    self.lease_ms):
            return 0
        state = RoomState.parse(await self.store.queue_state(sale.sku), sale.generation)
        cursors = [state.cursor(shard) for shard in range(sale.shards)]
        now = now_ms()
        open_now = now >= sale.starts_at and not (sale.ends_at and now >= sale.ends_at)
        burst = max(1.0, sale.admit_rate)  # one second's worth, and at least one admission
        count = 0
        if open_now:
            # What the bucket may hold now, generously: the script spends only what it has.
            elapsed = max(0, now - state.last_ms) if state.last_ms else 0
            budget = min(burst, state.tokens + elapsed * sale.admit_rate / 1000)
            count = min(self.max_read, math.ceil(budget + sale.admit_rate * self.every * 2) + 1)
        heads = await self.store.queue_heads(sale, cursors, count)
        units_left = sum(head.remaining for head in heads)
        sold_out = units_left == 0 and await self._sold_out(sale)
        order: list[int] = []
        if open_now and not sold_out and all(head.sealed for head in heads):
            merged = sorted((score, shard) for shard, head in enumerate(heads)
                            for score in head.scores)
            order = [shard for _, shard in merged[:count]]
        admitted, _ = await self.store.queue_advance(sale, Advance(
            generation=sale.generation, units_left=units_left, rate=sale.admit_rate,
            burst=burst, sold_out=sold_out, joined=sum(head.length for head in heads),
            base=cursors, order=order))
        if sale.ends_at and now >= sale.ends_at:
            self.room.active.pop(sale.sku, None)  # over: published one last time
        return admitted

    async def _sold_out(self, sale: Sale) -> bool:
        """No free unit in any shard: sold out, or units in a move between shards? Decided
        as the purchase path decides it (a consistent read, recorded with the count of
        returns it began with), so that a waiting room never says SOLD_OUT while units
        are left."""
        seen = await self.sold_out.read(sale)
        if seen.sold_out:
            return True
        snapshot = await read_sale(self.store, sale)
        return snapshot.consistent and snapshot.sold_out and await self.sold_out.confirm(sale, seen)
