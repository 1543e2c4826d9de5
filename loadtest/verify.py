"""Invariant verifier: after a load run, check that the sale's state keeps the contract.

    python -m loadtest.verify --sku SKU [--redis-url URL] [--redis-mode standalone|cluster]
        [--key-prefix P] [--database-url URL | --no-db] [--admitted FILE]
        [--expect-sold-out] [--wait-delivery SECONDS] [--json]

Defaults come from the same ``SECKILL_*`` environment variables (and ``--config`` TOML
file) as the gateway, through ``gateway.config.load_settings``; ``--admitted`` defaults
to ``SECKILL_LT_RECORD`` or ``loadtest/reports/admitted.jsonl``.

What it reads (nothing is written):

* Redis, through ``gateway.store.Store`` / ``gateway.keys.KeySpace``: the sale record,
  every shard's stock hash, free-unit ranges, buyers, order index and order records, and
  the transfer records (outgoing on the donor, applied ids on the receiver);
* the record file the Locust scenarios write (``loadtest.records``): the ``200 OK``s
  they received (also the original outcome carried in a ``409 IDEMPOTENT_CONFLICT``
  body), for every SKU of the run; the payments and cancels they sent to the orders
  service; the sales they created, with their window and payment deadline;
* the orders store of the bundled orders service (SQLite or PostgreSQL, see
  ``loadtest.ordersdb``): orders with their state, units with their ``live`` flag,
  payments, and the outbox of releases. It is read whenever a database URL is given
  (the default is the gateway's ``SECKILL_DATABASE_URL``); a store that is not there is
  a failure to verify (exit 2), never a pass. Only ``--no-db`` skips it.

Order records in Redis read ``admitted``, ``delivered``, ``rejected`` (the endpoint
refused it) or ``released`` (the orders service closed it, ``expired`` or ``cancelled``,
and told the gateway; field ``reason``). ``rejected`` and ``released`` orders gave their
units back: both count as returned. Records of gateways without releases simply have
none.

The contract's invariants, and how each is checked (``Violation.kind`` in brackets):

0. The sale exists [``sale_missing``]; nothing was admitted before its ``starts_at``
   [``admitted_before_start``].
1. Units admitted <= stock, no unit twice, conservation. In Redis every unit 1..S is
   exactly once free (in some shard's ranges), sold (in an ``admitted`` or ``delivered``
   order) or in a transfer that the receiver has not applied [``unit_out_of_range``,
   ``unit_sold_twice``, ``unit_free_twice``, ``unit_free_and_sold``, ``unit_lost``,
   ``oversold``]; the counters agree with that, every order has a known status
   [``counter_mismatch``, ``order_status_unknown``]. Units of a rejected order that are
   neither free nor sold again were kept because the store had them under another order
   (``UNIT_TAKEN``); with a DB they must be there [``unit_lost``]. A released order
   keeps nothing. In the DB no unit is held by two live orders [``db_unit_twice``] and
   every DB unit belongs to an order Redis admitted with that unit
   [``db_unit_not_admitted``].
2. Per user and SKU, units held <= per-user limit [``user_over_limit``]; the shard's
   buyer counts match the orders [``buyers_mismatch``] (a released order may still count
   against its buyer or not: the contract does not say).
3. One key, one outcome: in the record file no (user, key) with two order numbers
   [``key_two_outcomes``] and no order number under two keys [``order_two_keys``].
4. With ``--expect-sold-out`` (demand >= stock and nothing failed): units sold = stock
   [``not_sold_out``].
5. Every 200 in the record file is an order in Redis with the same user and units
   [``admitted_order_missing``, ``admitted_mismatch``, ``record_malformed``]; with a DB,
   every order Redis holds as sold is exactly one DB order with the same user and units
   [``db_order_missing``, ``db_order_twice``, ``db_order_mismatch``], a rejected order is
   not in the DB [``rejected_in_db``]; its units went back (see 1). A DB that cannot be
   read is [``db_unreadable``].
7. Lifecycle: a unit is in at most one live order (``pending``, ``paid``, ``shipped``)
   and a unit row is live exactly when its order is [``db_unit_twice``,
   ``db_live_mismatch``]; an order the gateway released is closed in the DB, for the
   same reason [``released_but_live``, ``release_reason_mismatch``]; a closed order whose
   release the gateway acknowledged is released in Redis [``release_not_applied``]; a
   paid (or shipped) order is never released or closed, and a payment answered 200 stays
   paid [``paid_order_released``]; a payment answered ``409 ORDER_CLOSED`` is due for
   refund [``late_payment_not_refunded``]; units sold − units given back = units in live
   orders + units in flight (admitted, not yet delivered; or closed, release on its way)
   [``units_unbalanced``]. That units go back once and are sold again at most once is
   invariant 1 applied to released orders: a unit twice free, free and sold, or in two
   active orders is reported there.
8. A key admits at most one purchase across all sales: in the record file no (user, key)
   has orders in two SKUs [``key_two_sales``].
9. Waiting room (a sale with ``admit_rate``, from the record's ``sale`` line or the stored
   sale): from the record's ``queue`` and ``queue_buy`` lines, no purchase admitted
   without the buyer's own pass, and (a sale the run created) no order of a user the
   room never admitted [``purchase_without_pass``, ``order_without_admission``]; at
   most R admissions per second plus one second's burst [``admission_rate_exceeded``];
   first in, first out for who joined after the start, shuffled who joined before it,
   nobody let through before it [``admitted_out_of_order``, ``not_shuffled``,
   ``queue_admitted_before_start``]; positions never grow [``position_grew``]; one
   user, one place [``two_tickets``, ``ticket_shared``, ``pass_shared``,
   ``admitted_twice``]; after a first 410 nobody is told to wait on, unless units came
   back [``queued_after_sold_out``]. How each is measured: ``loadtest/waitingroom.py``. The table
   adds the room's figures: joined, admitted, bought, admissions per second, wait
   percentiles, Spearman rho of join against admission order.

Exit status: 0 clean, 1 violations (listed), 2 could not verify (no such sale, Redis or
DB unreachable, no orders DB where one was expected).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.models import Order, Sale, Transfer
from gateway.store.connection import connect
from gateway.store.keys import KeySpace, shard_of_order
from gateway.store.store import Store
from loadtest import records, waitingroom
from loadtest.ordersdb import (
    PAID_STATES,
    DbMissing,
    DbOrder,
    DbSnapshot,
    read_db,
    sqlite_path,
)
from loadtest.records import (
    Admission,
    CancelCall,
    PaymentCall,
    QueueAnswer,
    QueueBuy,
    QueueStats,
    Record,
    SaleNote,
)
from loadtest.waitingroom import DEFAULT_TOLERANCE, Tolerance

__all__ = ["ACTIVE", "RETURNED", "AdmittedRecord", "DbOrder", "DbSnapshot", "Snapshot", "Violation",
           "check", "collect", "collect_stable", "delivery_pending", "main", "render", "sqlite_path",
           "summary"]

LOADTEST_DIR = Path(__file__).resolve().parent
DEFAULT_RECORD = LOADTEST_DIR / "reports" / "admitted.jsonl"
ACTIVE = ("admitted", "delivered")  # order statuses that hold their units
RETURNED = ("rejected", "released")  # order statuses whose units went back to the sale
KNOWN_STATUSES = ACTIVE + RETURNED
RELEASE_REASONS = ("expired", "cancelled")
CHUNK = 500  # commands per pipeline

INVARIANTS = {
    0: "the sale exists, and admits nothing before its start",
    1: "units <= stock, no unit twice, conservation",
    2: "per-user limit",
    3: "one key, one outcome",
    4: "demand >= stock sells out",
    5: "every 200 is an order (in Redis and the DB)",
    7: "a unit in at most one live order; released units come back once; paid orders stay paid",
    8: "a key admits at most one purchase across all sales",
    9: "waiting room: admission order and rate, no purchase without a pass",
}

AdmittedRecord = Admission  # the name earlier versions exported


def default_record_path() -> Path:
    return Path(os.environ.get("SECKILL_LT_RECORD") or DEFAULT_RECORD)


# -- what was read -----------------------------------------------------------------------

@dataclass(slots=True)
class ShardSnapshot:
    shard: int
    exists: bool
    remaining: int
    sold: int
    version: int
    free_ranges: list[str]
    buyers: dict[str, str]
    order_nos: list[str]
    transfers_out: dict[str, str]
    transfers_in: set[str]


@dataclass(frozen=True, slots=True)
class SaleWindow:
    """When the sale opens and how long an order may stay unpaid, as the run asked for
    them (the record file) or the gateway stored them; None: not set, or not known."""

    starts_at_ms: int | None = None
    payment_ttl: int | None = None
    admit_rate: float | None = None  # the waiting room's; None: the sale has none

    @classmethod
    def of(cls, note: SaleNote | None, stored: Mapping[str, Any]) -> SaleWindow:
        starts = note.starts_at_ms if note is not None else None
        ttl = note.payment_ttl if note is not None else None
        rate = note.admit_rate if note is not None else None
        if starts is None:
            starts = records.epoch_ms(stored.get("starts_at_ms", stored.get("starts_at")))
        if ttl is None and isinstance(stored.get("payment_ttl"), int):
            ttl = int(stored["payment_ttl"])
        if rate is None and isinstance(stored.get("admit_rate"), int | float):
            rate = float(stored["admit_rate"])
        return cls(starts, ttl or None, rate or None)


@dataclass(slots=True)
class Snapshot:
    sku: str
    sale: Sale | None
    shards: list[ShardSnapshot] = field(default_factory=list)
    orders: dict[str, Order] = field(default_factory=dict)  # every order of the sale's indexes
    index_without_record: list[tuple[int, str]] = field(default_factory=list)
    malformed_orders: list[str] = field(default_factory=list)
    sale_record: dict[str, Any] = field(default_factory=dict)  # the stored sale, as JSON
    window: SaleWindow = SaleWindow()
    admitted: list[Admission] = field(default_factory=list)  # this SKU's 200s
    admitted_errors: list[str] = field(default_factory=list)
    admitted_skipped: int = 0  # 200s of other SKUs
    every_admission: list[Admission] = field(default_factory=list)  # every SKU's (invariant 8)
    payments: list[PaymentCall] = field(default_factory=list)
    cancels: list[CancelCall] = field(default_factory=list)
    queue: list[QueueAnswer] = field(default_factory=list)  # the waiting room's answers (this SKU)
    queue_buys: list[QueueBuy] = field(default_factory=list)
    queue_stats: list[QueueStats] = field(default_factory=list)
    created_by_run: bool = False  # the record says the run created the sale: every buyer is in it
    looked_up: dict[str, Order | None] = field(default_factory=dict)  # admitted orders not indexed
    db: DbSnapshot | None = None
    db_problem: str | None = None  # a DB was expected and could not be read
    notes: list[str] = field(default_factory=list)

    def redis_fingerprint(self) -> tuple[Any, ...]:
        """What must not change between two reads for a snapshot to be consistent."""
        return (
            tuple((s.remaining, s.sold, s.version, tuple(s.free_ranges), tuple(sorted(s.transfers_out)),
                   len(s.transfers_in), len(s.order_nos)) for s in self.shards),
            tuple(sorted((o.order_no, o.status) for o in self.orders.values())),
        )

    def fingerprint(self) -> tuple[Any, ...]:
        """Redis and the DB: two successive reads that agree saw no order move between
        the stores (a release or an expiry half-seen would make them differ)."""
        return self.redis_fingerprint(), self.db.fingerprint() if self.db is not None else None

    def order(self, order_no: str) -> Order | None:
        return self.orders.get(order_no) or self.looked_up.get(order_no)

    def settled_orders(self) -> list[Order]:
        """The sale's orders, and those the record file named that the index lacks."""
        found = dict(self.orders)
        found.update({k: v for k, v in self.looked_up.items() if v is not None})
        return list(found.values())


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    invariant: int
    message: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.kind}: {self.message}"


