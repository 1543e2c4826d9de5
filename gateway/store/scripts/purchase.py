"""``purchase.lua``: its arguments and its reply. The only Python that knows them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from gateway.models import parse_units
from gateway.store.keys import ShardKeys
from gateway.store.scripts import Script, ScriptRunner

SCRIPT = Script.load("purchase")
CLAIM_KEY = Script.load("claim_key")


class Code(enum.IntEnum):
    """First element of the reply."""

    OK = 0
    DUPLICATE = 1
    KEY_REUSED = 2
    ALREADY_PURCHASED = 3
    SHORT = 4          # SOLD_OUT or INSUFFICIENT_STOCK, as the caller asked to record
    NEED_UNITS = 5
    SALE_NOT_FOUND = 6
    SALE_CHANGED = 7   # another sale of the SKU (generation, shard count) is in the shard
    BAD_QUANTITY = 8
    NOT_STARTED = 9    # before the sale's start (by the server's clock): nothing recorded
    ENDED = 10         # after the sale's end: nothing recorded


@dataclass(frozen=True, slots=True)
class Reply:
    """What the script answered, decoded. ``outcome`` is the recorded outcome's code
    (``OK``, ``ALREADY_PURCHASED``, ``SOLD_OUT``, ``INSUFFICIENT_STOCK``): for OK and
    SHORT the outcome of this call, for DUPLICATE the first call's."""

    code: Code
    outcome: str = ""
    order_no: str = ""
    units: tuple[int, ...] = ()
    amount: int = 0
    missing: int = 0
    order_status: str = ""      # DUPLICATE: what became of the order since
    same_attempt: bool = False  # DUPLICATE caused by a resend of this very call
    at_ms: int = 0              # NOT_STARTED: the start; ENDED: the end


@dataclass(frozen=True, slots=True)
class Request:
    user_id: int
    sku: str
    quantity: int
    order_no: str        # used if admitted; also names the attempt
    now_ms: int
    outcome_ttl: int
    shards: int          # the shard count the caller assumes for the sale
    generation: str      # the generation of the sale the caller means
    short_outcome: str   # "" (ask for units), "SOLD_OUT", "KNOWN_SOLD_OUT" (answered, not
                         # recorded) or "INSUFFICIENT_STOCK"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.sku, self.quantity, self.generation)


def fingerprint(sku: str, quantity: int, generation: str) -> str:
    """What a key is bound to: one sale (a SKU deleted and created again is another) and
    one quantity."""
    return f"{sku}|{quantity}|{generation}"


async def run(runner: ScriptRunner, shard: ShardKeys, idempotency_key: str,
              request: Request) -> Reply:
    raw = await SCRIPT(
        runner,
        (idempotency_key, shard.stock, shard.units, shard.buyers, shard.order(request.order_no),
         shard.order_index, shard.stream, shard.touched),
        (request.user_id, request.sku, request.quantity, request.fingerprint, request.order_no,
         request.now_ms, request.outcome_ttl, request.shards, request.short_outcome,
         request.generation))
    return decode(raw)


def decode(raw: list[Any]) -> Reply:
    code = Code(int(raw[0]))
    if code is Code.OK:
        return Reply(code, "OK", order_no=raw[1], units=parse_units(raw[2]), amount=int(raw[3]))
    if code is Code.DUPLICATE:
        return Reply(code, raw[1], order_no=raw[2] or "", units=parse_units(raw[3] or ""),
                     order_status=raw[4] or "", same_attempt=bool(int(raw[5])))
    if code is Code.SHORT:
        return Reply(code, raw[1])
    if code is Code.ALREADY_PURCHASED:
        return Reply(code, "ALREADY_PURCHASED", order_no=raw[1] or "")
    if code is Code.NEED_UNITS:
        return Reply(code, missing=int(raw[1]))
    if code is Code.NOT_STARTED or code is Code.ENDED:
        return Reply(code, at_ms=int(raw[1]))
    return Reply(code)


async def bind_key(runner: ScriptRunner, key_record: str, fingerprint: str, ttl: int) -> bool:
    """Bind a key to its request in the key's own slot (``claim_key.lua``), for a
    purchase made in another slot. False: the key was used for another request."""
    return int(await CLAIM_KEY(runner, (key_record,), (fingerprint, ttl))) != 2


def needs_replicas(sha: str) -> bool:
    """Whether a call runs this script (its 200s must be on a replica before they are told)."""
    return sha == SCRIPT.sha


def admits(sha: str, raw: Any) -> bool:
    """Whether a raw reply of script ``sha`` answers a purchase that a failover must
    not lose: this script's OK (``{0, ...}``) or the stored OK of a key used before
    (``{1, "OK", ...}``). The transport holds such replies until a replica has the
    write (see ``gateway.store.transport.replication``); it is given this predicate and
    knows nothing else of purchases."""
    if sha != SCRIPT.sha or type(raw) is not list or not raw or type(raw[0]) is not int:
        return False
    if raw[0] == Code.OK:
        return True
    return raw[0] == Code.DUPLICATE and len(raw) > 1 and raw[1] in ("OK", b"OK")
