"""A consistent view of a sale that is being sold while it is read.

A sale's state is spread over its shards (a slot each on Cluster), so no single read
sees all of it at one moment. Reading twice and getting the same change counters both
times proves nothing changed in between: the read is a true snapshot (the "double
collect"). The purchase path uses it to decide ``SOLD_OUT``, the admin API to report
stock, and the load verifier to check the invariants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from gateway.models import Sale, ShardState, Transfer
from gateway.store.store import Store

T = TypeVar("T")


async def until_stable(read: Callable[[], Awaitable[T]], fingerprint: Callable[[T], Hashable],
                       *, attempts: int = 5, pause: float = 0.0,
                       first: T | None = None) -> tuple[T, bool]:
    """Read until two successive reads have the same fingerprint. Returns the last read
    and whether it was confirmed (False: it kept changing for ``attempts`` reads)."""
    last = first if first is not None else await read()
    for _ in range(attempts):
        again = await read()
        if fingerprint(again) == fingerprint(last):
            return again, True
        last = again
        if pause:
            await asyncio.sleep(pause)
    return last, False


def shards_fingerprint(states: list[ShardState]) -> Hashable:
    """What changes whenever units enter or leave a shard's free ranges (a purchase
    changes ``remaining``; a move or a compensation ``version``) or a move is recorded."""
    return tuple((s.remaining, s.version, tuple(sorted(s.transfers_out))) for s in states)


def transfers_of(state: ShardState) -> list[Transfer]:
    return [Transfer.parse(tid, state.shard, record) for tid, record in state.transfers_out.items()]


@dataclass(frozen=True, slots=True)
class SaleSnapshot:
    sale: Sale
    states: list[ShardState]
    in_transfer: int      # units taken out of a donor and not yet added to a receiver
    consistent: bool      # two successive reads agreed

    @property
    def remaining(self) -> int:
        return sum(s.remaining for s in self.states)

    @property
    def sold(self) -> int:
        return sum(s.sold for s in self.states)

    @property
    def released(self) -> int:
        """Units given back to the sale (refused, expired, cancelled orders)."""
        return sum(s.returned for s in self.states)

    @property
    def sold_out(self) -> bool:
        return self.remaining == 0 and self.in_transfer == 0


async def read_sale(store: Store, sale: Sale) -> SaleSnapshot:
    """Every shard, and which recorded moves their receivers have applied already (a
    move's units count once: in the receiver if applied, else in transfer)."""

    async def read() -> tuple[list[ShardState], int]:
        states = await store.shard_states(sale)
        pending = [t for state in states for t in transfers_of(state)]
        by_receiver: dict[int, list[str]] = {}
        for move in pending:
            by_receiver.setdefault(move.receiver, []).append(move.transfer_id)
        applied = await store.applied_transfers(sale, by_receiver)
        return states, sum(t.count for t in pending if t.transfer_id not in applied)

    (states, in_transfer), consistent = await until_stable(
        read, lambda result: shards_fingerprint(result[0]))
    return SaleSnapshot(sale, states, in_transfer, consistent)