# -- reading -------------------------------------------------------------------------------

async def _pipelined(store: Store, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(calls), CHUNK):
        pipe = store.client.pipeline(transaction=False)
        for name, args in calls[start:start + CHUNK]:
            getattr(pipe, name)(*args)
        out.extend(await pipe.execute())
    return out


def order_from_record(record: Mapping[str, str]) -> Order:
    """An order record, old or new: a released order's reason is ``reason`` (or, as the
    public API names it, ``release_reason``)."""
    order = Order.from_record(record)
    if not order.reason and record.get("release_reason"):
        order = dataclasses.replace(order, reason=record["release_reason"])
    return order


async def read_sale_record(store: Store, sku: str) -> dict[str, Any]:
    """The stored sale's settings (its window in epoch ms; 0: none), whatever its state."""
    found = await store.sale_record(sku)
    if found is None:
        return {}
    sale, state = found
    return {"state": state, "stock": sale.stock, "shards": sale.shards,
            "starts_at_ms": sale.starts_at or None, "ends_at_ms": sale.ends_at or None,
            "payment_ttl": sale.payment_ttl, "admit_rate": getattr(sale, "admit_rate", 0) or None}


async def read_redis(store: Store, sku: str) -> Snapshot:
    sale = await store.get_sale(sku)
    snap = Snapshot(sku=sku, sale=sale)
    if sale is None:
        return snap
    snap.sale_record = await read_sale_record(store, sku)
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for shard in range(sale.shards):
        sk = store.keys.shard(sku, shard)
        calls += [("hmget", (sk.stock, "remaining", "sold", "version")), ("exists", (sk.stock,)),
                  ("lrange", (sk.units, 0, -1)), ("hgetall", (sk.buyers,)),
                  ("smembers", (sk.order_index,)), ("hgetall", (sk.transfers_out,)),
                  ("smembers", (sk.transfers_in,))]
    replies = await _pipelined(store, calls)
    for shard in range(sale.shards):
        (remaining, sold, ver), exists, ranges, buyers, index, xout, xin = replies[7 * shard:7 * shard + 7]
        snap.shards.append(ShardSnapshot(
            shard=shard, exists=bool(exists), remaining=int(remaining or 0), sold=int(sold or 0),
            version=int(ver or 0), free_ranges=list(ranges), buyers=dict(buyers),
            order_nos=sorted(index), transfers_out=dict(xout), transfers_in=set(xin)))
    wanted = [(s.shard, order_no) for s in snap.shards for order_no in s.order_nos]
    found = await _pipelined(
        store, [("hgetall", (store.keys.shard(sku, shard).order(order_no),)) for shard, order_no in wanted])
    for (shard, order_no), record in zip(wanted, found):
        if not record:
            snap.index_without_record.append((shard, order_no))
            continue
        try:
            snap.orders[order_no] = order_from_record(record)
        except (ValueError, KeyError):
            snap.malformed_orders.append(f"shard {shard}: order {order_no}: {dict(record)!r:.160}")
    return snap


