"""``mark_delivered.lua``: its arguments and its reply."""

from __future__ import annotations

import enum

from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

SCRIPT = Script.load("mark_delivered")


class Delivered(enum.IntEnum):
    NO_ORDER = -1
    UNCHANGED = 0
    MARKED = 1


async def run(runner: ScriptRunner, shard: ShardKeys, order_no: str,
              idempotency_key: str) -> Delivered:
    raw = await SCRIPT(runner, (shard.order(order_no), idempotency_key), ())
    return Delivered(int(raw))
