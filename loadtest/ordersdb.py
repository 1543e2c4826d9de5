"""Reading the bundled orders service's store for the verifier (nothing is written).

The store is SQLite or PostgreSQL with the schema of ``gateway/orders/db.py``: ``orders``
(with ``state`` and ``pay_by``), ``order_units`` (with ``live``: units of ``expired`` and
``cancelled`` orders are kept for the record but no longer held, so that a unit can be
sold again to a new order), ``payments`` (with ``refund_due``) and ``releases`` (the
outbox of releases to the gateway). Stores made by older versions lack some of these
columns and tables; what is missing reads as its old meaning (every unit live, no
payments, no releases) so that the verifier can still check an old run.

A store that is not there (no file, no ``orders`` table) is :class:`DbMissing`: the
verifier must not mistake "nothing to read" for "nothing wrong".
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LIVE_STATES = ("pending", "paid", "shipped")
PAID_STATES = ("paid", "shipped")
CLOSED_STATES = ("expired", "cancelled")


class DbMissing(LookupError):
    """The orders store named by the URL is not there (no file, or no ``orders`` table)."""


@dataclass(frozen=True, slots=True)
class DbOrder:
    order_no: str
    sku: str
    user_id: int
    quantity: int
    units: tuple[int, ...]
    state: str = ""  # "" in stores too old to have states: read as pending
    pay_by: int | None = None
    amount: int | None = None
    created_at: str = ""

    @property
    def live(self) -> bool:
        """Holds its units: ``pending``, ``paid`` or ``shipped`` (or no state at all)."""
        return self.state in LIVE_STATES or not self.state

    @property
    def closed(self) -> bool:
        return self.state in CLOSED_STATES


@dataclass(frozen=True, slots=True)
class DbUnit:
    """A row of ``order_units``; ``live`` False: its order was closed, the unit is free
    to be sold again."""

    unit: int
    order_no: str
    live: bool = True


@dataclass(frozen=True, slots=True)
class DbPayment:
    notify_id: str
    order_no: str
    amount: int
    status: str
    refund_due: bool = False
    received_at: str = ""


@dataclass(frozen=True, slots=True)
class DbRelease:
    """A row of the release outbox: queued when an order closed; ``done_at`` (epoch ms)
    once the gateway answered for good, ``outcome`` ``released`` or ``unknown_order``."""

    order_no: str
    reason: str
    done_at: int | None = None
    outcome: str | None = None

    @property
    def done(self) -> bool:
        return self.done_at is not None


@dataclass(slots=True)
class DbSnapshot:
    source: str
    orders: list[DbOrder] = field(default_factory=list)
    units: list[DbUnit] = field(default_factory=list)
    has_order_units: bool = True
    payments: list[DbPayment] = field(default_factory=list)
    releases: dict[str, DbRelease] = field(default_factory=dict)

    def by_order(self) -> dict[str, list[DbOrder]]:
        rows: dict[str, list[DbOrder]] = {}
        for row in self.orders:
            rows.setdefault(row.order_no, []).append(row)
        return rows

    def live_claims(self) -> list[tuple[int, str]]:
        """(unit, order_no) of every unit held by a live order: the ``order_units`` rows
        marked live, or (no such table) the unit lists of live orders."""
        if self.has_order_units:
            return [(u.unit, u.order_no) for u in self.units if u.live]
        return [(u, o.order_no) for o in self.orders if o.live for u in o.units]

    def all_claims(self) -> list[tuple[int, str]]:
        """(unit, order_no) of every unit any order ever held, live or not."""
        if self.has_order_units:
            return [(u.unit, u.order_no) for u in self.units]
        return [(u, o.order_no) for o in self.orders for u in o.units]

    def fingerprint(self) -> tuple[Any, ...]:
        """What must not change between two reads for a snapshot to be consistent."""
        return (tuple(sorted((o.order_no, o.state) for o in self.orders)),
                sum(1 for u in self.units if u.live), len(self.payments),
                tuple(sorted((r.order_no, r.done) for r in self.releases.values())))


# -- rows to values --------------------------------------------------------------------------

def _dict(row: Any) -> dict[str, Any]:
    """A sqlite3.Row or an asyncpg Record as a plain dict."""
    return {key: row[key] for key in row.keys()}


def units_of(value: Any) -> tuple[int, ...]:
    """``"3,7,9"`` -> (3, 7, 9); None or "" -> ()."""
    if value is None:
        return ()
    text = str(value).strip()
    return tuple(int(u) for u in text.split(",") if u.strip()) if text else ()


def _opt_int(row: Mapping[str, Any], name: str) -> int | None:
    value = row.get(name)
    return None if value is None else int(value)


def _order(row: Mapping[str, Any]) -> DbOrder:
    return DbOrder(
        order_no=str(row["order_no"]), sku=str(row["sku"]), user_id=int(row["user_id"]),
        quantity=_opt_int(row, "quantity") or 0, units=units_of(row.get("units")),
        state=str(row.get("state") or ""), pay_by=_opt_int(row, "pay_by"),
        amount=_opt_int(row, "amount"), created_at=str(row.get("created_at") or ""))


def _unit(row: Mapping[str, Any]) -> DbUnit:
    live = row.get("live", True)
    return DbUnit(int(row["unit"]), str(row["order_no"]), True if live is None else bool(live))


def _payment(row: Mapping[str, Any]) -> DbPayment:
    return DbPayment(str(row["notify_id"]), str(row["order_no"]), int(row["amount"]),
                     str(row.get("status") or ""), bool(row.get("refund_due") or False),
                     str(row.get("received_at") or ""))


def _release(row: Mapping[str, Any]) -> DbRelease:
    return DbRelease(str(row["order_no"]), str(row["reason"]), _opt_int(row, "done_at"),
                     None if row.get("outcome") is None else str(row["outcome"]))


@dataclass(frozen=True, slots=True)
class _Rows:
    orders: list[dict[str, Any]]
    units: list[dict[str, Any]] | None  # None: no order_units table
    payments: list[dict[str, Any]]
    releases: list[dict[str, Any]]


def _snapshot(source: str, rows: _Rows) -> DbSnapshot:
    return DbSnapshot(
        source=source, orders=[_order(r) for r in rows.orders],
        units=[_unit(r) for r in rows.units or ()], has_order_units=rows.units is not None,
        payments=[_payment(r) for r in rows.payments],
        releases={r.order_no: r for r in (_release(row) for row in rows.releases)})


# The statements, with $1 placeholders (PostgreSQL's; SQLite takes ?1).
ORDERS = "SELECT * FROM orders WHERE sku = $1"
UNITS = "SELECT * FROM order_units WHERE sku = $1"
PAYMENTS = ("SELECT p.* FROM payments p JOIN orders o ON o.order_no = p.order_no "
            "WHERE o.sku = $1")
RELEASES = ("SELECT r.* FROM releases r JOIN orders o ON o.order_no = r.order_no "
            "WHERE o.sku = $1")


def _sqlite_sql(statement: str) -> str:
    return statement.replace("$1", "?1")


# -- SQLite ----------------------------------------------------------------------------------

def sqlite_path(url: str) -> str | None:
    """``sqlite:///rel/path`` -> ``rel/path``, ``sqlite:////abs`` -> ``/abs``; None if not SQLite."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        return unquote(rest[1:] if rest.startswith("/") else rest) or None
    return None


