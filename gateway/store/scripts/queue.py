"""The waiting room's scripts: ``queue_join.lua``, ``queue_rank.lua`` and
``queue_head.lua`` (a shard's queue), ``queue_advance.lua`` (the sale's admission
state) and ``queue_lease.lua`` (the sale's admitter). Their arguments and replies are
known here only."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

JOIN = Script.load("queue_join")
RANK = Script.load("queue_rank")
HEAD = Script.load("queue_head")
ADVANCE = Script.load("queue_advance")
LEASE = Script.load("queue_lease")

# Writes whose answer a failover must not lose: a place in the queue, and the cursors
# every process answers from. They wait for a replica like purchases do.
_REPLICATED = frozenset({JOIN.sha, ADVANCE.sha})


class SaleChanged(Exception):
    """No shard of the sale's generation: it was deleted (and maybe created again)."""


@dataclass(frozen=True, slots=True)
class Joined:
    rank: int | None   # 0-based, final; None while the shard is not sealed (before the start)
    pre_start: bool    # the place was taken before the start (its rank is learned later)


async def join(runner: ScriptRunner, shard: ShardKeys, user_id: int, generation: str,
               starts_at: int, pre_score: float) -> Joined:
    raw = await JOIN(runner, (shard.stock, shard.queue, shard.queue_meta),
                     (user_id, generation, starts_at, repr(pre_score)))
    if int(raw[0]) == 2:
        raise SaleChanged(shard.sku)
    rank = int(raw[1])
    return Joined(rank if rank >= 0 else None, bool(int(raw[2])))


class Rank(enum.IntEnum):
    FOUND = 0
    NOT_SEALED = 1
    SALE_CHANGED = 2
    NO_PLACE = 3


async def rank(runner: ScriptRunner, shard: ShardKeys, user_id: int, generation: str,
               starts_at: int) -> tuple[Rank, int]:
    """The user's final rank in the shard (FOUND), or why there is none yet."""
    raw = await RANK(runner, (shard.stock, shard.queue, shard.queue_meta),
                     (user_id, generation, starts_at))
    code = Rank(int(raw[0]))
    return code, int(raw[1]) if code is Rank.FOUND else -1


@dataclass(frozen=True, slots=True)
class Head:
    """One shard as the admitter sees it."""

    sealed: bool
    length: int                # tickets in the shard's queue
    remaining: int             # free units in the shard
    scores: tuple[float, ...]  # of the tickets at ranks cursor, cursor + 1, ...


async def head(runner: ScriptRunner, shard: ShardKeys, generation: str, starts_at: int,
               cursor: int, count: int) -> Head:
    raw = await HEAD(runner, (shard.stock, shard.queue, shard.queue_meta),
                     (generation, starts_at, cursor, count))
    if int(raw[0]) == 2:
        raise SaleChanged(shard.sku)
    return Head(bool(int(raw[1])), int(raw[2]), int(raw[3]), tuple(float(s) for s in raw[4:]))


@dataclass(frozen=True, slots=True)
class Advance:
    generation: str
    units_left: int
    rate: float
    burst: float
    sold_out: bool
    joined: int
    base: Sequence[int]    # the cursors the order starts from, one per shard
    order: Sequence[int]   # shard numbers in admission order


async def advance(runner: ScriptRunner, state_key: str, step: Advance) -> tuple[int, int]:
    """Admissions made by this call, and in all."""
    raw = await ADVANCE(runner, (state_key,),
                        (step.generation, step.units_left, repr(step.rate), repr(step.burst),
                         int(step.sold_out), step.joined, ",".join(map(str, step.base)),
                         *step.order))
    return int(raw[0]), int(raw[1])


async def lease(runner: ScriptRunner, lease_key: str, owner: str, lease_ms: int) -> bool:
    return bool(int(await LEASE(runner, (lease_key,), (owner, lease_ms))))


def needs_replicas(sha: str) -> bool:
    """Whether a call of this script writes what a failover must not lose."""
    return sha in _REPLICATED


def must_replicate(sha: str, raw: Any) -> bool:
    """Whether this reply is held until a replica has the write: every reply of a join
    (a place, also one found again) and of an advance (the cursors)."""
    return sha in _REPLICATED and not isinstance(raw, BaseException)
