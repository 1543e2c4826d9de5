"""``create_shard.lua``: its arguments and its reply."""

from __future__ import annotations

import enum

from gateway.models import Sale
from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

SCRIPT = Script.load("create_shard")


class Created(enum.IntEnum):
    EXISTED = 0
    CREATED = 1


async def run(runner: ScriptRunner, shard: ShardKeys, sale: Sale) -> Created:
    lo, hi = sale.shard_range(shard.shard)
    raw = await SCRIPT(runner, (shard.stock, shard.units),
                       (lo, hi, sale.per_user_limit, sale.price, sale.shards, sale.generation))
    return Created(int(raw))
