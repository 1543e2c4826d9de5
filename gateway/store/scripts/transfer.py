"""``transfer_out.lua``, ``transfer_in.lua`` and ``transfer_done.lua``: the three steps
of a unit move."""

from __future__ import annotations

import enum

from gateway.models import Transfer
from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

OUT = Script.load("transfer_out")
IN = Script.load("transfer_in")
DONE = Script.load("transfer_done")

NO_SHARD = -1


class Applied(enum.IntEnum):
    """Reply of ``transfer_in.lua``."""

    NO_SHARD = -1
    ALREADY_APPLIED = 0
    APPLIED = 1


async def take_out(runner: ScriptRunner, donor: ShardKeys, receiver: int, want: int,
                   transfer_id: str, now_ms: int, generation: str) -> tuple[int, str] | None:
    """Step 1: up to ``want`` units leave the donor into a transfer record. Returns
    (count, ranges) (count 0: the donor had none); None when the donor shard is gone.
    Run again with the same id, it answers the same and takes nothing more."""
    raw = await OUT(runner, (donor.stock, donor.units, donor.transfers_out, donor.transfers_done),
                    (transfer_id, receiver, want, now_ms, generation))
    if int(raw[0]) == NO_SHARD:
        return None
    return int(raw[0]), str(raw[1])


async def put_in(runner: ScriptRunner, receiver: ShardKeys, transfer: Transfer,
                 generation: str) -> Applied:
    """Step 2: the receiver adds the transfer's units, once per transfer id."""
    raw = await IN(runner, (receiver.stock, receiver.units, receiver.transfers_in),
                   (transfer.transfer_id, transfer.ranges, transfer.count, generation))
    return Applied(int(raw))


async def finish(runner: ScriptRunner, donor: ShardKeys, transfer_id: str) -> None:
    """Step 3: the donor's record moves from pending to finished."""
    await DONE(runner, (donor.transfers_out, donor.transfers_done), (transfer_id,))
