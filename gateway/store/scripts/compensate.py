"""``compensate.lua``: its arguments and its reply."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

SCRIPT = Script.load("compensate")


class Compensated(enum.IntEnum):
    NO_ORDER = -1
    ALREADY = 0
    DONE = 1


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Compensated
    returned: int = 0  # units back in the shard


async def run(runner: ScriptRunner, shard: ShardKeys, order_no: str, idempotency_key: str,
              reason: str, keep_units: Iterable[int] = ()) -> Result:
    raw = await SCRIPT(runner,
                       (shard.order(order_no), shard.stock, shard.units, shard.buyers,
                        idempotency_key),
                       (reason, ",".join(str(u) for u in keep_units)))
    outcome = Compensated(int(raw[0]))
    return Result(outcome, int(raw[1]) if outcome is Compensated.DONE else 0)
