"""``read_sale.lua``, ``mark_sold_out.lua`` and ``count_return.lua``: the sale's sold-out
state, kept in its registry record."""

from __future__ import annotations

from gateway.store.scripts import Script, ScriptRunner

READ = Script.load("read_sale")
MARK = Script.load("mark_sold_out")
COUNT_RETURN = Script.load("count_return")

# A return announced this long ago and never counted is from a process that died.
RETURN_STALE_MS = 30_000


async def read(runner: ScriptRunner, registry: str) -> dict[str, str]:
    """The registry record, field by field (empty: no record)."""
    flat = await READ(runner, (registry,), ())
    text = [item.decode() if isinstance(item, bytes) else str(item) for item in flat]
    return dict(zip(text[0::2], text[1::2]))


async def mark(runner: ScriptRunner, registry: str, returns_seen: str, generation: str,
               now_ms: int) -> bool:
    """Record the sale sold out unless units came back (or are coming back) since
    ``returns_seen`` was read."""
    return bool(int(await MARK(runner, (registry,),
                               (returns_seen, generation, now_ms, RETURN_STALE_MS))))


async def count_return(runner: ScriptRunner, registry: str, step: str, order_no: str,
                       generation: str, now_ms: int) -> bool:
    """``begin`` before units go back, ``end`` after (``cancel``: none went back)."""
    return bool(int(await COUNT_RETURN(runner, (registry,), (step, order_no, generation, now_ms))))
