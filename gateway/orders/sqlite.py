"""The orders store on SQLite (aiosqlite): one connection, WAL, a busy timeout.

One aiosqlite connection is one worker thread; statements of coroutines sharing it
would interleave inside each other's transactions, so a lock keeps each transaction
whole. SQLite runs one writer at a time anyway. Write transactions start with
``BEGIN IMMEDIATE``: another process holding the write lock then makes us wait for the
busy timeout instead of failing a read-to-write upgrade.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from gateway.orders.db import OrdersDb, Row, schema

SCHEMA = schema("TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")

MIN_VERSION = (3, 35)  # UPDATE ... RETURNING (expiry, release claims)
_PLACEHOLDER = re.compile(r"\$(\d+)")
_UNIQUE_ERRORS = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}


def _sql(statement: str) -> str:
    """``$1`` (PostgreSQL) -> ``?1`` (SQLite's numbered parameter)."""
    return _PLACEHOLDER.sub(r"?\1", statement)


class _SqliteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._conn.execute(_sql(sql), args)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(_sql(sql), rows)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        rows = await self._conn.execute_fetchall(_sql(sql), args)
        return next(iter(rows), None)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.execute_fetchall(_sql(sql), args))


class SqliteOrders(OrdersDb):
    failures = (sqlite3.OperationalError,)  # "database is locked" past the busy timeout

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if sqlite3.sqlite_version_info < MIN_VERSION:
            raise RuntimeError(f"the orders store needs SQLite >= {'.'.join(map(str, MIN_VERSION))} "
                               f"(UPDATE ... RETURNING); this Python has {sqlite3.sqlite_version}")
        # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @asynccontextmanager
    async def transaction(self, readonly: bool = False) -> AsyncIterator[_SqliteTx]:
        if self._conn is None:
            raise RuntimeError("SqliteOrders is not open")
        conn = self._conn
        async with self._lock:
            try:
                await conn.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
                yield _SqliteTx(conn)
                await conn.execute("COMMIT")
            except BaseException:
                await self._rollback(conn)
                raise

    @staticmethod
    async def _rollback(conn: aiosqlite.Connection) -> None:
        """End the transaction, whatever state a failure or a cancellation left it in.

        A cancelled await does not withdraw a statement already queued to the
        connection's thread (BEGIN may still run after we were cancelled waiting for
        it). The thread runs statements in order, so a ROLLBACK queued now runs after
        them; when no transaction is open it fails harmlessly."""
        try:
            await conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass

    def is_unique_violation(self, exc: BaseException) -> bool:
        return (isinstance(exc, sqlite3.IntegrityError)
                and getattr(exc, "sqlite_errorname", "") in _UNIQUE_ERRORS)