async def lookup_orders(store: Store, order_nos: Iterable[str]) -> dict[str, Order | None]:
    """Order records by number, for numbers the sale's index does not list."""
    wanted = [(o, shard_of_order(o)) for o in dict.fromkeys(order_nos)]
    found: dict[str, Order | None] = {o: None for o, shard in wanted if shard is None}
    located = [(o, shard) for o, shard in wanted if shard is not None]
    replies = await _pipelined(store, [("hgetall", (store.keys.order(o, shard),)) for o, shard in located])
    for (order_no, _), record in zip(located, replies):
        try:
            found[order_no] = order_from_record(record) if record else None
        except (ValueError, KeyError):
            found[order_no] = None
    return found


def _this_sale(admissions: Iterable[Admission], sku: str) -> list[Admission]:
    """This SKU's 200s; lines that named no SKU (old files) are taken as this SKU's."""
    return [a if a.sku == sku else dataclasses.replace(a, sku=sku)
            for a in admissions if a.sku in (None, sku)]


def read_admitted(path: str | Path | None, sku: str) -> tuple[list[Admission], list[str], int]:
    """The record file's 200s for ``sku``; malformed lines; 200s of other SKUs."""
    record = records.read_record(path)
    mine = _this_sale(record.admissions, sku)
    return mine, record.errors, len(record.admissions) - len(mine)


def _take_record(snap: Snapshot, record: Record) -> None:
    sku = snap.sku
    snap.admitted = _this_sale(record.admissions, sku)
    snap.admitted_errors = list(record.errors)
    snap.admitted_skipped = len(record.admissions) - len(snap.admitted)
    snap.every_admission = [a if a.sku is not None else dataclasses.replace(a, sku=sku)
                            for a in record.admissions]
    snap.payments = record.payments_for(sku)
    snap.cancels = record.cancels_for(sku)
    snap.window = SaleWindow.of(record.sale(sku), snap.sale_record)
    snap.queue = record.queue_for(sku)
    snap.queue_buys = record.queue_buys_for(sku)
    snap.queue_stats = record.queue_stats_for(sku)
    note = record.sale(sku)
    snap.created_by_run = note is not None and note.outcome == "created"


async def collect(store: Store, sku: str, *, admitted: str | Path | None = None,
                  database_url: str | None = None) -> Snapshot:
    """Read everything the checks need: Redis, the record file and, when a database URL
    is given, the orders DB (``snap.db_problem`` says why it could not be read)."""
    snap = await read_redis(store, sku)
    _take_record(snap, records.read_record(admitted))
    if admitted is not None and not Path(admitted).exists():
        snap.notes.append(f"no record file at {admitted}")
    unindexed = [r.order_no for r in snap.admitted if r.order_no not in snap.orders]
    if unindexed:
        snap.looked_up = await lookup_orders(store, unindexed)
    if database_url:
        try:
            snap.db = await read_db(database_url, sku)
        except DbMissing as exc:
            snap.db_problem = str(exc)
    return snap


async def collect_stable(store: Store, sku: str, *, attempts: int = 5, **kwargs: Any) -> Snapshot:
    """Collect until two successive reads of Redis and the DB agree (the relay may still
    be delivering, the orders service expiring and releasing); the last read after
    ``attempts`` otherwise."""
    snap = await collect(store, sku, **kwargs)
    for _ in range(attempts):
        again = await collect(store, sku, **kwargs)
        if again.fingerprint() == snap.fingerprint():
            return again
        snap = again
        await asyncio.sleep(0.2)
    snap.notes.append("Redis or the DB kept changing while they were read: the snapshot may be torn")
    return snap


def delivery_pending(snap: Snapshot) -> int:
    """Orders not yet settled, i.e. that the relay, the orders service or the gateway
    will still move: ``admitted`` in Redis and not in the DB; closed in the DB with the
    release not yet applied; ``pending`` in the DB with a payment deadline ahead (it will
    be paid or expire). Without a DB: orders still ``admitted``."""
    if snap.db is None:
        return sum(1 for o in snap.orders.values() if o.status == "admitted"
                   or (snap.db_problem is not None and o.status in ACTIVE))
    db_orders = {o.order_no: o for o in snap.db.orders}
    moving = 0
    for order in snap.orders.values():
        row = db_orders.get(order.order_no)
        if order.status in ACTIVE and (row is None or row.closed):
            moving += 1
    moving += sum(1 for o in snap.db.orders if o.state == "pending" and o.pay_by is not None)
    moving += sum(1 for r in snap.db.releases.values() if not r.done)
    return moving


async def wait_for_delivery(store: Store, sku: str, seconds: float, *, every: float = 0.5,
                            **kwargs: Any) -> Snapshot:
    deadline = time.monotonic() + seconds
    while True:
        snap = await collect(store, sku, **kwargs)
        if (snap.db_problem is None and delivery_pending(snap) == 0) or time.monotonic() >= deadline:
            return snap
        await asyncio.sleep(every)


# -- checking ------------------------------------------------------------------------------

@dataclass(slots=True)
class Accounting:
    """Where every unit is, derived from a snapshot."""

    free: Counter[int] = field(default_factory=Counter)        # unit -> times in free ranges
    free_by_shard: dict[int, int] = field(default_factory=dict)
    sold: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # unit -> active orders
    in_transfer: Counter[int] = field(default_factory=Counter)
    pending_transfers: int = 0
    kept: dict[int, str] = field(default_factory=dict)        # unit -> rejected order that kept it
    kept_by_shard: Counter[int] = field(default_factory=Counter)
    active_by_shard: Counter[int] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)


