"""The orders store on PostgreSQL (asyncpg pool).

Transactions run at READ COMMITTED: every decision is a single statement (an insert
that a unique index may refuse, an UPDATE whose WHERE re-checks the row after waiting
for its lock), so no stronger isolation is needed and nothing has to be retried on
serialization failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from gateway.orders.db import OrdersDb, Row, schema

SCHEMA = schema("TIMESTAMPTZ NOT NULL DEFAULT now()")

# Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; processes
# starting together take turns on this advisory lock.
_SCHEMA_LOCK = 0x5EC_0DE5


def _rowcount(status: str) -> int:
    """asyncpg's command tag, ``UPDATE 1`` / ``INSERT 0 1`` -> 1."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, list(rows))

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        record = await self._conn.fetchrow(sql, *args)
        return tuple(record) if record is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(record) for record in await self._conn.fetch(sql, *args)]


class PostgresOrders(OrdersDb):
    failures = (
        OSError,
        asyncio.TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.TooManyConnectionsError,
        asyncpg.CannotConnectNowError,
    )
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 10,
                 command_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        pool = await asyncpg.create_pool(self.dsn, min_size=self.min_size, max_size=self.max_size,
                                         command_timeout=self.command_timeout)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def transaction(self, readonly: bool = False) -> AsyncIterator[_PgTx]:
        if self._pool is None:
            raise RuntimeError("PostgresOrders is not open")
        async with self._pool.acquire() as conn, conn.transaction(readonly=readonly):
            yield _PgTx(conn)

    def is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncpg.UniqueViolationError)
