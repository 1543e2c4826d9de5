"""A flash sale's first second as a client sees it: thousands of purchases and token
requests sent at once, each on a connection of its own, and what came back counted.

Also what a burst costs Redis: the connections its servers accepted meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections import Counter
from collections.abc import Iterable, Iterator

import aiohttp

from devtools.redis_cluster import LocalCluster, LocalNode
from devtools.redis_server import LocalRedis


@contextlib.contextmanager
def open_files(wanted: int) -> Iterator[int]:
    """The soft limit of open files raised towards the hard limit (a burst of N requests
    served in-process holds 2N sockets and more); the soft limit in force is yielded,
    and the old one put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield max(soft, target)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def first_healthy(session: aiohttp.ClientSession, base_url: str, *,
                        attempts: int = 600, pause: float = 0.05) -> int:
    """Poll ``/healthz`` until its first 200; the number of answers before it."""
    for seen in range(attempts):
        try:
            async with session.get(f"{base_url}/healthz") as resp:
                await resp.read()
                if resp.status == 200:
                    return seen
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(pause)
    raise AssertionError(f"{base_url}/healthz never answered 200")


async def burst(session: aiohttp.ClientSession, base_url: str, sku: str,
                buyers: dict[int, str], token_users: Iterable[int]) -> Counter[str]:
    """One purchase per ``buyers`` entry (user -> its key) and one ``GET /api/token`` per
    ``token_users`` entry, all started at once; ``"<route> <status> <code>"`` counted
    (a 503 with its message; ``"<route> no answer <error>"`` when the client got none)."""

    async def answer(route: str, request: object) -> str:
        try:
            async with request as resp:  # type: ignore[attr-defined]
                try:
                    body = await resp.json()
                except (aiohttp.ContentTypeError, ValueError):
                    body = {"code": "NOT_JSON"}
                if resp.status == 503:  # which of the reasons for a 503
                    return f"{route} 503 {body.get('code')}: {body.get('message')}"
                return f"{route} {resp.status} {body.get('code')}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f"{route} no answer {type(exc).__name__}"

    def buy(user: int, key: str) -> object:
        return session.post(f"{base_url}/api/seckill/{sku}",
                            headers={"X-User-Id": str(user), "X-Idempotency-Key": key})

    def token(user: int) -> object:
        return session.get(f"{base_url}/api/token", headers={"X-User-Id": str(user)})

    calls = [answer("buy", buy(user, key)) for user, key in buyers.items()]
    calls += [answer("token", token(user)) for user in token_users]
    return Counter(await asyncio.gather(*calls))


def burst_session(timeout: float = 60.0) -> aiohttp.ClientSession:
    """A client with no cap on its connections: every request of a burst on its own."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=0))


class ConnectionCount:
    """Connections the Redis servers of a deployment accepted (``INFO stats``
    ``total_connections_received``, summed over every node): read it before and after,
    and the difference is what happened in between (the probe's own connection, opened
    by the first read, is not in it)."""

    def __init__(self, server: LocalRedis | LocalCluster) -> None:
        nodes: list[LocalNode] = (list(server.nodes) if isinstance(server, LocalCluster)
                                  else [n for n in [server.node] if n is not None])
        self._clients = [node.client() for node in nodes]

    def _read(self) -> int:
        return sum(int(c.info("stats")["total_connections_received"]) for c in self._clients)

    async def read(self) -> int:
        return await asyncio.to_thread(self._read)

    def close(self) -> None:
        for client in self._clients:
            client.close()