def _expand(ranges: Iterable[str], where: str, acc: Accounting) -> list[int]:
    units: list[int] = []
    for text in ranges:
        for part in text.split(","):
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi)
            except ValueError:
                acc.malformed.append(f"{where}: {part!r}")
                continue
            if not dash or b < a:
                acc.malformed.append(f"{where}: {part!r}")
                continue
            units.extend(range(a, b + 1))
    return units


def _shard_of(order: Order) -> int:
    shard = shard_of_order(order.order_no)
    return -1 if shard is None else shard


def account(snap: Snapshot) -> Accounting:
    acc = Accounting()
    shards = {s.shard: s for s in snap.shards}
    for s in snap.shards:
        units = _expand(s.free_ranges, f"free ranges of shard {s.shard}", acc)
        acc.free.update(units)
        acc.free_by_shard[s.shard] = len(units)
        for transfer_id, record in s.transfers_out.items():
            try:
                transfer = Transfer.parse(transfer_id, s.shard, record)
                applied = transfer_id in shards[transfer.receiver].transfers_in
            except (ValueError, KeyError, TypeError):
                acc.malformed.append(f"transfer {transfer_id} of shard {s.shard}: {record!r}")
                continue
            if not applied:
                acc.pending_transfers += 1
                acc.in_transfer.update(_expand([transfer.ranges], f"transfer {transfer_id}", acc))
    for order in snap.orders.values():
        if order.status in ACTIVE:
            for unit in order.units:
                acc.sold[unit].append(order.order_no)
            acc.active_by_shard[_shard_of(order)] += len(order.units)
    db_units = {} if snap.db is None else dict(snap.db.live_claims())
    for order in snap.orders.values():
        if order.status != "rejected":
            continue  # only a refused delivery may keep units (UNIT_TAKEN); a release keeps none
        for unit in order.units:
            if unit in acc.free or unit in acc.sold or unit in acc.in_transfer:
                continue  # returned (and maybe sold again)
            if snap.db is not None and db_units.get(unit, order.order_no) == order.order_no:
                continue  # the DB does not hold it for another order: lost, see check_units
            acc.kept[unit] = order.order_no
            acc.kept_by_shard[_shard_of(order)] += 1
    return acc


def _few(items: Iterable[Any], n: int = 8) -> str:
    items = list(items)
    text = ", ".join(str(i) for i in items[:n])
    return text + (f", … ({len(items)} in all)" if len(items) > n else "")


def check_units(snap: Snapshot, acc: Accounting) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    out: list[Violation] = []
    stock = sale.stock
    valid = range(1, stock + 1)
    for text in acc.malformed:
        out.append(Violation("counter_mismatch", 1, f"malformed unit data in {text}"))
    every = set(acc.free) | set(acc.sold) | set(acc.in_transfer) | set(acc.kept)
    outside = sorted(u for u in every if u not in valid)
    if outside:
        out.append(Violation("unit_out_of_range", 1, f"units outside 1..{stock}: {_few(outside)}"))
    for unit, orders in sorted(acc.sold.items()):
        if len(orders) > 1:
            out.append(Violation("unit_sold_twice", 1, f"unit {unit} is in orders {', '.join(orders)}"))
    twice_free = sorted(u for u, n in acc.free.items() if n > 1)
    if twice_free:
        out.append(Violation("unit_free_twice", 1, f"units free more than once: {_few(twice_free)}"))
    twice_moving = sorted(u for u, n in acc.in_transfer.items() if n > 1 or u in acc.free)
    if twice_moving:
        out.append(Violation("unit_free_twice", 1,
                             f"units in transfer twice, or in transfer and free: {_few(twice_moving)}"))
    free_sold = sorted(u for u in acc.free if u in acc.sold)
    if free_sold:
        out.append(Violation("unit_free_and_sold", 1,
                             f"units both free and in an order: "
                             f"{_few(f'{u} ({acc.sold[u][0]})' for u in free_sold)}"))
    moving_sold = sorted(u for u in acc.in_transfer if u in acc.sold)
    if moving_sold:
        out.append(Violation("unit_free_and_sold", 1, f"units both in transfer and in an order: {_few(moving_sold)}"))
    lost = [u for u in valid if u not in every]
    if lost:
        returned = {u: o for o in snap.orders.values() if o.status in RETURNED for u in o.units}
        why = [f"{u} ({returned[u].status} {returned[u].order_no}, not returned)" if u in returned else str(u)
               for u in lost]
        out.append(Violation("unit_lost", 1, f"units neither free, sold nor in transfer: {_few(why)}"))
    sold_total = len(acc.sold)
    if sold_total > stock:
        out.append(Violation("oversold", 1, f"{sold_total} units in orders, stock {stock}"))
    out += _check_counters(snap, acc)
    return out


def _check_counters(snap: Snapshot, acc: Accounting) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    out: list[Violation] = []
    for s in snap.shards:
        if not s.exists:
            out.append(Violation("counter_mismatch", 1, f"shard {s.shard}: stock hash missing"))
            continue
        free = acc.free_by_shard.get(s.shard, 0)
        if s.remaining != free:
            out.append(Violation("counter_mismatch", 1,
                                 f"shard {s.shard}: remaining counter {s.remaining}, free ranges hold {free}"))
        expected = acc.active_by_shard.get(s.shard, 0) + acc.kept_by_shard.get(s.shard, 0)
        if s.sold != expected:
            out.append(Violation("counter_mismatch", 1,
                                 f"shard {s.shard}: sold counter {s.sold}, its orders hold {expected}"))
    total = sum(s.remaining for s in snap.shards) + sum(s.sold for s in snap.shards) + sum(acc.in_transfer.values())
    if total != sale.stock:
        out.append(Violation("counter_mismatch", 1,
                             f"remaining + sold + in transfer = {total}, stock {sale.stock}"))
    for shard, order_no in snap.index_without_record:
        out.append(Violation("counter_mismatch", 1, f"shard {shard}: order {order_no} indexed, record missing"))
    for text in snap.malformed_orders:
        out.append(Violation("counter_mismatch", 1, f"malformed order record: {text}"))
    for order in snap.orders.values():
        if order.sku != snap.sku or len(order.units) != order.purchase.quantity:
            out.append(Violation("counter_mismatch", 1,
                                 f"order {order.order_no}: sku {order.sku}, quantity {order.purchase.quantity}, "
                                 f"units {list(order.units)}"))
        if order.status not in KNOWN_STATUSES:
            out.append(Violation("order_status_unknown", 1,
                                 f"order {order.order_no} reads {order.status!r}; known: "
                                 f"{', '.join(KNOWN_STATUSES)}"))
    return out


