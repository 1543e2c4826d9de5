"""Return codes of the Lua scripts, named once. The scripts' headers list them too."""

from __future__ import annotations

from enum import IntEnum


class Purchase(IntEnum):
    """First element of ``purchase.lua``'s reply."""

    OK = 0
    DUPLICATE = 1
    KEY_REUSED = 2
    ALREADY_PURCHASED = 3
    SOLD_OUT = 4
    NEED_UNITS = 5
    SALE_NOT_FOUND = 6
    SHARDS_MISMATCH = 7
    BAD_QUANTITY = 8


class Created(IntEnum):
    """Reply of ``create_shard.lua``."""

    EXISTED = 0
    CREATED = 1


class TransferIn(IntEnum):
    """Reply of ``transfer_in.lua``."""

    NO_SHARD = -1
    ALREADY_APPLIED = 0
    APPLIED = 1


TRANSFER_OUT_NO_SHARD = -1
"""First element of ``transfer_out.lua``'s reply when the donor shard is gone."""


class Compensated(IntEnum):
    """First element of ``compensate.lua``'s reply."""

    NO_ORDER = -1
    ALREADY = 0
    DONE = 1


class Delivered(IntEnum):
    """Reply of ``mark_delivered.lua``."""

    NO_ORDER = -1
    UNCHANGED = 0
    MARKED = 1
