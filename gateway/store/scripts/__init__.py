"""The Lua scripts: read from this package, includes resolved, called by SHA.

Each ``<name>.lua`` has one Python owner beside it, ``<name>.py`` (or one module for a
pair of scripts), which alone knows the script's ``KEYS``, ``ARGV`` and reply: callers
use its typed function and get a decoded value, never a raw reply.

A line ``--- @include "<piece>"`` in a script is replaced, when the script is loaded,
by ``include/<piece>.lua`` (as BullMQ's commands do), so that a piece of logic shared
by two scripts (taking units from a shard's free ranges) is written once. Each piece
is included at most once per script.

Scripts are called by SHA and loaded on ``NOSCRIPT``: a replica promoted after a
failover, a restarted node or a ``SCRIPT FLUSH`` has no scripts cached; the first call
that meets ``NOSCRIPT`` loads the script (on every primary, on Cluster) and runs the
call again.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r'^--- @include "([a-z_]+)"[ \t]*$', re.M)


class ScriptRunner(Protocol):
    """What runs a script: a redis-py client (standalone or Cluster) or a batcher. Both
    return awaitables (redis-py declares its commands as plain methods)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def script_load(self, script: str) -> Any: ...


def _read(relative: str) -> str:
    """A file of this package, read as package data (the same in a checkout, an
    installed wheel or a zip: never through a file-system path)."""
    text: str = resources.files(__name__).joinpath(relative).read_text(encoding="utf-8")
    return text


def _read_piece(piece: str) -> str:
    return _read(f"include/{piece}.lua")


def resolve_includes(source: str, read_piece: Callable[[str], str] = _read_piece) -> str:
    """``source`` with each ``--- @include "piece"`` line replaced by the piece."""
    seen: set[str] = set()

    def expand(match: re.Match[str]) -> str:
        piece = match.group(1)
        if piece in seen:
            raise ValueError(f"{piece!r} is included twice")
        seen.add(piece)
        text = read_piece(piece)
        if _INCLUDE.search(text):
            raise ValueError(f"{piece!r} includes another piece: keep includes one level deep")
        return text.rstrip("\n")

    return _INCLUDE.sub(expand, source)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    @functools.cache
    def load(cls, name: str) -> Script:
        source = resolve_includes(_read(f"{name}.lua"))
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def __call__(self, runner: ScriptRunner, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await runner.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await runner.script_load(self.source)
            return await runner.evalsha(self.sha, len(keys), *keys, *args)


def every_script() -> list[Script]:
    """Every script of this package (the includes aside), to load them all at once."""
    names = sorted(entry.name.removesuffix(".lua") for entry in resources.files(__name__).iterdir()
                   if entry.name.endswith(".lua") and entry.is_file())
    return [Script.load(name) for name in names]