def check_users(snap: Snapshot) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    out: list[Violation] = []
    held: dict[int, list[Order]] = defaultdict(list)
    released: Counter[int] = Counter()
    for order in snap.orders.values():
        if order.status in ACTIVE:
            held[order.user_id].append(order)
        elif order.status == "released":
            released[order.user_id] += len(order.units)
    for user_id, orders in sorted(held.items()):
        units = sum(len(o.units) for o in orders)
        if units > sale.per_user_limit:
            out.append(Violation("user_over_limit", 2,
                                 f"user {user_id} holds {units} units (limit {sale.per_user_limit}) in "
                                 f"{', '.join(o.order_no for o in orders)}"))
    for s in snap.shards:
        counted = {int(k): int(v) for k, v in s.buyers.items() if not k.endswith(":o")}
        actual = {u: sum(len(o.units) for o in orders) for u, orders in held.items()
                  if sale.shards and u % sale.shards == s.shard}
        users = set(counted) | set(actual) | {u for u in released if sale.shards and u % sale.shards == s.shard}
        for user_id in sorted(users):
            have, want = counted.get(user_id, 0), actual.get(user_id, 0)
            if have != want and have != want + released[user_id]:
                out.append(Violation("buyers_mismatch", 2,
                                     f"shard {s.shard}: user {user_id} counted as holding {have} units, "
                                     f"orders hold {want}" + (f" ({released[user_id]} released)"
                                                              if released[user_id] else "")))
    return out


def check_keys(snap: Snapshot) -> list[Violation]:
    out: list[Violation] = []
    by_key: dict[tuple[int, str], set[str]] = defaultdict(set)
    by_order: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for record in snap.admitted:
        if record.key is None:
            continue
        by_key[(record.user_id, record.key)].add(record.order_no)
        by_order[record.order_no].add((record.user_id, record.key))
    for (user_id, key), orders in sorted(by_key.items()):
        if len(orders) > 1:
            out.append(Violation("key_two_outcomes", 3,
                                 f"user {user_id} key {key[:24]}…: orders {', '.join(sorted(orders))}"))
    for order_no, keys in sorted(by_order.items()):
        if len(keys) > 1:
            out.append(Violation("order_two_keys", 3,
                                 f"order {order_no} answered to {len(keys)} keys: "
                                 f"{_few(f'{u}/{k[:16]}' for u, k in sorted(keys))}"))
    return out


def check_keys_across_sales(snap: Snapshot) -> list[Violation]:
    """Invariant 8: one (user, key) admitted in two SKUs. Reported by the verification of
    each SKU it touches (within one SKU, invariant 3 reports it)."""
    by_key: dict[tuple[int, str], set[tuple[str, str]]] = defaultdict(set)
    for record in snap.every_admission:
        if record.key is not None and record.sku is not None:
            by_key[(record.user_id, record.key)].add((record.sku, record.order_no))
    out: list[Violation] = []
    for (user_id, key), orders in sorted(by_key.items()):
        skus = {sku for sku, _ in orders}
        if len(skus) > 1 and snap.sku in skus:
            out.append(Violation("key_two_sales", 8,
                                 f"user {user_id} key {key[:24]}… admitted in {len(skus)} sales: "
                                 f"{_few(f'{sku}/{no}' for sku, no in sorted(orders))}"))
    return out


def check_sold_out(snap: Snapshot, acc: Accounting) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    sold = len(acc.sold) + len(acc.kept)
    if sold != sale.stock:
        return [Violation("not_sold_out", 4,
                          f"demand >= stock, but {sold} of {sale.stock} units sold "
                          f"({sum(acc.free.values())} free, {sum(acc.in_transfer.values())} in transfer)")]
    return []


def check_window(snap: Snapshot) -> list[Violation]:
    """Nothing admitted before ``starts_at`` (by the gateway's own clock: the order's
    ``admitted_at``)."""
    starts = snap.window.starts_at_ms
    if starts is None:
        return []
    early = sorted((o.purchase.admitted_at, o.order_no) for o in snap.orders.values()
                   if o.purchase.admitted_at < starts)
    if not early:
        return []
    return [Violation("admitted_before_start", 0,
                      f"{len(early)} orders admitted before starts_at {records.rfc3339(starts)}: "
                      f"{_few(f'{no} ({(starts - at) / 1000:.3f} s early)' for at, no in early)}")]


def check_admitted(snap: Snapshot) -> list[Violation]:
    out: list[Violation] = []
    for error in snap.admitted_errors:
        out.append(Violation("record_malformed", 5, error))
    missing: set[str] = set()     # reported once per order ...
    mismatched: set[str] = set()  # ... but every line is compared (a replay may differ)
    for record in snap.admitted:
        order = snap.order(record.order_no)
        if order is None or record.order_no not in snap.orders:
            if record.order_no not in missing:
                where = ("no such order in Redis" if order is None
                         else "it exists but is not in its shard's order index")
                out.append(Violation("admitted_order_missing", 5,
                                     f"line {record.line} ({record.scenario or '?'}): 200 for order "
                                     f"{record.order_no} (user {record.user_id}), {where}"))
            missing.add(record.order_no)
            if order is None:
                continue
        if (order.user_id != record.user_id or tuple(order.units) != record.units
                or order.sku != record.sku) and record.order_no not in mismatched:
            mismatched.add(record.order_no)
            out.append(Violation("admitted_mismatch", 5,
                                 f"line {record.line}: order {record.order_no} answered user {record.user_id} "
                                 f"units {list(record.units)}; Redis has user {order.user_id} "
                                 f"units {list(order.units)} sku {order.sku}"))
    return out


def _check_db_units(snap: Snapshot, db: DbSnapshot, stock: int) -> list[Violation]:
    """No unit held by two live orders; every unit row agrees with its order's unit list;
    every unit the DB ever gave an order is one Redis admitted to that order."""
    out: list[Violation] = []
    live = Counter(unit for unit, _ in db.live_claims())
    holders: dict[int, set[str]] = defaultdict(set)
    for unit, order_no in db.live_claims():
        holders[unit].add(order_no)
    every: dict[int, set[str]] = defaultdict(set)
    for unit, order_no in db.all_claims():
        every[unit].add(order_no)
    for unit in sorted(every):
        if live[unit] > 1:
            out.append(Violation("db_unit_twice", 1,
                                 f"DB holds unit {unit} {live[unit]}x in live orders: "
                                 f"{', '.join(sorted(holders[unit]))}"))
        if not 1 <= unit <= stock:
            out.append(Violation("unit_out_of_range", 1, f"DB holds unit {unit}, stock {stock}"))
    if db.has_order_units:
        listed: dict[str, set[int]] = defaultdict(set)
        for row in db.units:
            listed[row.order_no].add(row.unit)
        for order_no, rows in db.by_order().items():
            if rows[0].units and listed.get(order_no, set()) != set(rows[0].units):
                out.append(Violation("db_order_mismatch", 1,
                                     f"DB order {order_no} lists units {list(rows[0].units)}, "
                                     f"order_units has {sorted(listed.get(order_no, ()))}"))
    recorded = {r.order_no for r in snap.admitted}
    for unit in sorted(every):
        for order_no in sorted(every[unit]):
            order = snap.order(order_no)
            if order is None:
                if order_no in recorded:
                    snap.notes.append(f"DB order {order_no} was answered 200 but Redis lost it (failover?)")
                    continue
                out.append(Violation("db_unit_not_admitted", 1,
                                     f"DB gives unit {unit} to order {order_no}, which Redis never admitted"))
            elif unit not in order.units:
                out.append(Violation("db_unit_not_admitted", 1,
                                     f"DB gives unit {unit} to order {order_no}; Redis admitted it "
                                     f"with units {list(order.units)}"))
    return out


