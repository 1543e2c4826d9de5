"""The scripts of a sale's life in Redis: ``claim_sale.lua`` and ``sale_state.lua`` (its
registry record), ``create_shard.lua`` and ``close_shard.lua`` (each shard). Their
arguments and replies are known here only."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.models import Sale
from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

CLAIM = Script.load("claim_sale")
STATE = Script.load("sale_state")
CREATE_SHARD = Script.load("create_shard")
CLOSE_SHARD = Script.load("close_shard")


class Claim(enum.IntEnum):
    CLAIMED = 0
    RESUME = 1        # the same sale's creation is under way or was cut off: go on with it
    TAKEN = 2         # a sale exists, or another is being created or deleted
    STALE = 3         # a creation or deletion over its lease: undo or finish it first


@dataclass(frozen=True, slots=True)
class ClaimReply:
    claim: Claim
    generation: str = ""
    state: str = ""


def record_fields(sale: Sale) -> list[str | int | float]:
    """The registry record of a sale, as field, value, ..."""
    return ["stock", sale.stock, "price", sale.price, "per_user_limit", sale.per_user_limit,
            "shards", sale.shards, "created_at", sale.created_at, "starts_at", sale.starts_at,
            "ends_at", sale.ends_at, "payment_ttl", sale.payment_ttl, "admit_rate", sale.admit_rate]


async def claim(runner: ScriptRunner, registry: str, sale: Sale, now_ms: int,
                lease_ms: int) -> ClaimReply:
    raw = await CLAIM(runner, (registry,),
                      (sale.params, sale.generation, now_ms, lease_ms, *record_fields(sale)))
    kind = Claim(int(raw[0]))
    if kind is Claim.TAKEN:
        return ClaimReply(kind, state=raw[1])
    return ClaimReply(kind, raw[1], raw[2] if len(raw) > 2 else "")


async def set_state(runner: ScriptRunner, registry: str, generation: str, state: str,
                    lease_until_ms: int = 0) -> bool:
    """``creating`` (renew the lease), ``ready``, ``deleting`` or ``gone``; False: the
    SKU belongs to another generation (or, to renew, is no longer being created)."""
    return bool(int(await STATE(runner, (registry,), (generation, state, lease_until_ms))))


class Shard(enum.IntEnum):
    CLOSED = -2            # this generation's shard was closed: the sale is gone
    OTHER_GENERATION = -1
    EXISTED = 0
    CREATED = 1


async def create_shard(runner: ScriptRunner, shard: ShardKeys, sale: Sale) -> Shard:
    lo, hi = sale.shard_range(shard.shard)
    raw = await CREATE_SHARD(runner, (shard.stock, shard.units, shard.closed),
                             (lo, hi, sale.per_user_limit, sale.price, sale.shards,
                              sale.generation, sale.starts_at, sale.ends_at, sale.payment_ttl))
    return Shard(int(raw))


async def close_shard(runner: ScriptRunner, shard: ShardKeys, generation: str,
                      remember_ms: int) -> list[str] | None:
    """Close the shard (``generation`` "": whichever is there); the order numbers it
    admitted, or None when the shard belongs to another generation (left alone)."""
    raw = await CLOSE_SHARD(runner, shard.closing_keys(), (generation, remember_ms))
    if int(raw[0]) == 0:
        return None
    return [str(order_no) for order_no in raw[1:]]
