"""The orders store: what the bundled orders service keeps, on SQLite or PostgreSQL.

Duplicates are decided by the database's UNIQUE constraints, never by a read before a
write: two deliveries of one order, two orders claiming one unit, or one payment
notification sent twenty times race to an insert, and exactly one insert wins. The
losers read what won only to tell the caller.

State changes are single conditional UPDATEs (``... WHERE state = 'pending'``): a
payment, a cancel and the expiry of one order race in the database, and exactly one of
them moves it. Closing an order (``expired``, ``cancelled``) frees its units and queues
its release at the gateway in the same transaction (a transactional outbox, the
``releases`` table), so a release is sent only for a committed close, and never lost.

The statements are written once, with ``$1`` placeholders, for both databases; each
implementation only supplies connections, transactions, the unique-violation test and
the row-locking clause of a work-queue claim.

The schema is created idempotently (``IF NOT EXISTS``) on a fresh database. Files or
schemas made by an older version (before ``pay_by``, ``order_units.live``, ``releases``
and ``payments.refund_due``) are not migrated: start from a new database.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

Row = Sequence[Any]


class Tx(Protocol):
    """One transaction (or, read-only, one consistent read) on one connection."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...


# A unit belongs to at most one LIVE order: order_units keeps the rows of closed orders
# (live = FALSE) for the record, and the unique index covers live rows only, so a
# released unit can be sold again as a new order.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_no      TEXT PRIMARY KEY,
    sku           TEXT NOT NULL,
    user_id       BIGINT NOT NULL,
    quantity      INT NOT NULL,
    amount        BIGINT NOT NULL,
    units         TEXT NOT NULL,
    admitted_at   BIGINT,
    pay_by        BIGINT,
    state         TEXT NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'paid', 'shipped', 'expired', 'cancelled')),
    state_version INT NOT NULL DEFAULT 1,
    created_at    {timestamp}
);
CREATE INDEX IF NOT EXISTS orders_sku ON orders (sku);
CREATE INDEX IF NOT EXISTS orders_due ON orders (pay_by) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS order_units (
    sku      TEXT NOT NULL,
    unit     INT NOT NULL,
    order_no TEXT NOT NULL REFERENCES orders (order_no),
    live     BOOLEAN NOT NULL DEFAULT TRUE
);
CREATE UNIQUE INDEX IF NOT EXISTS order_units_live ON order_units (sku, unit) WHERE live;
CREATE INDEX IF NOT EXISTS order_units_order_no ON order_units (order_no);
CREATE TABLE IF NOT EXISTS payments (
    notify_id   TEXT PRIMARY KEY,
    order_no    TEXT NOT NULL REFERENCES orders (order_no),
    amount      BIGINT NOT NULL,
    status      TEXT NOT NULL,
    refund_due  BOOLEAN NOT NULL DEFAULT FALSE,
    received_at {timestamp}
);
CREATE INDEX IF NOT EXISTS payments_refund_due ON payments (received_at) WHERE refund_due;
CREATE TABLE IF NOT EXISTS releases (
    order_no        TEXT PRIMARY KEY REFERENCES orders (order_no),
    reason          TEXT NOT NULL CHECK (reason IN ('expired', 'cancelled')),
    attempts        INT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    done_at         BIGINT,
    outcome         TEXT
);
CREATE INDEX IF NOT EXISTS releases_due ON releases (next_attempt_at) WHERE done_at IS NULL;
"""


def schema(timestamp: str) -> str:
    """The tables, the same on every database but for the type (and default) of a
    timestamp column."""
    return _SCHEMA.replace("{timestamp}", timestamp)


LIVE_STATES = ("pending", "paid", "shipped")
CLOSED_STATES = ("expired", "cancelled")


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
    pay_by: int | None = None  # epoch ms; None: no payment deadline


@dataclass(frozen=True, slots=True)
class StoredOrder:
    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    admitted_at: int | None
    pay_by: int | None
    state: str
    state_version: int

    @classmethod
    def from_row(cls, row: Row) -> StoredOrder:
        order_no, sku, user_id, quantity, amount, units, admitted_at, pay_by, state, version = row
        return cls(order_no, sku, int(user_id), tuple(int(u) for u in units.split(",") if u),
                   int(quantity), int(amount), admitted_at, pay_by, state, int(version))

    def public(self) -> dict[str, Any]:
        return {
            "order_no": self.order_no, "sku": self.sku, "user_id": self.user_id,
            "units": list(self.units), "quantity": self.quantity, "amount": self.amount,
            "admitted_at": self.admitted_at, "pay_by": self.pay_by, "state": self.state,
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
    taken: tuple[int, ...] = ()  # UNIT_TAKEN: the units other live orders hold


@dataclass(frozen=True, slots=True)
class PaymentNotice:
    notify_id: str
    order_no: str
    amount: int
    status: str = "SUCCESS"


class Payment(enum.Enum):
    APPLIED = "applied"            # recorded; the order moved pending -> paid
    RECORDED = "recorded"          # recorded; nothing to move (not a SUCCESS, or already paid)
    ORDER_CLOSED = "order_closed"  # a SUCCESS for an expired/cancelled order: refund due
    NOTIFY_ID_REUSED = "reused"    # this notify_id was recorded before for another payment
    NO_ORDER = "no_order"
    AMOUNT_MISMATCH = "amount_mismatch"


@dataclass(frozen=True, slots=True)
class PaymentResult:
    outcome: Payment
    order: StoredOrder | None = None
    duplicate: bool = False  # this notify_id was recorded before: no second effect


class Ship(enum.Enum):
    SHIPPED = "shipped"
    NO_ORDER = "no_order"
    STALE_VERSION = "stale_version"
    WRONG_STATE = "wrong_state"


@dataclass(frozen=True, slots=True)
class ShipResult:
    outcome: Ship
    order: StoredOrder | None = None


class Cancel(enum.Enum):
    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    NO_ORDER = "no_order"
    WRONG_STATE = "wrong_state"


@dataclass(frozen=True, slots=True)
class CancelResult:
    outcome: Cancel
    order: StoredOrder | None = None


@dataclass(frozen=True, slots=True)
class Refund:
    """A payment that arrived for a closed order: the money is to be returned."""

    notify_id: str
    order_no: str
    amount: int
    received_at: str  # RFC 3339, UTC

    def public(self) -> dict[str, Any]:
        return {"notify_id": self.notify_id, "order_no": self.order_no, "amount": self.amount,
                "received_at": self.received_at}


@dataclass(frozen=True, slots=True)
class Release:
    """A queued release (a row of the outbox), as claimed by a sender."""

    order_no: str
    reason: str
    attempts: int  # including the one being made


def _timestamp(value: Any) -> str:
    """A stored timestamp as RFC 3339 UTC with milliseconds, on both databases (SQLite
    stores that text already; PostgreSQL returns a datetime)."""
    if isinstance(value, datetime):
        when = value.astimezone(UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return str(value)


ORDER_COLUMNS = ("order_no, sku, user_id, quantity, amount, units, admitted_at, pay_by, state, "
                 "state_version")
SELECT_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_no = $1"
INSERT_ORDER = ("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units, admitted_at, "
                "pay_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
INSERT_UNIT = "INSERT INTO order_units (sku, unit, order_no) VALUES ($1, $2, $3)"
UNIT_HOLDER = "SELECT order_no FROM order_units WHERE sku = $1 AND unit = $2 AND live"
INSERT_PAYMENT = ("INSERT INTO payments (notify_id, order_no, amount, status, refund_due) "
                  "VALUES ($1, $2, $3, $4, $5)")
SELECT_PAYMENT = "SELECT order_no, amount, status, refund_due FROM payments WHERE notify_id = $1"
REFUNDS = ("SELECT notify_id, order_no, amount, received_at FROM payments WHERE refund_due "
           "ORDER BY received_at, notify_id")
PAY = ("UPDATE orders SET state = 'paid', state_version = state_version + 1 "
       "WHERE order_no = $1 AND state = 'pending'")
SHIP = ("UPDATE orders SET state = 'shipped', state_version = state_version + 1 "
        "WHERE order_no = $1 AND state = 'paid' AND state_version = $2")
CANCEL = ("UPDATE orders SET state = 'cancelled', state_version = state_version + 1 "
          "WHERE order_no = $1 AND state = 'pending'")
# {lock}: the dialect's row-locking clause (PostgreSQL: FOR UPDATE SKIP LOCKED), so that
# services sharing the database take disjoint batches instead of queueing on each other.
EXPIRE_DUE = ("UPDATE orders SET state = 'expired', state_version = state_version + 1 "
              "WHERE state = 'pending' AND order_no IN ("
              "SELECT order_no FROM orders WHERE state = 'pending' AND pay_by < $1 "
              "ORDER BY pay_by LIMIT $2{lock}) RETURNING order_no")
# Cheap looks (a partial index each) before a background round takes a write lock:
# on SQLite a write transaction excludes every other writer, even when it finds nothing.
ANY_DUE = "SELECT 1 FROM orders WHERE state = 'pending' AND pay_by < $1 LIMIT 1"
ANY_RELEASE_DUE = ("SELECT 1 FROM releases WHERE done_at IS NULL AND next_attempt_at <= $1 "
                   "LIMIT 1")
FREE_UNITS = "UPDATE order_units SET live = FALSE WHERE order_no = $1"
QUEUE_RELEASE = "INSERT INTO releases (order_no, reason, next_attempt_at) VALUES ($1, $2, $3)"
# Claiming a release moves its next_attempt_at past a lease: until then no other sender
# picks it, and if this one dies the lease runs out and another sends it.
CLAIM_RELEASES = ("UPDATE releases SET attempts = attempts + 1, next_attempt_at = $2 "
                  "WHERE done_at IS NULL AND next_attempt_at <= $1 AND order_no IN ("
                  "SELECT order_no FROM releases WHERE done_at IS NULL AND next_attempt_at <= $1 "
                  "ORDER BY next_attempt_at LIMIT $3{lock}) RETURNING order_no, reason, attempts")
FINISH_RELEASE = ("UPDATE releases SET done_at = $2, outcome = $3 "
                  "WHERE order_no = $1 AND done_at IS NULL")
POSTPONE_RELEASE = ("UPDATE releases SET next_attempt_at = $2 "
                    "WHERE order_no = $1 AND done_at IS NULL")
RELEASES_PENDING = "SELECT count(*) FROM releases WHERE done_at IS NULL"
LIST_ORDERS = f"SELECT {ORDER_COLUMNS} FROM orders WHERE sku = $1 ORDER BY order_no"

# A unique violation on a unit whose holder is gone by the time we look (the holder was
# closed meanwhile, which frees its units) is worth another try.
_INSERT_ATTEMPTS = 3


class OrdersDb(ABC):
    """The orders store. ``open()`` connects and creates the schema (idempotently)."""

    #: Errors meaning "the database is unreachable or busy": answered 503, retried.
    failures: tuple[type[BaseException], ...] = ()
    #: Appended to a work-queue claim's subquery: how concurrent claimers skip each
    #: other's rows ("" where the database runs one writer at a time, as SQLite does).
    skip_locked: str = ""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self, readonly: bool = False) -> AbstractAsyncContextManager[Tx]:
        """Committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def is_unique_violation(self, exc: BaseException) -> bool: ...

    # -- orders -----------------------------------------------------------------------

    async def insert_order(self, order: NewOrder) -> InsertResult:
        """Store the order and its units in one transaction."""
        for _ in range(_INSERT_ATTEMPTS):
            step = "order"
            try:
                async with self.transaction() as tx:
                    await tx.execute(INSERT_ORDER, order.order_no, order.sku, order.user_id,
                                     order.quantity, order.amount,
                                     ",".join(map(str, order.units)), order.admitted_at,
                                     order.pay_by)
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
        """Record the notification once per notify_id; a SUCCESS moves pending -> paid.
        A SUCCESS for a closed order is recorded as due for refund and moves nothing."""
        try:
            async with self.transaction() as tx:
                order = await self._order(tx, notice.order_no)
                if order is None:
                    return PaymentResult(Payment.NO_ORDER)
                if order.amount != notice.amount:
                    return PaymentResult(Payment.AMOUNT_MISMATCH, order)
                success = notice.status == "SUCCESS"
                moved = success and await tx.execute(PAY, notice.order_no) == 1
                # Read again: the state the conditional update found (a cancel or an
                # expiry may have committed since the first read).
                order = await self._order(tx, notice.order_no)
                assert order is not None  # orders are never deleted
                refund_due = success and not moved and order.state in CLOSED_STATES
                await tx.execute(INSERT_PAYMENT, notice.notify_id, notice.order_no, notice.amount,
                                 notice.status, refund_due)
        except Exception as exc:
            if not self.is_unique_violation(exc):
                raise
            return await self._repeated_payment(notice)
        outcome = (Payment.APPLIED if moved
                   else Payment.ORDER_CLOSED if refund_due else Payment.RECORDED)
        return PaymentResult(outcome, order)

    async def _repeated_payment(self, notice: PaymentNotice) -> PaymentResult:
        """The notify_id is recorded: the same answer again, or a misuse of the id."""
        async with self.transaction(readonly=True) as tx:
            prior = await tx.fetchone(SELECT_PAYMENT, notice.notify_id)
            order = await self._order(tx, notice.order_no)
        assert prior is not None  # payments are never deleted
        order_no, amount, status, refund_due = prior
        if (order_no, int(amount), status) != (notice.order_no, notice.amount, notice.status):
            return PaymentResult(Payment.NOTIFY_ID_REUSED, order)
        outcome = Payment.ORDER_CLOSED if refund_due else Payment.RECORDED
        return PaymentResult(outcome, order, duplicate=True)

    async def refunds(self) -> list[Refund]:
        """Payments that arrived for closed orders, oldest first."""
        async with self.transaction(readonly=True) as tx:
            rows = await tx.fetchall(REFUNDS)
        return [Refund(notify_id, order_no, int(amount), _timestamp(received_at))
                for notify_id, order_no, amount, received_at in rows]

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

    # -- closing orders: cancel and expiry ---------------------------------------------

    async def cancel(self, order_no: str, now_ms: int) -> CancelResult:
        """pending -> cancelled, freeing the units and queueing the release."""
        async with self.transaction() as tx:
            moved = await tx.execute(CANCEL, order_no) == 1
            if moved:
                await self._close(tx, [order_no], "cancelled", now_ms)
            order = await self._order(tx, order_no)
        if order is None:
            return CancelResult(Cancel.NO_ORDER)
        if moved:
            return CancelResult(Cancel.CANCELLED, order)
        if order.state == "cancelled":
            return CancelResult(Cancel.ALREADY_CANCELLED, order)
        return CancelResult(Cancel.WRONG_STATE, order)

    async def expire_due(self, now_ms: int, limit: int = 500) -> list[str]:
        """pending -> expired for up to ``limit`` orders whose ``pay_by`` < ``now_ms``,
        freeing their units and queueing their releases; the orders expired."""
        if not await self._exists(ANY_DUE, now_ms):
            return []
        async with self.transaction() as tx:
            rows = await tx.fetchall(EXPIRE_DUE.format(lock=self.skip_locked), now_ms, limit)
            expired = [row[0] for row in rows]
            if expired:
                await self._close(tx, expired, "expired", now_ms)
        return expired

    async def _exists(self, sql: str, *args: Any) -> bool:
        async with self.transaction(readonly=True) as tx:
            return await tx.fetchone(sql, *args) is not None

    @staticmethod
    async def _close(tx: Tx, order_nos: list[str], reason: str, now_ms: int) -> None:
        """In the transaction that closed the orders: their units go back to the pool of
        sellable units, and their releases are queued, due now."""
        await tx.executemany(FREE_UNITS, [(no,) for no in order_nos])
        await tx.executemany(QUEUE_RELEASE, [(no, reason, now_ms) for no in order_nos])

    # -- the release outbox ------------------------------------------------------------

    async def claim_releases(self, now_ms: int, lease_ms: int, limit: int) -> list[Release]:
        """Up to ``limit`` due releases, leased to the caller for ``lease_ms``."""
        if not await self._exists(ANY_RELEASE_DUE, now_ms):
            return []
        async with self.transaction() as tx:
            rows = await tx.fetchall(CLAIM_RELEASES.format(lock=self.skip_locked),
                                     now_ms, now_ms + lease_ms, limit)
        return [Release(order_no, reason, int(attempts)) for order_no, reason, attempts in rows]

    async def finish_release(self, order_no: str, now_ms: int, outcome: str) -> None:
        """The gateway answered for good (``released``, or ``unknown_order``)."""
        async with self.transaction() as tx:
            await tx.execute(FINISH_RELEASE, order_no, now_ms, outcome)

    async def postpone_release(self, order_no: str, next_attempt_ms: int) -> None:
        async with self.transaction() as tx:
            await tx.execute(POSTPONE_RELEASE, order_no, next_attempt_ms)

    async def releases_pending(self) -> int:
        async with self.transaction(readonly=True) as tx:
            row = await tx.fetchone(RELEASES_PENDING)
        return int(row[0]) if row else 0


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