def _check_db_orders(snap: Snapshot, db: DbSnapshot) -> list[Violation]:
    """Each order Redis holds as sold is one DB order with its user and units; a
    rejected one is not there (a released one may be: closed, see the lifecycle)."""
    out: list[Violation] = []
    rows_by_order = db.by_order()
    for order in snap.settled_orders():
        rows = rows_by_order.get(order.order_no, [])
        if order.status == "rejected":
            if rows:
                out.append(Violation("rejected_in_db", 5,
                                     f"order {order.order_no} is rejected in Redis but stored in the DB"))
            continue
        if not rows:
            if order.status != "released":  # released before delivery: never delivered
                out.append(Violation("db_order_missing", 5,
                                     f"order {order.order_no} ({order.status}, user {order.user_id}) "
                                     f"is not in the DB"))
            continue
        if len(rows) > 1:
            out.append(Violation("db_order_twice", 5, f"order {order.order_no} is in the DB {len(rows)} times"))
            continue
        row = rows[0]
        if (row.user_id != order.user_id or (row.units and tuple(row.units) != tuple(order.units))
                or (row.pay_by is not None and order.purchase.pay_by is not None
                    and row.pay_by != order.purchase.pay_by)):
            out.append(Violation("db_order_mismatch", 5,
                                 f"order {order.order_no}: DB user {row.user_id} units {list(row.units)} "
                                 f"pay_by {row.pay_by}, Redis user {order.user_id} units {list(order.units)} "
                                 f"pay_by {order.purchase.pay_by}"))
    return out


def check_db(snap: Snapshot) -> list[Violation]:
    db = snap.db
    sale = snap.sale
    assert db is not None and sale is not None
    # A rejected order's units that are neither free nor sold again must be in the DB
    # under the order that holds them (UNIT_TAKEN); account() leaves them out otherwise
    # and check_units reports them as lost.
    return _check_db_units(snap, db, sale.stock) + _check_db_orders(snap, db)


# -- invariant 7: the lifecycle --------------------------------------------------------------

def _check_live_flags(db: DbSnapshot) -> list[Violation]:
    """A unit row is live exactly when its order is (the store frees the units of the
    orders it closes, in the same transaction)."""
    state = {o.order_no: o for o in db.orders}
    wrong = [(row, state[row.order_no]) for row in db.units
             if row.order_no in state and row.live != state[row.order_no].live]
    if not wrong:
        return []
    return [Violation("db_live_mismatch", 7,
                      f"{len(wrong)} unit rows disagree with their order's state: "
                      f"{_few(f'unit {r.unit} of {o.order_no} ({o.state}) live={r.live}' for r, o in wrong)}")]


def _check_released(order: Order, row: DbOrder) -> list[Violation]:
    """A Redis order the gateway released, against its DB order."""
    if row.state in PAID_STATES:
        return [Violation("paid_order_released", 7,
                          f"order {order.order_no} is {row.state} in the DB but released in Redis "
                          f"({order.reason or 'no reason'}): a paid order's units went back")]
    if row.live:
        return [Violation("released_but_live", 7,
                          f"order {order.order_no} is released in Redis ({order.reason or 'no reason'}) "
                          f"but {row.state or 'live'} in the DB")]
    if order.reason in RELEASE_REASONS and order.reason != row.state:
        return [Violation("release_reason_mismatch", 7,
                          f"order {order.order_no} released as {order.reason}, the DB says {row.state}")]
    return []


def _check_closed(order: Order, row: DbOrder, db: DbSnapshot) -> list[Violation]:
    """A DB order closed while Redis still holds its units: fine while the release is
    on its way, a violation once the gateway acknowledged it."""
    release = db.releases.get(row.order_no)
    if release is None or not release.done:
        return []
    return [Violation("release_not_applied", 7,
                      f"order {order.order_no} is {row.state} in the DB and its release was answered "
                      f"{release.outcome or 'done'}, but Redis still holds it as {order.status}")]


def _check_payments(snap: Snapshot, db: DbSnapshot | None) -> list[Violation]:
    """A payment taken stays taken: the order is never closed or released. A payment
    refused as late is due for refund."""
    out: list[Violation] = []
    rows = db.by_order() if db is not None else {}
    closed_by_db = {o for o, r in rows.items() if r[0].closed}
    taken = {p.order_no for p in snap.payments if p.status == 200 and p.state in ("", *PAID_STATES)}
    if db is not None:
        taken |= {p.order_no for p in db.payments if p.status == "SUCCESS" and not p.refund_due}
    for order_no in sorted(taken):
        order = snap.order(order_no)
        if order_no in closed_by_db or (order is not None and order.status == "released"):
            state = rows[order_no][0].state if order_no in rows else "?"
            out.append(Violation("paid_order_released", 7,
                                 f"order {order_no} was paid, yet it is {state} in the DB and "
                                 f"{order.status if order else 'unknown'} in Redis"))
    if db is None:
        return out
    refunds = {p.notify_id for p in db.payments if p.refund_due}
    for call in snap.payments:
        if call.code == "ORDER_CLOSED" and call.notify_id not in refunds:
            out.append(Violation("late_payment_not_refunded", 7,
                                 f"payment {call.notify_id} for order {call.order_no} was answered 409 "
                                 f"ORDER_CLOSED but is not listed as due for refund"))
    return out


@dataclass(frozen=True, slots=True)
class Balance:
    """Units sold − units given back = units in live orders + units in flight."""

    sold: int          # units of every order Redis admitted (resales counted again)
    returned: int      # units rejected or released orders gave back
    live: int          # units held by live DB orders
    in_flight: int     # units of orders Redis holds that the DB does not (yet) hold live
    releasing: int     # of which: closed in the DB, release not yet applied

    @property
    def balanced(self) -> bool:
        return self.sold - self.returned == self.live + self.in_flight

    def __str__(self) -> str:
        return (f"sold {self.sold} − returned {self.returned} = {self.sold - self.returned}; "
                f"live {self.live} + in flight {self.in_flight} = {self.live + self.in_flight}")