def _sqlite_rows(conn: sqlite3.Connection, sql: str, sku: str) -> list[dict[str, Any]]:
    return [_dict(r) for r in conn.execute(_sqlite_sql(sql), (sku,)).fetchall()]


def read_sqlite(path: str, sku: str) -> DbSnapshot:
    """One read transaction over the tables (WAL: a consistent view while the service
    writes). :class:`DbMissing` when the file or its ``orders`` table is not there."""
    if not Path(path).exists():
        raise DbMissing(f"no orders database at {path}")
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("BEGIN")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "orders" not in tables:
            raise DbMissing(f"{path} has no orders table (the orders service never opened it)")
        rows = _Rows(
            orders=_sqlite_rows(conn, ORDERS, sku),
            units=_sqlite_rows(conn, UNITS, sku) if "order_units" in tables else None,
            payments=_sqlite_rows(conn, PAYMENTS, sku) if "payments" in tables else [],
            releases=_sqlite_rows(conn, RELEASES, sku) if "releases" in tables else [])
        conn.execute("COMMIT")
        return _snapshot(f"sqlite:{path}", rows)
    finally:
        conn.close()


# -- PostgreSQL ------------------------------------------------------------------------------

async def read_postgres(url: str, sku: str) -> DbSnapshot:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            has = await conn.fetchrow(
                "SELECT to_regclass('orders') IS NOT NULL AS o, to_regclass('order_units') IS NOT NULL AS u, "
                "to_regclass('payments') IS NOT NULL AS p, to_regclass('releases') IS NOT NULL AS r")
            if not has["o"]:
                raise DbMissing("the database has no orders table (the orders service never opened it)")

            async def fetch(sql: str) -> list[dict[str, Any]]:
                return [_dict(r) for r in await conn.fetch(sql, sku)]

            rows = _Rows(orders=await fetch(ORDERS), units=await fetch(UNITS) if has["u"] else None,
                         payments=await fetch(PAYMENTS) if has["p"] else [],
                         releases=await fetch(RELEASES) if has["r"] else [])
    finally:
        await conn.close()
    parsed = urlparse(url)
    return _snapshot(f"postgresql://{parsed.hostname}:{parsed.port or 5432}{parsed.path}", rows)


async def read_db(url: str, sku: str) -> DbSnapshot:
    """The store's rows for ``sku``. :class:`DbMissing` when it is not there; other
    errors (unreachable, not a database) propagate: the run cannot be verified."""
    path = sqlite_path(url)
    if path is not None:
        return await asyncio.to_thread(read_sqlite, path, sku)
    if url.startswith(("postgresql://", "postgres://")):
        return await read_postgres(url, sku)
    raise ValueError(f"unsupported database URL: {url.split(':', 1)[0]}://…")


def release_times(db: DbSnapshot) -> Iterable[tuple[str, int]]:
    """(order_no, epoch ms) of every release the gateway acknowledged."""
    return ((r.order_no, r.done_at) for r in db.releases.values()
            if r.done_at is not None and r.outcome in (None, "released"))
