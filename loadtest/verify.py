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
* the record file the Locust scenarios write, one JSON line per ``200 OK`` they received
  (``order_no``, ``units``, ``user_id``, ``key``; also the original outcome carried in a
  ``409 IDEMPOTENT_CONFLICT`` body);
* where present, the orders store of the bundled orders service (SQLite or PostgreSQL):
  tables ``orders`` and ``order_units``.

The contract's invariants, and how each is checked (``Violation.kind`` in brackets):

1. Units admitted <= stock, no unit twice, conservation. In Redis every unit 1..S is
   exactly once free (in some shard's ranges), sold (in a non-rejected order) or in a
   transfer that the receiver has not applied [``unit_out_of_range``, ``unit_sold_twice``,
   ``unit_free_twice``, ``unit_free_and_sold``, ``unit_lost``, ``oversold``]; the
   counters agree with that [``counter_mismatch``]. Units of a rejected order that are
   neither free nor sold again were kept because the store had them under another order
   (``UNIT_TAKEN``); with a DB they must be there [``unit_lost``]. In the DB no unit
   twice [``db_unit_twice``] and every DB unit belongs to an order Redis admitted with
   that unit [``db_unit_not_admitted``].
2. Per user and SKU, units held <= per-user limit [``user_over_limit``]; the shard's
   buyer counts match the orders [``buyers_mismatch``].
3. One key, one outcome: in the record file no (user, key) with two order numbers
   [``key_two_outcomes``] and no order number under two keys [``order_two_keys``].
4. With ``--expect-sold-out`` (demand >= stock and nothing failed): units sold = stock
   [``not_sold_out``].
5. Every 200 in the record file is an order in Redis with the same user and units
   [``admitted_order_missing``, ``admitted_mismatch``, ``record_malformed``]; with a DB,
   every non-rejected order is exactly one DB order with the same units
   [``db_order_missing``, ``db_order_twice``, ``db_order_mismatch``] and a rejected order
   is not in the DB [``rejected_in_db``]; its units went back (see 1).

Exit status: 0 clean, 1 violations (listed), 2 could not verify (no such sale, DB error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.models import Order, Sale, Transfer
from gateway.store.connection import connect
from gateway.store.keys import KeySpace, shard_of_order
from gateway.store.store import Store

LOADTEST_DIR = Path(__file__).resolve().parent
DEFAULT_RECORD = LOADTEST_DIR / "reports" / "admitted.jsonl"
ACTIVE = ("admitted", "delivered")  # order statuses that hold their units
CHUNK = 500  # commands per pipeline

INVARIANTS = {
    0: "the sale exists",
    1: "units <= stock, no unit twice, conservation",
    2: "per-user limit",
    3: "one key, one outcome",
    4: "demand >= stock sells out",
    5: "every 200 is an order (in Redis and the DB)",
}


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
class AdmittedRecord:
    """One line of the record file: a 200 OK (or the 200 original of a 409) seen by Locust."""

    line: int
    sku: str
    order_no: str
    units: tuple[int, ...]
    user_id: int
    key: str | None = None
    status: int = 200
    scenario: str = ""


@dataclass(frozen=True, slots=True)
class DbOrder:
    order_no: str
    sku: str
    user_id: int
    quantity: int
    units: tuple[int, ...]
    state: str = ""


@dataclass(slots=True)
class DbSnapshot:
    source: str
    orders: list[DbOrder] = field(default_factory=list)
    unit_rows: list[tuple[int, str]] = field(default_factory=list)  # (unit, order_no)
    has_order_units: bool = True


@dataclass(slots=True)
class Snapshot:
    sku: str
    sale: Sale | None
    shards: list[ShardSnapshot] = field(default_factory=list)
    orders: dict[str, Order] = field(default_factory=dict)  # every order of the sale's indexes
    index_without_record: list[tuple[int, str]] = field(default_factory=list)
    admitted: list[AdmittedRecord] = field(default_factory=list)
    admitted_errors: list[str] = field(default_factory=list)
    admitted_skipped: int = 0  # lines for other SKUs
    looked_up: dict[str, Order | None] = field(default_factory=dict)  # admitted orders not indexed
    db: DbSnapshot | None = None
    notes: list[str] = field(default_factory=list)

    def redis_fingerprint(self) -> tuple:
        """What must not change between two reads for a snapshot to be consistent."""
        return (
            tuple((s.remaining, s.sold, s.version, tuple(s.free_ranges), tuple(sorted(s.transfers_out)),
                   len(s.transfers_in), len(s.order_nos)) for s in self.shards),
            tuple(sorted((o.order_no, o.status) for o in self.orders.values())),
        )

    def order(self, order_no: str) -> Order | None:
        return self.orders.get(order_no) or self.looked_up.get(order_no)


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    invariant: int
    message: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.kind}: {self.message}"


# -- reading -------------------------------------------------------------------------------

async def _pipelined(store: Store, calls: Sequence[tuple[str, tuple]]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(calls), CHUNK):
        pipe = store.client.pipeline(transaction=False)
        for name, args in calls[start:start + CHUNK]:
            getattr(pipe, name)(*args)
        out.extend(await pipe.execute())
    return out


async def read_redis(store: Store, sku: str) -> Snapshot:
    sale = await store.get_sale(sku)
    snap = Snapshot(sku=sku, sale=sale)
    if sale is None:
        return snap
    calls: list[tuple[str, tuple]] = []
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
    records = await _pipelined(
        store, [("hgetall", (store.keys.shard(sku, shard).order(order_no),)) for shard, order_no in wanted])
    for (shard, order_no), record in zip(wanted, records):
        if record:
            snap.orders[order_no] = Order.from_record(record)
        else:
            snap.index_without_record.append((shard, order_no))
    return snap


async def lookup_orders(store: Store, order_nos: Iterable[str]) -> dict[str, Order | None]:
    """Order records by number, for numbers the sale's index does not list."""
    wanted = [(o, shard_of_order(o)) for o in dict.fromkeys(order_nos)]
    found: dict[str, Order | None] = {o: None for o, shard in wanted if shard is None}
    located = [(o, shard) for o, shard in wanted if shard is not None]
    records = await _pipelined(store, [("hgetall", (store.keys.order(o, shard),)) for o, shard in located])
    for (order_no, _), record in zip(located, records):
        found[order_no] = Order.from_record(record) if record else None
    return found


def read_admitted(path: str | Path | None, sku: str) -> tuple[list[AdmittedRecord], list[str], int]:
    """The record file's lines for ``sku``; malformed lines; lines of other SKUs."""
    records: list[AdmittedRecord] = []
    errors: list[str] = []
    skipped = 0
    if path is None or not Path(path).exists():
        return records, errors, skipped
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                data = orjson.loads(raw)
                if data.get("sku", sku) != sku:
                    skipped += 1
                    continue
                key = data.get("key")
                records.append(AdmittedRecord(
                    line=number, sku=sku, order_no=str(data["order_no"]),
                    units=tuple(int(u) for u in data["units"]), user_id=int(data["user_id"]),
                    key=None if key is None else str(key), status=int(data.get("status", 200)),
                    scenario=str(data.get("scenario", ""))))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                errors.append(f"line {number}: {type(exc).__name__}: {raw[:120]!r}")
    return records, errors, skipped


def _units_of(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    text = str(value).strip()
    return tuple(int(u) for u in text.split(",") if u.strip()) if text else ()


def sqlite_path(url: str) -> str | None:
    """``sqlite:///rel/path`` -> ``rel/path``, ``sqlite:////abs`` -> ``/abs``; None if not SQLite."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        return unquote(rest[1:] if rest.startswith("/") else rest) or None
    return None


def _rows_to_db(source: str, sku: str, orders: Iterable[Any], units: Iterable[Any] | None) -> DbSnapshot:
    db = DbSnapshot(source=source, has_order_units=units is not None)
    for row in orders:
        keys = row.keys()
        db.orders.append(DbOrder(
            order_no=str(row["order_no"]), sku=str(row["sku"]), user_id=int(row["user_id"]),
            quantity=int(row["quantity"]) if "quantity" in keys and row["quantity"] is not None else 0,
            units=_units_of(row["units"]) if "units" in keys else (),
            state=str(row["state"]) if "state" in keys and row["state"] is not None else ""))
    db.unit_rows = [(int(r["unit"]), str(r["order_no"])) for r in units or ()]
    return db


def read_sqlite(path: str, sku: str) -> DbSnapshot | None:
    """None when the file or its ``orders`` table does not exist (nothing delivered there)."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "orders" not in tables:
            return None
        orders = conn.execute("SELECT * FROM orders WHERE sku = ?", (sku,)).fetchall()
        units = (conn.execute("SELECT unit, order_no FROM order_units WHERE sku = ?", (sku,)).fetchall()
                 if "order_units" in tables else None)
        return _rows_to_db(f"sqlite:{path}", sku, orders, units)
    finally:
        conn.close()


async def read_postgres(url: str, sku: str) -> DbSnapshot | None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            has = await conn.fetchrow(
                "SELECT to_regclass('orders') IS NOT NULL AS o, to_regclass('order_units') IS NOT NULL AS u")
            if not has["o"]:
                return None
            orders = await conn.fetch("SELECT * FROM orders WHERE sku = $1", sku)
            units = (await conn.fetch("SELECT unit, order_no FROM order_units WHERE sku = $1", sku)
                     if has["u"] else None)
        parsed = urlparse(url)
        return _rows_to_db(f"postgresql://{parsed.hostname}:{parsed.port or 5432}{parsed.path}", sku, orders, units)
    finally:
        await conn.close()


async def read_db(url: str | None, sku: str) -> DbSnapshot | None:
    if not url:
        return None
    path = sqlite_path(url)
    if path is not None:
        return await asyncio.to_thread(read_sqlite, path, sku)
    if url.startswith(("postgresql://", "postgres://")):
        return await read_postgres(url, sku)
    raise ValueError(f"unsupported database URL: {url.split(':', 1)[0]}://…")


async def collect(store: Store, sku: str, *, admitted: str | Path | None = None,
                  database_url: str | None = None) -> Snapshot:
    """Read everything the checks need: Redis, the record file, the DB (where present)."""
    snap = await read_redis(store, sku)
    snap.admitted, snap.admitted_errors, snap.admitted_skipped = read_admitted(admitted, sku)
    if admitted is not None and not Path(admitted).exists():
        snap.notes.append(f"no record file at {admitted}")
    unindexed = [r.order_no for r in snap.admitted if r.order_no not in snap.orders]
    if unindexed:
        snap.looked_up = await lookup_orders(store, unindexed)
    snap.db = await read_db(database_url, sku)
    if database_url and snap.db is None:
        snap.notes.append("no orders DB (or no orders table) yet: DB checks skipped")
    return snap


async def collect_stable(store: Store, sku: str, *, attempts: int = 5, **kwargs: Any) -> Snapshot:
    """Collect until two successive reads of Redis agree (the relay may still be moving
    orders to delivered or rejected); the last read after ``attempts`` otherwise."""
    snap = await collect(store, sku, **kwargs)
    for _ in range(attempts):
        again = await collect(store, sku, **kwargs)
        if again.redis_fingerprint() == snap.redis_fingerprint():
            return again
        snap = again
        await asyncio.sleep(0.2)
    snap.notes.append("Redis kept changing while it was read: the snapshot may be torn")
    return snap


def delivery_pending(snap: Snapshot) -> int:
    """Orders not yet settled: still ``admitted`` in Redis, or (with a DB) active but not in it."""
    if snap.db is not None:
        in_db = {o.order_no for o in snap.db.orders}
        return sum(1 for o in snap.orders.values() if o.status in ACTIVE and o.order_no not in in_db)
    return sum(1 for o in snap.orders.values() if o.status == "admitted")


async def wait_for_delivery(store: Store, sku: str, seconds: float, *, every: float = 0.5,
                            **kwargs: Any) -> Snapshot:
    deadline = time.monotonic() + seconds
    while True:
        snap = await collect(store, sku, **kwargs)
        if delivery_pending(snap) == 0 or time.monotonic() >= deadline:
            return snap
        await asyncio.sleep(every)


# -- checking ------------------------------------------------------------------------------

@dataclass(slots=True)
class Accounting:
    """Where every unit is, derived from a snapshot."""

    free: Counter = field(default_factory=Counter)            # unit -> times in free ranges
    free_by_shard: dict[int, int] = field(default_factory=dict)
    sold: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # unit -> active orders
    in_transfer: Counter = field(default_factory=Counter)
    pending_transfers: int = 0
    kept: dict[int, str] = field(default_factory=dict)        # unit -> rejected order that kept it
    kept_by_shard: Counter = field(default_factory=Counter)
    active_by_shard: Counter = field(default_factory=Counter)
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
            acc.active_by_shard[shard_of_order(order.order_no)] += len(order.units)
    db_units = {} if snap.db is None else {u: o for u, o in _db_unit_claims(snap.db)}
    for order in snap.orders.values():
        if order.status != "rejected":
            continue
        for unit in order.units:
            if unit in acc.free or unit in acc.sold or unit in acc.in_transfer:
                continue  # returned (and maybe sold again)
            if snap.db is not None and db_units.get(unit, order.order_no) == order.order_no:
                continue  # the DB does not hold it for another order: lost, see check_units
            acc.kept[unit] = order.order_no
            acc.kept_by_shard[shard_of_order(order.order_no)] += 1
    return acc


def _db_unit_claims(db: DbSnapshot) -> list[tuple[int, str]]:
    """(unit, order_no) claims of the DB: ``order_units`` rows, else the orders' unit lists."""
    if db.has_order_units:
        return list(db.unit_rows)
    return [(u, o.order_no) for o in db.orders for u in o.units]


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
        rejected = {u: o.order_no for o in snap.orders.values() if o.status == "rejected" for u in o.units}
        why = [f"{u} (rejected {rejected[u]}, not returned)" if u in rejected else str(u) for u in lost]
        out.append(Violation("unit_lost", 1, f"units neither free, sold nor in transfer: {_few(why)}"))
    sold_total = len(acc.sold)
    if sold_total > stock:
        out.append(Violation("oversold", 1, f"{sold_total} units in orders, stock {stock}"))
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
    if total != stock:
        out.append(Violation("counter_mismatch", 1,
                             f"remaining + sold + in transfer = {total}, stock {stock}"))
    for shard, order_no in snap.index_without_record:
        out.append(Violation("counter_mismatch", 1, f"shard {shard}: order {order_no} indexed, record missing"))
    for order in snap.orders.values():
        if order.sku != snap.sku or len(order.units) != order.purchase.quantity:
            out.append(Violation("counter_mismatch", 1,
                                 f"order {order.order_no}: sku {order.sku}, quantity {order.purchase.quantity}, "
                                 f"units {list(order.units)}"))
    return out


def check_users(snap: Snapshot) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    out: list[Violation] = []
    held: dict[int, list[Order]] = defaultdict(list)
    for order in snap.orders.values():
        if order.status in ACTIVE:
            held[order.user_id].append(order)
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
        for user_id in sorted(set(counted) | set(actual)):
            if counted.get(user_id, 0) != actual.get(user_id, 0):
                out.append(Violation("buyers_mismatch", 2,
                                     f"shard {s.shard}: user {user_id} counted as holding "
                                     f"{counted.get(user_id, 0)} units, orders hold {actual.get(user_id, 0)}"))
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


def check_sold_out(snap: Snapshot, acc: Accounting) -> list[Violation]:
    sale = snap.sale
    assert sale is not None
    sold = len(acc.sold) + len(acc.kept)
    if sold != sale.stock:
        return [Violation("not_sold_out", 4,
                          f"demand >= stock, but {sold} of {sale.stock} units sold "
                          f"({sum(acc.free.values())} free, {sum(acc.in_transfer.values())} in transfer)")]
    return []


def check_admitted(snap: Snapshot) -> list[Violation]:
    out: list[Violation] = []
    for error in snap.admitted_errors:
        out.append(Violation("record_malformed", 5, error))
    seen: set[str] = set()
    for record in snap.admitted:
        order = snap.order(record.order_no)
        if order is None:
            if record.order_no not in seen:
                out.append(Violation("admitted_order_missing", 5,
                                     f"line {record.line} ({record.scenario or '?'}): 200 for order "
                                     f"{record.order_no} (user {record.user_id}), no such order in Redis"))
            seen.add(record.order_no)
            continue
        if (order.user_id != record.user_id or tuple(order.units) != record.units
                or order.sku != record.sku) and record.order_no not in seen:
            out.append(Violation("admitted_mismatch", 5,
                                 f"line {record.line}: order {record.order_no} answered user {record.user_id} "
                                 f"units {list(record.units)}; Redis has user {order.user_id} "
                                 f"units {list(order.units)} sku {order.sku}"))
        elif record.order_no not in snap.orders and record.order_no not in seen:
            out.append(Violation("admitted_order_missing", 5,
                                 f"order {record.order_no} exists but is not in its shard's order index"))
        seen.add(record.order_no)
    return out


def check_db(snap: Snapshot) -> list[Violation]:
    db = snap.db
    sale = snap.sale
    assert db is not None and sale is not None
    out: list[Violation] = []
    rows_by_order: dict[str, list[DbOrder]] = defaultdict(list)
    for row in db.orders:
        rows_by_order[row.order_no].append(row)
    claims: dict[int, set[str]] = defaultdict(set)
    counts: Counter = Counter()
    sources = [("order_units", db.unit_rows)] if db.has_order_units else []
    sources.append(("orders.units", [(u, o.order_no) for o in db.orders for u in o.units]))
    for _, pairs in sources:
        per_source: Counter = Counter()
        for unit, order_no in pairs:
            claims[unit].add(order_no)
            per_source[unit] += 1
        for unit, n in per_source.items():
            counts[unit] = max(counts[unit], n)
    for unit in sorted(claims):
        if len(claims[unit]) > 1 or counts[unit] > 1:
            out.append(Violation("db_unit_twice", 1,
                                 f"DB holds unit {unit} {counts[unit]}x, for {', '.join(sorted(claims[unit]))}"))
        if not 1 <= unit <= sale.stock:
            out.append(Violation("unit_out_of_range", 1, f"DB holds unit {unit}, stock {sale.stock}"))
    if db.has_order_units:
        listed: dict[str, set[int]] = defaultdict(set)
        for unit, order_no in db.unit_rows:
            listed[order_no].add(unit)
        for order_no, rows in rows_by_order.items():
            if rows[0].units and listed.get(order_no, set()) != set(rows[0].units):
                out.append(Violation("db_order_mismatch", 1,
                                     f"DB order {order_no} lists units {list(rows[0].units)}, "
                                     f"order_units has {sorted(listed.get(order_no, ()))}"))
    recorded = {r.order_no for r in snap.admitted}
    for unit in sorted(claims):
        for order_no in sorted(claims[unit]):
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
    settled = dict(snap.orders)
    settled.update({k: v for k, v in snap.looked_up.items() if v is not None})
    for order in settled.values():
        rows = rows_by_order.get(order.order_no, [])
        if order.status == "rejected":
            if rows:
                out.append(Violation("rejected_in_db", 5,
                                     f"order {order.order_no} is rejected in Redis but stored in the DB"))
            continue
        if not rows:
            out.append(Violation("db_order_missing", 5,
                                 f"order {order.order_no} ({order.status}, user {order.user_id}) "
                                 f"is not in the DB"))
        elif len(rows) > 1:
            out.append(Violation("db_order_twice", 5, f"order {order.order_no} is in the DB {len(rows)} times"))
        else:
            row = rows[0]
            if row.user_id != order.user_id or (row.units and tuple(row.units) != tuple(order.units)):
                out.append(Violation("db_order_mismatch", 5,
                                     f"order {order.order_no}: DB user {row.user_id} units {list(row.units)}, "
                                     f"Redis user {order.user_id} units {list(order.units)}"))
    # A rejected order's units that are neither free nor sold again must be in the DB
    # under the order that holds them (UNIT_TAKEN); account() leaves them out otherwise
    # and check_units reports them as lost.
    return out


def check(snap: Snapshot, *, expect_sold_out: bool = False) -> list[Violation]:
    """Every invariant of the contract, as violations (empty: all kept)."""
    if snap.sale is None:
        return [Violation("sale_missing", 0, f"no sale {snap.sku} in Redis")]
    acc = account(snap)
    out = check_units(snap, acc)
    out += check_users(snap)
    out += check_keys(snap)
    if expect_sold_out:
        out += check_sold_out(snap, acc)
    out += check_admitted(snap)
    if snap.db is not None:
        out += check_db(snap)
    return out


# -- reporting -----------------------------------------------------------------------------

def summary(snap: Snapshot) -> dict[str, Any]:
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
        "admitted_records": len(snap.admitted),
        "admitted_orders": len({r.order_no for r in snap.admitted}),
        "admitted_keys": len({(r.user_id, r.key) for r in snap.admitted if r.key is not None}),
        "per_shard": [{"shard": s.shard, "remaining": s.remaining, "sold": s.sold,
                       "orders": len(s.order_nos), "transfers_out": len(s.transfers_out)} for s in snap.shards],
    }
    if snap.db is not None:
        out["db"] = {"source": snap.db.source, "orders": len(snap.db.orders),
                     "units": len(snap.db.unit_rows) if snap.db.has_order_units
                     else sum(len(o.units) for o in snap.db.orders),
                     "states": dict(Counter(o.state for o in snap.db.orders if o.state))}
    return out


def render(snap: Snapshot, violations: Sequence[Violation]) -> str:
    s = summary(snap)
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
        f"  {'200s recorded':<22}{s['admitted_records']:>10}   "
        f"({s['admitted_orders']} orders, {s['admitted_keys']} keys)",
    ]
    if "db" in s:
        db = s["db"]
        states = ", ".join(f"{k} {v}" for k, v in sorted(db["states"].items()))
        lines.append(f"  {'DB orders':<22}{db['orders']:>10}   ({db['units']} units; {states or 'no states'})"
                     f" in {db['source']}")
    else:
        lines.append(f"  {'DB orders':<22}{'-':>10}   (no DB checked)")
    lines.append(f"  {'violations':<22}{len(violations):>10}")
    lines += ["", f"  {'shard':>5} {'remaining':>10} {'sold':>8} {'orders':>8} {'xfers':>6}"]
    for row in s["per_shard"]:
        lines.append(f"  {row['shard']:>5} {row['remaining']:>10} {row['sold']:>8} {row['orders']:>8}"
                     f" {row['transfers_out']:>6}")
    for note in snap.notes:
        lines.append(f"note: {note}")
    if violations:
        lines += ["", "VIOLATIONS:"]
        by_kind = Counter(v.kind for v in violations)
        shown: Counter = Counter()
        for v in violations:
            shown[v.kind] += 1
            if shown[v.kind] <= 20:
                lines.append(f"  {v}")
            elif shown[v.kind] == 21:
                lines.append(f"  [{v.invariant}] {v.kind}: … {by_kind[v.kind] - 20} more")
    else:
        lines += ["", "OK: every invariant holds"]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--database-url", help="orders store [SECKILL_DATABASE_URL]; checked where it exists")
    p.add_argument("--no-db", action="store_true", help="do not read the orders store")
    p.add_argument("--admitted", default=None,
                   help=f"record file of the 200s [SECKILL_LT_RECORD or {DEFAULT_RECORD}]; '' for none")
    p.add_argument("--expect-sold-out", action="store_true",
                   help="demand was >= stock and nothing failed: every unit must be sold")
    p.add_argument("--wait-delivery", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for every order to be delivered (or rejected)")
    p.add_argument("--json", action="store_true", help="print the summary and violations as JSON")
    return p


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
    violations = check(snap, expect_sold_out=args.expect_sold_out)
    if args.json:
        sys.stdout.write(orjson.dumps({"summary": summary(snap), "notes": snap.notes,
                                       "violations": [asdict(v) for v in violations]},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(snap, violations))
    if snap.sale is None:
        return 2
    return 1 if violations else 0


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
