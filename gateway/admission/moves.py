"""Moving units between shards, so that no buyer hears "sold out" while units are left.

A purchase only takes units from its own shard (one slot, one atomic script). When
that shard runs short, units move to it from the shard holding the most:

1. ``transfer_out.lua`` on the donor takes a unit range and writes a transfer record;
2. ``transfer_in.lua`` on the receiver adds the range, keyed by the transfer id, so a
   repeat adds nothing;
3. the donor's transfer record is deleted.

At every moment each unit is in a shard, sold, or in a transfer record whose id the
receiver has not applied. A crash between the steps leaves a record; ``sweep``
finishes it (steps 2 and 3 are safe to run any number of times, by anyone).

A sale is sold out only when two successive reads of every shard (remaining units,
change counter, transfer records) are equal, all empty and with no transfer pending:
the double collect gives a consistent snapshot without stopping the sale.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.admission.snapshot import shards_fingerprint, transfers_of, until_stable
from gateway.aio import cancel_and_wait
from gateway.models import Sale, ShardState, Transfer
from gateway.store.connection import is_redis_failure
from gateway.store.store import SoldOutState, Store


class Refill(enum.Enum):
    MOVED = "moved"          # units moved into the receiver (or a pending transfer finished)
    RETRY = "retry"          # things changed under us; try the purchase again
    SOLD_OUT = "sold_out"    # the whole sale has no units left
    INSUFFICIENT = "insufficient"  # units are left, but fewer than this purchase needs


@dataclass(slots=True)
class Rebalancer:
    store: Store
    max_rounds: int = 4
    _in_flight: dict[tuple[str, str, int], asyncio.Task[tuple[Refill, SoldOutState]]] = \
        field(default_factory=dict)
    # Units asked for by the callers of each running refill (the first and those who
    # joined it): the demand on the receiving shard right now.
    _demand: dict[tuple[str, str, int], int] = field(default_factory=dict)
    _waiting: dict[tuple[str, str, int], int] = field(default_factory=dict)
    moves: int = 0
    on_move: Callable[[], None] | None = None  # e.g. Metrics.moves.inc

    async def refill(self, sale: Sale, receiver: int, need: int) -> tuple[Refill, SoldOutState]:
        """Bring at least ``need`` units into ``receiver``. Concurrent callers for one
        shard share one refill, so a crowd on an empty shard triggers one move; the
        refill brings what the whole crowd needs (see ``_demand``). The refill runs as a
        task of its own: a caller that is cancelled (its client went away, its deadline
        passed) only stops waiting, and the others still get the result. With the result
        comes the sale's sold-out state as read before the refill's first read of the
        shards: what a SOLD_OUT is to be recorded against (``SoldOut.confirm``)."""
        key = (sale.sku, sale.generation, receiver)
        running = self._in_flight.get(key)
        if running is not None:
            self._demand[key] += need
            self._waiting[key] += 1
            result, seen = await asyncio.shield(running)
            # "Insufficient" was judged against the first caller's quantity; a caller
            # asking for fewer units may still be served: let it try again.
            return (Refill.RETRY if result is Refill.INSUFFICIENT else result), seen
        task = asyncio.get_running_loop().create_task(self._refill_reading(sale, receiver, need))
        self._in_flight[key] = task
        self._demand[key] = need
        self._waiting[key] = 1

        def finished(done: asyncio.Task[tuple[Refill, SoldOutState]]) -> None:
            del self._in_flight[key], self._demand[key], self._waiting[key]
            if not done.cancelled():
                done.exception()  # retrieved: the callers that still wait re-raise it

        task.add_done_callback(finished)
        return await asyncio.shield(task)

    async def _refill_reading(self, sale: Sale, receiver: int,
                              need: int) -> tuple[Refill, SoldOutState]:
        seen = await self.store.sold_out_state(sale)
        return await self._refill(sale, receiver, need), seen

    async def aclose(self) -> None:
        """Stop refills still running (the gateway is shutting down)."""
        await cancel_and_wait(list(self._in_flight.values()))

    def refilling(self, sku: str, shard: int) -> int:
        """How many callers wait on the refill of ``shard`` (0: none running)."""
        return sum(n for (s, _, r), n in self._waiting.items() if (s, r) == (sku, shard))

    async def _refill(self, sale: Sale, receiver: int, need: int) -> Refill:
        key = (sale.sku, sale.generation, receiver)
        moved_any = False
        for _ in range(self.max_rounds):
            states = await self.store.shard_states(sale)
            have = states[receiver].remaining
            if need <= have:
                return Refill.MOVED
            pending = [t for s in states for t in transfers_of(s)]
            left = sum(s.remaining for s in states) + sum(t.count for t in pending)
            # Shards this process is refilling have buyers waiting for their units:
            # taking those back would only start a tug of war over the last units.
            busy = {shard for sku, generation, shard in self._in_flight
                    if (sku, generation) == (sale.sku, sale.generation) and shard != receiver}
            donors = sorted((s for s in states
                             if s.shard != receiver and s.remaining > 0 and s.shard not in busy),
                            key=lambda s: s.remaining, reverse=True)
            if left < need or not donors:
                # Too few units to serve this shard (or all of them wanted elsewhere):
                # move nothing; decide from a consistent view of the whole sale.
                if pending:
                    await self.finish(sale, pending)
                    return Refill.MOVED
                if left < need and await self._same_twice(sale, states):
                    return Refill.SOLD_OUT if left == 0 else Refill.INSUFFICIENT
                if left >= need:
                    return Refill.MOVED if moved_any else Refill.RETRY
                continue
            # Bring what every caller waiting on this refill needs, not only the first:
            # units for one buyer at a time would leave the rest of a crowd retrying
            # (and running out of attempts) while units sit in other shards. And take
            # at least half of a donor's units: one move serves the next buyers too.
            short = max(self._demand.get(key, need), need) - have
            moved = 0
            for donor in donors:
                moved += await self.move(sale, donor.shard, receiver,
                                         max(short - moved, donor.remaining // 2))
                if moved >= short:
                    return Refill.MOVED
            moved_any = moved_any or moved > 0
        return Refill.MOVED if moved_any else Refill.RETRY

    async def move(self, sale: Sale, donor: int, receiver: int, want: int) -> int:
        """One whole move; returns how many units arrived at the receiver."""
        transfer_id = uuid.uuid4().hex
        out = await self.store.transfer_out(sale, donor, receiver, want, transfer_id)
        if out is None or out[0] == 0:
            return 0
        count, ranges = out
        transfer = Transfer(transfer_id, donor, receiver, ranges, count, 0)
        await self.store.transfer_in(sale, transfer)
        await self.store.transfer_done(sale, transfer)
        self.moves += 1
        if self.on_move is not None:
            self.on_move()
        return count

    async def finish(self, sale: Sale, transfers: list[Transfer]) -> None:
        """Complete transfers left half-done (steps 2 and 3 again; both idempotent)."""
        for transfer in transfers:
            await self.store.transfer_in(sale, transfer)
            await self.store.transfer_done(sale, transfer)

    async def sweep(self, sale: Sale, older_than_ms: int = 0, now_ms: int | None = None) -> int:
        """Finish every transfer record older than ``older_than_ms``; returns how many."""
        return await self._finish_stale(sale, await self.store.shard_states(sale),
                                        older_than_ms, now_ms)

    async def sweep_forever(self, every: float = 2.0, older_than_ms: int = 5000,
                            observe: Callable[[dict[str, int]], None] | None = None) -> None:
        """Finish moves that a crashed process left half-done, in every sale; ``observe``
        sees every sale's remaining units from the same read (e.g. to set a gauge)."""
        while True:
            await asyncio.sleep(every)
            try:
                remaining: dict[str, int] = {}
                for sku in await self.store.list_sales():
                    sale = await self.store.get_sale(sku)
                    if sale is None:
                        continue
                    states = await self.store.shard_states(sale)
                    remaining[sku] = sum(s.remaining for s in states)
                    await self._finish_stale(sale, states, older_than_ms)
                if observe is not None:
                    observe(remaining)
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise

    async def _finish_stale(self, sale: Sale, states: list[ShardState], older_than_ms: int,
                            now_ms: int | None = None) -> int:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        stale = [t for s in states for t in transfers_of(s) if now_ms - t.started_ms >= older_than_ms]
        await self.finish(sale, stale)
        return len(stale)

    async def _same_twice(self, sale: Sale, first: list[ShardState]) -> bool:
        """True when a second read of every shard equals the first (remaining units,
        change counters, transfer records) with no transfer pending: nothing moved in
        between, so the first read was a true snapshot of an empty-handed sale."""
        if any(s.transfers_out for s in first):
            return False
        _, same = await until_stable(lambda: self.store.shard_states(sale), shards_fingerprint,
                                     attempts=1, first=first)
        return same
