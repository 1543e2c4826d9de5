"""The Lua scripts: read once from ``lua/``, called by SHA, reloaded on NOSCRIPT.

A replica promoted after a failover, a restarted node or a ``SCRIPT FLUSH`` has no
scripts cached; the first call that meets ``NOSCRIPT`` loads the script (on every
primary, on Cluster) and runs the call again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from redis.exceptions import NoScriptError

SCRIPT_NAMES = (
    "purchase",
    "create_shard",
    "transfer_out",
    "transfer_in",
    "compensate",
    "mark_delivered",
)


def _lua_dir() -> Path:
    """``gateway.lua`` in an installed wheel; ``lua/`` beside the package in a checkout."""
    try:
        root = resources.files("gateway.lua")
        if root.joinpath("purchase.lua").is_file():
            return Path(str(root))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, directory: Path | None = None) -> "Script":
        source = ((directory or _lua_dir()) / f"{name}.lua").read_text(encoding="utf-8")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class Scripts:
    purchase: Script
    create_shard: Script
    transfer_out: Script
    transfer_in: Script
    compensate: Script
    mark_delivered: Script

    @classmethod
    def load(cls, directory: Path | None = None) -> "Scripts":
        return cls(**{name: Script.load(name, directory) for name in SCRIPT_NAMES})

    def all(self) -> tuple[Script, ...]:
        return tuple(getattr(self, name) for name in SCRIPT_NAMES)
