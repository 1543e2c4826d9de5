"""``mark_sold_out.lua``: its arguments and its reply."""

from __future__ import annotations

from gateway.store.scripts import Script, ScriptRunner

SCRIPT = Script.load("mark_sold_out")


async def mark(runner: ScriptRunner, state_key: str, returns_seen: str, generation: str) -> bool:
    """Record the sale sold out unless units came back since ``returns_seen`` was read."""
    return bool(int(await SCRIPT(runner, (state_key,), (returns_seen, generation))))
