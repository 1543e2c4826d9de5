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
    ALREADY = 0   # nothing to do: the order is rejected or released already (or delivered)
    DONE = 1


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Compensated
    returned: int = 0   # units back in the shard
    status: str = ""    # ALREADY: the order's status


async def run(runner: ScriptRunner, shard: ShardKeys, order_no: str, idempotency_key: str,
              reason: str, keep_units: Iterable[int] = (), status: str = "rejected") -> Result:
    """``status``: ``rejected`` (the endpoint refused it) or ``released`` (unpaid in
    time, or cancelled: also from ``delivered``)."""
    raw = await SCRIPT(runner,
                       (shard.order(order_no), shard.stock, shard.units, shard.buyers,
                        idempotency_key),
                       (reason, ",".join(str(u) for u in keep_units), status))
    outcome = Compensated(int(raw[0]))
    if outcome is Compensated.DONE:
        return Result(outcome, int(raw[1]))
    if outcome is Compensated.ALREADY:
        return Result(outcome, status=str(raw[1]))
    return Result(outcome)
