"""A sale's admission state as the admitter publishes it in Redis (one small hash per
sale), decoded; and what a process remembers of it between reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RoomState:
    generation: str = ""
    cursors: dict[int, int] = field(default_factory=dict)  # shard -> ranks below are admitted
    admitted: int = 0
    joined: int = 0
    units_left: int | None = None  # None: nothing published yet
    sold_out: bool = False
    tokens: float = 0.0
    since_ms: int = 0   # Redis's clock: when the bucket started (empty)
    last_ms: int = 0    # Redis's clock: its last refill

    @classmethod
    def parse(cls, record: Mapping[str, str], generation: str) -> RoomState:
        """The state of this generation of the sale (another's, or none: an empty one)."""
        if record.get("generation") != generation:
            return cls(generation)
        cursors = {int(name[2:]): int(float(value)) for name, value in record.items()
                   if name.startswith("c:")}
        units = record.get("units_left")
        return cls(generation, cursors, int(float(record.get("admitted") or 0)),
                   int(float(record.get("joined") or 0)),
                   int(float(units)) if units is not None else None,
                   record.get("sold_out") == "1", float(record.get("tokens") or 0),
                   int(float(record.get("since") or 0)), int(float(record.get("last") or 0)))

    def cursor(self, shard: int) -> int:
        return self.cursors.get(shard, 0)

    def at_least(self, older: RoomState) -> RoomState:
        """This state, with no cursor behind ``older``'s (a read from a replica promoted
        after a failover may be behind what this process answered already)."""
        if older.generation != self.generation or not older.cursors:
            return self
        cursors = dict(self.cursors)
        for shard, cursor in older.cursors.items():
            if cursor > cursors.get(shard, 0):
                cursors[shard] = cursor
        return RoomState(self.generation, cursors, max(self.admitted, older.admitted),
                         self.joined, self.units_left, self.sold_out, self.tokens,
                         self.since_ms, self.last_ms)