def balance(snap: Snapshot, acc: Accounting, db: DbSnapshot) -> Balance:
    rows = db.by_order()
    kept = Counter(acc.kept.values())  # order_no -> units it kept (UNIT_TAKEN)
    sold = returned = in_flight = releasing = 0
    for order in snap.orders.values():
        sold += len(order.units)
        if order.status in RETURNED:
            returned += len(order.units) - kept[order.order_no]
            continue
        row = rows.get(order.order_no, [None])[0]
        if row is None:
            in_flight += len(order.units)  # not delivered yet
        elif row.closed and not (db.releases.get(order.order_no) and db.releases[order.order_no].done):
            in_flight += len(order.units)  # the gateway has not applied the release yet
            releasing += len(order.units)
    return Balance(sold, returned, len(db.live_claims()), in_flight, releasing)


def check_lifecycle(snap: Snapshot, acc: Accounting) -> list[Violation]:
    """Invariant 7, across Redis, the DB and what the clients were answered."""
    db = snap.db
    out = _check_payments(snap, db)
    if db is None:
        return out
    out += _check_live_flags(db)
    rows = db.by_order()
    for order in snap.settled_orders():
        row = rows.get(order.order_no, [None])[0]
        if row is None:
            continue
        if order.status == "released":
            out += _check_released(order, row)
        elif order.status in ACTIVE and row.closed:
            out += _check_closed(order, row, db)
    totals = balance(snap, acc, db)
    if not totals.balanced:
        out.append(Violation("units_unbalanced", 7, str(totals)))
    return out


def queue_analysis(snap: Snapshot) -> waitingroom.Analysis | None:
    """The sale's waiting room as its clients saw it; None for a sale without one."""
    if not snap.window.admit_rate:
        return None
    return waitingroom.analyse(snap.sku, snap.window.admit_rate, snap.window.starts_at_ms, snap.queue,
                               snap.queue_buys, snap.queue_stats)


def check_waiting_room(snap: Snapshot, tolerance: Tolerance = DEFAULT_TOLERANCE) -> list[Violation]:
    """Invariant 9, from the record's queue answers and purchases (``loadtest.waitingroom``)."""
    room = queue_analysis(snap)
    if room is None:
        return []
    orders = [(o.order_no, o.user_id) for o in snap.orders.values()]
    came_back = any(o.status in RETURNED for o in snap.orders.values())
    return [Violation(f.kind, 9, f.message)
            for f in waitingroom.check(room, tolerance, orders=orders, complete=snap.created_by_run,
                                       units_came_back=came_back)]


def check(snap: Snapshot, *, expect_sold_out: bool = False, queue: Tolerance = DEFAULT_TOLERANCE) -> list[Violation]:
    """Every invariant of the contract, as violations (empty: all kept)."""
    if snap.sale is None:
        return [Violation("sale_missing", 0, f"no sale {snap.sku} in Redis")]
    acc = account(snap)
    out = check_units(snap, acc)
    out += check_users(snap)
    out += check_keys(snap)
    out += check_keys_across_sales(snap)
    if expect_sold_out:
        out += check_sold_out(snap, acc)
    out += check_window(snap)
    out += check_admitted(snap)
    if snap.db is not None:
        out += check_db(snap)
    elif snap.db_problem is not None:
        out.append(Violation("db_unreadable", 5, f"the orders DB could not be read: {snap.db_problem}"))
    out += check_lifecycle(snap, acc)
    out += check_waiting_room(snap, queue)
    return out


# -- reporting -----------------------------------------------------------------------------

def _resold(snap: Snapshot) -> int:
    """Sales of a unit that was sold before (each unit's first sale is not a resale):
    what the run's timeline draws as "sold again"."""
    sold = [u for o in snap.orders.values() for u in o.units]
    return len(sold) - len(set(sold))


def summary(snap: Snapshot, queue: Tolerance = DEFAULT_TOLERANCE) -> dict[str, Any]:
    if snap.sale is None:
        return {"sku": snap.sku, "sale": None}
    acc = account(snap)
    statuses = Counter(o.status for o in snap.orders.values())
    out: dict[str, Any] = {
        "sku": snap.sku, "stock": snap.sale.stock, "per_user_limit": snap.sale.per_user_limit,
        "shards": snap.sale.shards,
        "sold": len(acc.sold) + len(acc.kept), "kept_by_db": len(acc.kept),
        "remaining": sum(s.remaining for s in snap.shards),
        "free_units": sum(acc.free.values()),
        "in_transfer": sum(acc.in_transfer.values()), "pending_transfers": acc.pending_transfers,
        "orders": dict(statuses), "buyers": len({o.user_id for o in snap.orders.values() if o.status in ACTIVE}),
        "released_units": sum(len(o.units) for o in snap.orders.values() if o.status == "released"),
        "resold_units": _resold(snap),
        "admitted_records": len(snap.admitted),
        "admitted_orders": len({r.order_no for r in snap.admitted}),
        "admitted_keys": len({(r.user_id, r.key) for r in snap.admitted if r.key is not None}),
        "payments": dict(Counter(f"{p.status} {p.code}" + (" (late)" if p.late else "") for p in snap.payments)),
        "window": asdict(snap.window),
        "per_shard": [{"shard": s.shard, "remaining": s.remaining, "sold": s.sold,
                       "orders": len(s.order_nos), "transfers_out": len(s.transfers_out)} for s in snap.shards],
    }
    if snap.db is not None:
        out["db"] = {"source": snap.db.source, "orders": len(snap.db.orders),
                     "units": len(snap.db.live_claims()),
                     "states": dict(Counter(o.state for o in snap.db.orders if o.state)),
                     "refunds_due": sum(1 for p in snap.db.payments if p.refund_due),
                     "releases": len(snap.db.releases),
                     "releases_pending": sum(1 for r in snap.db.releases.values() if not r.done)}
        out["balance"] = asdict(balance(snap, acc, snap.db))
    elif snap.db_problem is not None:
        out["db_problem"] = snap.db_problem
    room = queue_analysis(snap)
    if room is not None:
        out["waiting_room"] = waitingroom.report(room, queue)
    return out


def _db_lines(s: dict[str, Any]) -> list[str]:
    if "db" not in s:
        why = f"cannot read it: {s['db_problem']}" if "db_problem" in s else "no DB checked"
        return [f"  {'DB orders':<22}{'-':>10}   ({why})"]
    db = s["db"]
    states = ", ".join(f"{k} {v}" for k, v in sorted(db["states"].items()))
    lines = [f"  {'DB orders':<22}{db['orders']:>10}   ({db['units']} live units; {states or 'no states'})"
             f" in {db['source']}"]
    if db["releases"] or db["refunds_due"]:
        lines.append(f"  {'releases (DB outbox)':<22}{db['releases']:>10}   ({db['releases_pending']} not yet "
                     f"acknowledged; {db['refunds_due']} payments due for refund)")
    b = s["balance"]
    lines.append(f"  {'balance':<22}{'':>10}   sold {b['sold']} − returned {b['returned']} = "
                 f"live {b['live']} + in flight {b['in_flight']}")
    return lines


