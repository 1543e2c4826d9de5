"""The orders store: what the bundled orders service keeps, on SQLite or PostgreSQL.

Duplicates are decided by the database's UNIQUE constraints, never by a read before a
write: two deliveries of one order, two orders claiming one unit, or one payment
notification sent twenty times race to an insert, and exactly one insert wins. The
losers read what won only to tell the caller.

The statements are written once, with ``$1`` placeholders, for both databases; each
implementation only supplies connections, transactions and the unique-violation test.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

Row = Sequence[Any]


class Tx(Protocol):
    """One transaction (or, read-only, one consistent read) on one connection."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_no      TEXT PRIMARY KEY,
    sku           TEXT NOT NULL,
    user_id       BIGINT NOT NULL,
    quantity      INT NOT NULL,
    amount        BIGINT NOT NULL,
    units         TEXT NOT NULL,
    admitted_at   BIGINT,
    state         TEXT NOT NULL DEFAULT 'pending',
    state_version INT NOT NULL DEFAULT 1,
    created_at    {timestamp}
);
CREATE INDEX IF NOT EXISTS orders_sku ON orders (sku);
CREATE TABLE IF NOT EXISTS order_units (
    sku      TEXT NOT NULL,
    unit     INT NOT NULL,
    order_no TEXT NOT NULL REFERENCES orders (order_no),
    UNIQUE (sku, unit)
);
CREATE INDEX IF NOT EXISTS order_units_order_no ON order_units (order_no);
CREATE TABLE IF NOT EXISTS payments (
    notify_id   TEXT PRIMARY KEY,
    order_no    TEXT NOT NULL REFERENCES orders (order_no),
    amount      BIGINT NOT NULL,
    status      TEXT NOT NULL,
    received_at {timestamp}
);
"""


def schema(timestamp: str) -> str:
    """The tables, the same on every database but for the type (and default) of a
    timestamp column."""
    return _SCHEMA.replace("{timestamp}", timestamp)


@dataclass(frozen=True, slots=True)
class NewOrder:
    """An admitted purchase as the relay delivers it."""

    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    admitted_at: int | None = None


@dataclass(frozen=True, slots=True)
class StoredOrder:
    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    admitted_at: int | None
    state: str
    state_version: int

    @classmethod
    def from_row(cls, row: Row) -> "StoredOrder":
        order_no, sku, user_id, quantity, amount, units, admitted_at, state, version = row
        return cls(order_no, sku, int(user_id), tuple(int(u) for u in units.split(",") if u),
                   int(quantity), int(amount), admitted_at, state, int(version))

    def public(self) -> dict:
        return {
            "order_no": self.order_no, "sku": self.sku, "user_id": self.user_id,
            "units": list(self.units), "quantity": self.quantity, "amount": self.amount,
            "admitted_at": self.admitted_at, "state": self.state,
            "state_version": self.state_version,
        }


class Insert(enum.Enum):
    STORED = "stored"
    ORDER_EXISTS = "order_exists"
    UNIT_TAKEN = "unit_taken"


@dataclass(frozen=True, slots=True)
class InsertResult:
    outcome: Insert
    order: StoredOrder | None = None
    taken: tuple[int, ...] = ()  # UNIT_TAKEN: the units other orders hold


@dataclass(frozen=True, slots=True)
class PaymentNotice:
    notify_id: str
    order_no: str
    amount: int
    status: str = "SUCCESS"


class Payment(enum.Enum):
    APPLIED = "applied"            # recorded; the order moved pending -> paid
    RECORDED = "recorded"          # recorded; the order was not pending, so no move
    REPEAT = "repeat"              # this notify_id was recorded before: no second effect
    NOTIFY_ID_REUSED = "reused"    # this notify_id was recorded before for another payment
    NO_ORDER = "no_order"
    AMOUNT_MISMATCH = "amount_mismatch"


@dataclass(frozen=True, slots=True)
class PaymentResult:
    outcome: Payment
    order: StoredOrder | None = None


class Ship(enum.Enum):
    SHIPPED = "shipped"
    NO_ORDER = "no_order"
    STALE_VERSION = "stale_version"
    WRONG_STATE = "wrong_state"


@dataclass(frozen=True, slots=True)
class ShipResult:
    outcome: Ship
    order: StoredOrder | None = None


ORDER_COLUMNS = "order_no, sku, user_id, quantity, amount, units, admitted_at, state, state_version"
SELECT_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_no = $1"
INSERT_ORDER = ("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units, admitted_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)")
INSERT_UNIT = "INSERT INTO order_units (sku, unit, order_no) VALUES ($1, $2, $3)"
UNIT_HOLDER = "SELECT order_no FROM order_units WHERE sku = $1 AND unit = $2"
INSERT_PAYMENT = "INSERT INTO payments (notify_id, order_no, amount, status) VALUES ($1, $2, $3, $4)"
SELECT_PAYMENT = "SELECT order_no, amount, status FROM payments WHERE notify_id = $1"
PAY = ("UPDATE orders SET state = 'paid', state_version = state_version + 1 "
       "WHERE order_no = $1 AND state = 'pending'")
SHIP = ("UPDATE orders SET state = 'shipped', state_version = state_version + 1 "
        "WHERE order_no = $1 AND state = 'paid' AND state_version = $2")
LIST_ORDERS = f"SELECT {ORDER_COLUMNS} FROM orders WHERE sku = $1 ORDER BY order_no"

# Units taken by another order can be released only by deleting that order, which this
# service never does; a second look therefore finds them unless someone edits the tables.
_INSERT_ATTEMPTS = 3


class OrdersDb(ABC):
    """The orders store. ``open()`` connects and creates the schema (idempotently)."""

    #: Errors meaning "the database is unreachable or busy": answered 503, retried.
    failures: tuple[type[BaseException], ...] = ()

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self, readonly: bool = False) -> AbstractAsyncContextManager[Tx]:
        """Committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def is_unique_violation(self, exc: BaseException) -> bool: ...

    async def ping(self) -> None:
        async with self.transaction(readonly=True) as tx:
            await tx.fetchone("SELECT 1")

    # -- orders -----------------------------------------------------------------------

    async def insert_order(self, order: NewOrder) -> InsertResult:
        """Store the order and its units in one transaction."""
        for _ in range(_INSERT_ATTEMPTS):
            step = "order"
            try:
                async with self.transaction() as tx:
                    await tx.execute(INSERT_ORDER, order.order_no, order.sku, order.user_id,
                                     order.quantity, order.amount,
                                     ",".join(map(str, order.units)), order.admitted_at)
                    step = "units"
                    await tx.executemany(INSERT_UNIT,
                                         [(order.sku, unit, order.order_no) for unit in order.units])
                    stored = await self._order(tx, order.order_no)
                return InsertResult(Insert.STORED, stored)
            except Exception as exc:
                if not self.is_unique_violation(exc):
                    raise
            if step == "order":
                existing = await self.get_order(order.order_no)
                if existing is not None:
                    return InsertResult(Insert.ORDER_EXISTS, existing)
                continue
            taken = await self._units_held_by_others(order)
            if taken:
                return InsertResult(Insert.UNIT_TAKEN, taken=taken)
        raise RuntimeError(f"order {order.order_no}: unique violation with no visible holder")

    async def get_order(self, order_no: str) -> StoredOrder | None:
        async with self.transaction(readonly=True) as tx:
            return await self._order(tx, order_no)

    async def list_orders(self, sku: str) -> list[StoredOrder]:
        async with self.transaction(readonly=True) as tx:
            return [StoredOrder.from_row(row) for row in await tx.fetchall(LIST_ORDERS, sku)]

    async def _order(self, tx: Tx, order_no: str) -> StoredOrder | None:
        row = await tx.fetchone(SELECT_ORDER, order_no)
        return StoredOrder.from_row(row) if row else None

    async def _units_held_by_others(self, order: NewOrder) -> tuple[int, ...]:
        async with self.transaction(readonly=True) as tx:
            taken = []
            for unit in order.units:
                row = await tx.fetchone(UNIT_HOLDER, order.sku, unit)
                if row is not None and row[0] != order.order_no:
                    taken.append(unit)
        return tuple(taken)

    # -- payments and shipping ---------------------------------------------------------

    async def record_payment(self, notice: PaymentNotice) -> PaymentResult:
        """Record the notification once per notify_id; a SUCCESS moves pending -> paid."""
        try:
            async with self.transaction() as tx:
                order = await self._order(tx, notice.order_no)
                if order is None:
                    return PaymentResult(Payment.NO_ORDER)
                if order.amount != notice.amount:
                    return PaymentResult(Payment.AMOUNT_MISMATCH, order)
                await tx.execute(INSERT_PAYMENT, notice.notify_id, notice.order_no, notice.amount,
                                 notice.status)
                moved = notice.status == "SUCCESS" and await tx.execute(PAY, notice.order_no) == 1
                order = await self._order(tx, notice.order_no)
            return PaymentResult(Payment.APPLIED if moved else Payment.RECORDED, order)
        except Exception as exc:
            if not self.is_unique_violation(exc):
                raise
        async with self.transaction(readonly=True) as tx:
            prior = await tx.fetchone(SELECT_PAYMENT, notice.notify_id)
            order = await self._order(tx, notice.order_no)
        same = prior is not None and (prior[0], int(prior[1]), prior[2]) == (
            notice.order_no, notice.amount, notice.status)
        return PaymentResult(Payment.REPEAT if same else Payment.NOTIFY_ID_REUSED, order)

    async def ship(self, order_no: str, version: int) -> ShipResult:
        """paid -> shipped, only if the caller saw the current ``state_version``."""
        async with self.transaction() as tx:
            moved = await tx.execute(SHIP, order_no, version) == 1
            order = await self._order(tx, order_no)
        if order is None:
            return ShipResult(Ship.NO_ORDER)
        if moved:
            return ShipResult(Ship.SHIPPED, order)
        if order.state_version != version:
            return ShipResult(Ship.STALE_VERSION, order)
        return ShipResult(Ship.WRONG_STATE, order)


def open_orders_db(database_url: str) -> OrdersDb:
    """The store for ``sqlite:///path`` (``sqlite:///:memory:``) or ``postgresql://…``.
    Query parameters of a PostgreSQL URL are server settings (``?search_path=s``)."""
    if database_url.startswith("sqlite://"):
        from gateway.orders.sqlite import SqliteOrders

        path = database_url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise ValueError("SQLite URLs look like sqlite:///relative.db or sqlite:////abs/path.db")
        return SqliteOrders(path[1:] or ":memory:")
    if database_url.startswith(("postgresql://", "postgres://")):
        from gateway.orders.postgres import PostgresOrders

        return PostgresOrders(database_url)
    raise ValueError("SECKILL_DATABASE_URL must start with sqlite:// or postgresql://")
