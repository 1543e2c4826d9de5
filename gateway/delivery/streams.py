"""The purchase streams (the outbox of every shard) as the relay reads them: one
consumer group, a pending list per consumer, idle entries claimed by others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from gateway.store.connection import RedisClient
from gateway.store.keys import KeySpace


@dataclass(slots=True)
class PurchaseStreams:
    """The stream commands of the relay, for one consumer of one group."""

    client: RedisClient
    keys: KeySpace
    group: str
    consumer: str

    async def ensure_group(self, stream: str) -> None:
        try:
            await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, stream: str, cursor: str, count: int,
                   block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        reply: Any = await self.client.xreadgroup(self.group, self.consumer, {stream: cursor},
                                                  count=count, block=block_ms)
        return list(reply[0][1]) if reply else []

    async def claim_stale(self, stream: str, min_idle_ms: int,
                          count: int) -> list[tuple[str, dict[str, str]]]:
        claimed: list[tuple[str, dict[str, str]]] = []
        cursor = "0-0"
        while True:
            reply: Any = await self.client.xautoclaim(stream, self.group, self.consumer, min_idle_ms,
                                                      start_id=cursor, count=count)
            cursor, entries = reply[0], reply[1]
            claimed.extend(e for e in entries if e[0] is not None)
            if cursor in ("0-0", "0") or len(claimed) >= count:
                return claimed

    async def touch(self, stream: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries we are still working on."""
        await self.client.xclaim(stream, self.group, self.consumer, 0, list[Any](entry_ids),
                                 justid=True)

    async def done(self, stream: str, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(stream, self.group, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def backlog(self, streams: list[str]) -> int:
        """Entries not yet delivered: delivered entries are deleted, so XLEN counts them."""
        if not streams:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
        return sum(int(n) for n in await pipe.execute())

    async def forget_idle_consumers(self, stream: str, idle_ms: int) -> None:
        for consumer in await self.client.xinfo_consumers(stream, self.group):
            if (consumer["name"] != self.consumer and int(consumer["pending"]) == 0
                    and int(consumer["idle"]) > idle_ms):
                await self.client.xgroup_delconsumer(stream, self.group, consumer["name"])