def render(snap: Snapshot, violations: Sequence[Violation], queue: Tolerance = DEFAULT_TOLERANCE) -> str:
    s = summary(snap, queue)
    if s.get("sale", "") is None:
        return f"sale {snap.sku}: not found\n"
    lines = [
        f"sale {s['sku']}: stock {s['stock']}, per-user limit {s['per_user_limit']}, {s['shards']} shards",
        "",
        f"  {'stock':<22}{s['stock']:>10}",
        f"  {'sold':<22}{s['sold']:>10}" + (f"   ({s['kept_by_db']} kept for DB orders)" if s["kept_by_db"] else ""),
        f"  {'remaining':<22}{s['remaining']:>10}",
        f"  {'in transfer':<22}{s['in_transfer']:>10}   ({s['pending_transfers']} pending transfers)",
        f"  {'orders in Redis':<22}{sum(s['orders'].values()):>10}   "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["orders"].items())),
        f"  {'buyers':<22}{s['buyers']:>10}",
    ]
    if s["released_units"] or s["resold_units"]:
        lines.append(f"  {'units released':<22}{s['released_units']:>10}   ({s['resold_units']} sold again)")
    lines.append(f"  {'200s recorded':<22}{s['admitted_records']:>10}   "
                 f"({s['admitted_orders']} orders, {s['admitted_keys']} keys)")
    if s["payments"]:
        lines.append(f"  {'payments sent':<22}{sum(s['payments'].values()):>10}   "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(s["payments"].items())))
    lines += _db_lines(s)
    if "waiting_room" in s:
        lines += waitingroom.report_lines(s["waiting_room"])
    lines.append(f"  {'violations':<22}{len(violations):>10}")
    lines += ["", f"  {'shard':>5} {'remaining':>10} {'sold':>8} {'orders':>8} {'xfers':>6}"]
    for row in s["per_shard"]:
        lines.append(f"  {row['shard']:>5} {row['remaining']:>10} {row['sold']:>8} {row['orders']:>8}"
                     f" {row['transfers_out']:>6}")
    for note in snap.notes:
        lines.append(f"note: {note}")
    lines += _violation_lines(violations)
    return "\n".join(lines) + "\n"


def _violation_lines(violations: Sequence[Violation]) -> list[str]:
    if not violations:
        return ["", "OK: every invariant holds"]
    lines = ["", "VIOLATIONS:"]
    by_kind = Counter(v.kind for v in violations)
    shown: Counter[str] = Counter()
    for v in violations:
        shown[v.kind] += 1
        if shown[v.kind] <= 20:
            lines.append(f"  {v}")
        elif shown[v.kind] == 21:
            lines.append(f"  [{v.invariant}] {v.kind}: … {by_kind[v.kind] - 20} more")
    return lines


# -- command line --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.verify",
                                description="Check a sale's invariants after a load run.")
    p.add_argument("--sku", default=os.environ.get("SECKILL_LT_SKU"), required="SECKILL_LT_SKU" not in os.environ,
                   help="the sale [SECKILL_LT_SKU]")
    p.add_argument("--config", help="gateway TOML settings file")
    p.add_argument("--redis-url", help="[SECKILL_REDIS_URL]")
    p.add_argument("--redis-mode", choices=("standalone", "cluster"), help="[SECKILL_REDIS_MODE]")
    p.add_argument("--key-prefix", help="[SECKILL_KEY_PREFIX]")
    p.add_argument("--database-url",
                   help="orders store [SECKILL_DATABASE_URL]; it must be readable unless --no-db")
    p.add_argument("--no-db", action="store_true", help="do not read the orders store (checks Redis only)")
    p.add_argument("--admitted", default=None,
                   help=f"record file of the run [SECKILL_LT_RECORD or {DEFAULT_RECORD}]; '' for none")
    p.add_argument("--expect-sold-out", action="store_true",
                   help="demand was >= stock and nothing failed: every unit must be sold")
    p.add_argument("--wait-delivery", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for every order to settle (delivered or rejected; "
                        "paid or expired and released)")
    p.add_argument("--json", action="store_true", help="print the summary and violations as JSON")
    q = p.add_argument_group("waiting room (invariant 9)")
    d = Tolerance()
    q.add_argument("--queue-rate-tolerance", type=float, default=d.rate, metavar="FRACTION",
                   help=f"admissions allowed above R·W + max(R, 1) in a W-second window, relative [{d.rate}]")
    q.add_argument("--queue-order-slack", type=int, default=None, metavar="USERS",
                   help="users one who joined after the start may overtake (the gateway's stated bound) "
                        "[R/10 + max(R, 1): one admitter tick and one second's burst]")
    q.add_argument("--queue-rho-max", type=float, default=d.rho_max,
                   help=f"largest |Spearman rho| of join vs admission order for who joined before the "
                        f"start [{d.rho_max}]")
    return p


def tolerance(args: argparse.Namespace) -> Tolerance:
    return Tolerance(rate=args.queue_rate_tolerance, order_slack=args.queue_order_slack,
                     rho_max=args.queue_rho_max)


def exit_status(snap: Snapshot, violations: Sequence[Violation]) -> int:
    """0 clean, 1 violations, 2 could not verify (no sale; an expected DB unreadable,
    and nothing else wrong)."""
    if snap.sale is None:
        return 2
    if any(v.kind != "db_unreadable" for v in violations):
        return 1
    return 2 if snap.db_problem is not None else 0


async def run(args: argparse.Namespace, settings: Settings) -> int:
    store = Store(connect(settings), KeySpace(settings.key_prefix), outcome_ttl=settings.idempotency_ttl)
    admitted = None if args.admitted == "" else (args.admitted or default_record_path())
    database_url = None if args.no_db else settings.database_url
    try:
        kwargs = {"admitted": admitted, "database_url": database_url}
        if args.wait_delivery > 0:
            await wait_for_delivery(store, args.sku, args.wait_delivery, **kwargs)
        snap = await collect_stable(store, args.sku, **kwargs)
    finally:
        await store.close()
    tol = tolerance(args)
    violations = check(snap, expect_sold_out=args.expect_sold_out, queue=tol)
    if args.json:
        sys.stdout.write(orjson.dumps({"summary": summary(snap, tol), "notes": snap.notes,
                                       "violations": [asdict(v) for v in violations]},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(snap, violations, tol))
    if snap.db_problem is not None:
        print(f"cannot verify the orders DB ({database_url}): {snap.db_problem}; "
              "--no-db checks Redis alone", file=sys.stderr)
    return exit_status(snap, violations)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, redis_url=args.redis_url, redis_mode=args.redis_mode,
                                 key_prefix=args.key_prefix, database_url=args.database_url)
        return asyncio.run(run(args, settings))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Redis or DB unreachable, bad URL, ...: could not verify
        print(f"cannot verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
