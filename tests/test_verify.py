"""The load-test verifier (loadtest.verify): it passes on a clean run through the gateway
API, and catches each kind of seeded violation, on standalone Redis and on Redis Cluster.

Each seeded test breaks one thing the way a bug would (an order record holding a sold
unit, a unit duplicated into a free range, a user over the limit, a unit gone, a 200 with
no order, a key with two orders, a DB unit twice, a paid order released, a key that bought
in two sales, ...) and asserts that the verifier names that violation; the clean run
before it reports nothing.

The orders store is a SQLite file with the bundled orders service's own schema
(``gateway.orders.sqlite.SCHEMA``), filled as the service fills it. A release by the
gateway (``POST /admin/orders/{no}/release``, being built) is played here as the contract
describes it: the units go back as for a refused delivery, and the order reads
``released`` with its reason.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.admission.returns import Returns
from gateway.models import Order, Purchase, Transfer
from gateway.orders.sqlite import SCHEMA
from gateway.store.keys import new_order_no, shard_of_order
from loadtest import records, verify
from loadtest.verify import Snapshot, Violation, check, collect
from tests.support.api import Api, Backend

# What stores made before order states and releases looked like: still readable.
OLD_SCHEMA = """
CREATE TABLE orders (
    order_no TEXT PRIMARY KEY, sku TEXT NOT NULL, user_id BIGINT NOT NULL, quantity INT NOT NULL,
    amount BIGINT NOT NULL, units TEXT NOT NULL, admitted_at BIGINT,
    state TEXT NOT NULL DEFAULT 'pending', state_version INT NOT NULL DEFAULT 1
);
CREATE TABLE order_units (sku TEXT NOT NULL, unit INT NOT NULL, order_no TEXT NOT NULL, UNIQUE (sku, unit));
CREATE TABLE payments (notify_id TEXT PRIMARY KEY, order_no TEXT NOT NULL, amount BIGINT NOT NULL);
"""


def relaxed(schema: str) -> str:
    """The service's schema without its unique guards, to seed what they would refuse."""
    out = schema.replace("CREATE UNIQUE INDEX", "CREATE INDEX")
    out = re.sub(r"\bPRIMARY KEY\b", "", out)
    assert out != schema and "UNIQUE" not in out, "the orders schema changed: update relaxed()"
    return out


# -- helpers ---------------------------------------------------------------------------------

class Run:
    """A sale bought through the gateway API, with the 200s recorded the way the Locust
    scenarios record them."""

    def __init__(self, api: Api, sku: str, record: Path) -> None:
        self.api = api
        self.sku = sku
        self.record = record
        self.answers: list[tuple[int, dict]] = []
        self.unavailable = 0

    def write(self, entry: dict) -> None:
        with open(self.record, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def note(self, user_id: int, key: str, status: int, body: dict) -> None:
        self.answers.append((status, body))
        if status == 200:
            self.write({"sku": self.sku, "order_no": body["order_no"], "units": body["units"],
                        "user_id": user_id, "key": key, "status": 200, "scenario": "test"})
        elif body.get("code") == "IDEMPOTENT_CONFLICT" and (body.get("original") or {}).get("status") == 200:
            original = body["original"]["body"]
            self.write({"sku": self.sku, "order_no": original["order_no"], "units": original["units"],
                        "user_id": user_id, "key": key, "status": 409, "scenario": "test"})

    async def send(self, user_id: int, key: str, quantity: int) -> tuple[int, dict]:
        """One send, retried with the same key on 503 (nothing was admitted), as a client would."""
        for _ in range(20):
            status, body, _ = await self.api.buy(self.sku, user_id, key, quantity)
            self.unavailable += status == 503
            if status != 503:
                break
            await asyncio.sleep(0.01)
        assert status in (200, 409, 410), body
        self.note(user_id, key, status, body)
        return status, body

    async def buy(self, user_id: int, quantity: int = 1, sends: int = 1) -> list[tuple[int, dict]]:
        key = await self.api.token(user_id)
        return list(await asyncio.gather(*(self.send(user_id, key, quantity) for _ in range(sends))))

    async def crowd(self, users: Iterable[int], quantity: int = 1, sends: int = 1, batch: int = 50) -> None:
        users = list(users)
        for start in range(0, len(users), batch):
            await asyncio.gather(*(self.buy(u, quantity, sends) for u in users[start:start + batch]))

    async def snapshot(self, db: Path | None = None) -> Snapshot:
        return await collect(self.api.gateway.store, self.sku, admitted=self.record,
                             database_url=f"sqlite:///{db}" if db else None)

    async def orders(self) -> list[Order]:
        return sorted((await self.snapshot()).orders.values(), key=lambda o: o.order_no)

    async def release(self, order: Order, reason: str) -> None:
        """What the gateway does on ``POST /admin/orders/{no}/release``: the units back
        in the sale (as for a refused delivery: the buyer's limit freed, the sold-out flag
        cleared), the order ``released`` with its reason."""
        gw = self.api.gateway
        await Returns(gw.store, gw.sold_out).reject(order, reason)
        await self.redis.hset(self.order_key(order.order_no), mapping={"status": "released", "reason": reason})

    def order_key(self, order_no: str) -> str:
        shard = shard_of_order(order_no)
        assert shard is not None
        return self.keys.shard(self.sku, shard).order(order_no)

    @property
    def redis(self):
        return self.api.gateway.store.client

    @property
    def keys(self):
        return self.api.gateway.store.keys


async def small_run(api: Api, sku: str, tmp_path: Path, *, stock: int = 20, buyers: int = 10,
                    shards: int = 4, limit: int = 1) -> Run:
    run = Run(api, sku, tmp_path / "admitted.jsonl")
    await api.create_sale(sku, stock, shards=shards, per_user_limit=limit)
    await run.crowd(range(1, buyers + 1))
    return run


def kinds(violations: list[Violation]) -> set[str]:
    return {v.kind for v in violations}


class OrdersStore:
    """An orders store file with the orders service's schema, filled as the service
    fills it: delivered orders ``pending`` with live units; a close frees the units and
    queues a release; a payment is a row (due for refund when it came too late)."""

    def __init__(self, path: Path, *, unique: bool = True, schema: str = SCHEMA) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.executescript(schema if unique else relaxed(schema))

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def deliver(self, order: Order, *, state: str = "pending", units: bool = True) -> None:
        live = state in ("pending", "paid", "shipped")
        self.conn.execute("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units, admitted_at, state) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          (order.order_no, order.sku, order.user_id, order.purchase.quantity,
                           order.purchase.amount, ",".join(map(str, order.units)), order.purchase.admitted_at,
                           state))
        if units:
            self.add_units([(order.sku, u, order.order_no) for u in order.units], live=live)

    def add_units(self, rows: Iterable[tuple[str, int, str]], *, live: bool = True) -> None:
        self.conn.executemany("INSERT INTO order_units (sku, unit, order_no, live) VALUES (?, ?, ?, ?)",
                              [(*row, live) for row in rows])

    def close(self, order_no: str, state: str, *, acknowledged: bool = True, outcome: str = "released") -> None:
        now = int(time.time() * 1000)
        self.conn.execute("UPDATE orders SET state = ? WHERE order_no = ?", (state, order_no))
        self.conn.execute("UPDATE order_units SET live = 0 WHERE order_no = ?", (order_no,))
        self.conn.execute("INSERT INTO releases (order_no, reason, attempts, next_attempt_at, done_at, outcome) "
                          "VALUES (?, ?, 1, ?, ?, ?)",
                          (order_no, state, now, now if acknowledged else None, outcome if acknowledged else None))

    def pay(self, notify_id: str, order_no: str, *, refund_due: bool = False) -> None:
        if not refund_due:
            self.conn.execute("UPDATE orders SET state = 'paid' WHERE order_no = ?", (order_no,))
        self.conn.execute("INSERT INTO payments (notify_id, order_no, amount, status, refund_due) "
                          "VALUES (?, ?, 0, 'SUCCESS', ?)", (notify_id, order_no, refund_due))

    def execute(self, sql: str, *args: object) -> None:
        self.conn.execute(sql, args)


def make_db(path: Path, orders: Iterable[Order], *, unique: bool = True,
            extra_units: Iterable[tuple[str, int, str]] = ()) -> Path:
    """An orders store as the orders service would hold it after delivering ``orders``."""
    store = OrdersStore(path, unique=unique)
    for order in orders:
        store.deliver(order)
    store.add_units(extra_units)
    return path


def payment_line(order: Order, notify_id: str, status: int, code: str, state: str, *, late: bool) -> dict:
    return records.payment_entry(sku=order.sku, order_no=order.order_no, notify_id=notify_id, amount=0,
                                 late=late, status=status, code=code, state=state, scenario="test",
                                 ts=time.time())


@dataclass
class Lifecycle:
    """A sale sold out, then: one order expired, one cancelled, one paid, one paid too
    late (expired, payment due for refund), all released at the gateway; the three units
    sold again to new buyers; every order in the store."""

    run: Run
    db: OrdersStore
    expired: Order
    cancelled: Order
    paid: Order
    late: Order
    resales: list[Order]

    async def snapshot(self) -> Snapshot:
        return await self.run.snapshot(self.db.path)


async def lifecycle_run(api: Api, sku: str, tmp_path: Path) -> Lifecycle:
    run = await small_run(api, sku, tmp_path, stock=12, buyers=16, shards=4)
    first = await run.orders()
    assert len(first) == 12
    db = OrdersStore(tmp_path / "orders.db")
    for order in first:
        db.deliver(order)
    expired, cancelled, paid, late = first[:4]
    db.pay("n-paid", paid.order_no)
    run.write(payment_line(paid, "n-paid", 200, "OK", "paid", late=False))
    for order, state in ((expired, "expired"), (cancelled, "cancelled"), (late, "expired")):
        db.close(order.order_no, state)
        await run.release(order, state)
    db.pay("n-late", late.order_no, refund_due=True)
    run.write(payment_line(late, "n-late", 409, "ORDER_CLOSED", "expired", late=True))
    await run.crowd(range(101, 111))  # ten more buyers for three units
    resales = [o for o in await run.orders() if o.order_no not in {f.order_no for f in first}]
    for order in resales:
        db.deliver(order)
    return Lifecycle(run, db, expired, cancelled, paid, late, resales)
# -- clean runs --------------------------------------------------------------------------------

async def test_clean_run_passes(api: Api, sku: str, tmp_path: Path):
    """A few hundred purchases, most users in one shard (units must move), quantities of
    one and two, some keys sent five times at once; demand > stock: all invariants hold,
    every unit sold, also against a DB holding every order."""
    run = Run(api, sku, tmp_path / "admitted.jsonl")
    await api.create_sale(sku, 300, shards=8, per_user_limit=2)
    hot = [8 * i for i in range(1, 201)]  # shard 0
    await run.crowd(hot, quantity=1)
    await run.crowd(range(5000, 5060), quantity=2, sends=5)  # retry storms
    await run.crowd(range(6001, 6120), quantity=1)
    assert sum(1 for s, b in run.answers if s == 410) > 0  # demand exceeded stock
    print(f"503 answers retried: {run.unavailable}")

    snap = await run.snapshot()
    assert check(snap, expect_sold_out=True) == []
    summary = verify.summary(snap)
    assert summary["sold"] == 300 and summary["remaining"] == 0 and summary["in_transfer"] == 0
    assert len({r.order_no for r in snap.admitted}) == len(snap.orders)

    db = make_db(tmp_path / "orders.db", snap.orders.values())
    snap = await run.snapshot(db)
    assert snap.db is not None and len(snap.db.orders) == len(snap.orders)
    assert check(snap, expect_sold_out=True) == []
    assert "OK: every invariant holds" in verify.render(snap, [])


async def test_command_line(api: Api, backend: Backend, sku: str, tmp_path: Path, capsys):
    """``python -m loadtest.verify``: 0 and the table on a clean sale, 1 and the list once
    something is wrong, 2 for an unknown sale."""
    run = await small_run(api, sku, tmp_path)
    settings = api.gateway.settings
    argv = ["--sku", sku, "--redis-url", backend.url, "--redis-mode", backend.mode,
            "--key-prefix", settings.key_prefix, "--admitted", str(run.record), "--no-db"]
    assert await asyncio.to_thread(verify.main, argv) == 0
    out = capsys.readouterr().out
    assert "stock" in out and re.search(r"violations\s+0\n", out) and "OK: every invariant holds" in out

    run.write({"sku": sku, "order_no": new_order_no(0), "units": [1], "user_id": 1, "key": "x"})
    assert await asyncio.to_thread(verify.main, argv) == 1
    out = capsys.readouterr().out
    assert "admitted_order_missing" in out

    assert await asyncio.to_thread(verify.main, [*argv[:1], "no-such-sku", *argv[2:]]) == 2


async def test_pending_transfer_and_rejected_order_are_not_violations(api: Api, sku: str, tmp_path: Path):
    """Units in a half-done transfer count as in transfer; a rejected order's units are
    back in the sale: both keep conservation."""
    run = await small_run(api, sku, tmp_path, stock=40, buyers=10)
    store = api.gateway.store
    sale = await store.get_sale(sku)
    out = await store.transfer_out(sale, 1, 2, 3, "t-test")  # step 1 only: "crashed" mover
    assert out is not None and out[0] == 3
    victim = (await run.orders())[0]
    await store.compensate(victim, "test")
    snap = await run.snapshot()
    assert verify.summary(snap)["in_transfer"] == 3
    assert check(snap) == []
    # The DB does not hold the rejected order; every other one is there.
    db = make_db(tmp_path / "orders.db", [o for o in snap.orders.values() if o.status != "rejected"])
    assert check(await run.snapshot(db)) == []
    # Finishing the transfer keeps everything in place.
    await store.transfer_in(sale, Transfer("t-test", 1, 2, out[1], out[0], 0))
    assert check(await run.snapshot()) == []


# -- seeded violations (invariant 1: units) ------------------------------------------------------

async def test_catches_a_unit_sold_twice(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    first = (await run.orders())[0]
    shard = shard_of_order(first.order_no)
    twin = new_order_no(shard)
    sk = run.keys.shard(sku, shard)
    await run.redis.hset(sk.order(twin), mapping={
        "order_no": twin, "sku": sku, "user_id": 99_000 + shard, "units": str(first.units[0]),
        "quantity": 1, "amount": 0, "status": "admitted", "admitted_at": 0})
    await run.redis.sadd(sk.order_index, twin)
    violations = check(await run.snapshot())
    assert "unit_sold_twice" in kinds(violations), violations
    assert any(str(first.units[0]) in v.message for v in violations if v.kind == "unit_sold_twice")


async def test_catches_a_unit_duplicated_into_a_free_range(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path, stock=20, buyers=4)
    snap = await run.snapshot()
    donor = next(s for s in snap.shards if s.free_ranges)
    receiver = next(s for s in snap.shards if s.shard != donor.shard)
    unit = int(donor.free_ranges[0].split("-")[0])
    sk = run.keys.shard(sku, receiver.shard)
    await run.redis.rpush(sk.units, f"{unit}-{unit}")
    await run.redis.hincrby(sk.stock, "remaining", 1)  # counters agree: only the unit is twice
    violations = check(await run.snapshot())
    assert "unit_free_twice" in kinds(violations), violations


async def test_catches_a_sold_unit_back_in_a_free_range(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    sk = run.keys.shard(sku, shard_of_order(order.order_no))
    await run.redis.rpush(sk.units, f"{order.units[0]}-{order.units[0]}")
    violations = check(await run.snapshot())
    assert "unit_free_and_sold" in kinds(violations), violations


async def test_catches_units_lost(api: Api, sku: str, tmp_path: Path):
    """A unit vanishes from a free range: neither free, sold nor in transfer."""
    run = await small_run(api, sku, tmp_path, stock=20, buyers=4)
    snap = await run.snapshot()
    shard = next(s for s in snap.shards if s.free_ranges)
    lo, hi = map(int, shard.free_ranges[0].split("-"))
    sk = run.keys.shard(sku, shard.shard)
    if lo == hi:
        await run.redis.lpop(sk.units)
    else:
        await run.redis.lset(sk.units, 0, f"{lo + 1}-{hi}")
    violations = check(await run.snapshot())
    assert "unit_lost" in kinds(violations), violations
    assert any(v.kind == "unit_lost" and str(lo) in v.message for v in violations)
    assert "counter_mismatch" in kinds(violations)  # the shard's counter still counts it


async def test_catches_a_rejected_order_that_kept_its_units(api: Api, sku: str, tmp_path: Path):
    """Rejected, but its units never went back (and no DB order holds them)."""
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    sk = run.keys.shard(sku, shard_of_order(order.order_no))
    await run.redis.hset(sk.order(order.order_no), "status", "rejected")
    await run.redis.hincrby(sk.buyers, str(order.user_id), -1)
    others = [o for o in await run.orders() if o.order_no != order.order_no]
    violations = check(await run.snapshot(make_db(tmp_path / "orders.db", others)))
    assert "unit_lost" in kinds(violations), violations


async def test_catches_more_units_sold_than_stock(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path, stock=8, buyers=8, shards=2)
    order = (await run.orders())[0]
    sk = run.keys.shard(sku, shard_of_order(order.order_no))
    await run.redis.hset(sk.order(order.order_no), mapping={"units": f"{order.units[0]},9", "quantity": 2})
    violations = check(await run.snapshot())
    assert {"oversold", "unit_out_of_range"} <= kinds(violations), violations


# -- invariant 2: per-user limit ------------------------------------------------------------------

async def test_catches_a_user_over_the_limit(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path, shards=1)
    first, second = (await run.orders())[:2]
    sk = run.keys.shard(sku, 0)
    await run.redis.hset(sk.order(second.order_no), "user_id", first.user_id)
    violations = check(await run.snapshot())
    assert "user_over_limit" in kinds(violations), violations
    assert any(v.kind == "user_over_limit" and str(first.user_id) in v.message for v in violations)


# -- invariant 3: one key, one outcome --------------------------------------------------------------

async def test_catches_a_key_with_two_orders(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    a, b = (await run.orders())[:2]
    lines = [json.loads(line) for line in run.record.read_text().splitlines()]
    key_of_a = next(r["key"] for r in lines if r["order_no"] == a.order_no)
    run.write({"sku": sku, "order_no": b.order_no, "units": list(b.units), "user_id": a.user_id,
               "key": key_of_a})
    violations = check(await run.snapshot())
    assert "key_two_outcomes" in kinds(violations), violations


# -- invariant 4: demand >= stock sells out -----------------------------------------------------------

async def test_catches_units_left_when_sold_out_is_expected(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path, stock=20, buyers=10)
    snap = await run.snapshot()
    assert check(snap) == []
    violations = check(snap, expect_sold_out=True)
    assert kinds(violations) == {"not_sold_out"}, violations


# -- invariant 5: every 200 is an order ----------------------------------------------------------------

async def test_catches_a_200_without_an_order(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    ghost = new_order_no(3)
    run.write({"sku": sku, "order_no": ghost, "units": [7], "user_id": 3, "key": "k" * 20})
    violations = check(await run.snapshot())
    assert kinds(violations) == {"admitted_order_missing"}, violations
    assert ghost in violations[0].message


async def test_catches_a_malformed_record_line(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    with open(run.record, "a") as fh:
        fh.write(f'{{"sku": "{sku}", "order_no": "0-ab", "uni' + "\n")
    assert "record_malformed" in kinds(check(await run.snapshot()))


async def test_catches_an_order_missing_from_the_db(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    violations = check(await run.snapshot(make_db(tmp_path / "orders.db", orders[1:])))
    assert kinds(violations) == {"db_order_missing"}, violations
    assert orders[0].order_no in violations[0].message


# -- the database ------------------------------------------------------------------------------------

async def test_catches_a_unit_twice_in_the_db(api: Api, sku: str, tmp_path: Path):
    """A DB without UNIQUE(sku, unit) that let a second order claim a unit."""
    run = await small_run(api, sku, tmp_path)
    a, b = (await run.orders())[:2]
    db = make_db(tmp_path / "orders.db", await run.orders(), unique=False,
                 extra_units=[(sku, a.units[0], b.order_no)])
    violations = check(await run.snapshot(db))
    assert "db_unit_twice" in kinds(violations), violations
    assert any(v.kind == "db_unit_twice" and str(a.units[0]) in v.message for v in violations)


async def test_catches_a_db_order_redis_never_admitted(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path, stock=20, buyers=5)
    orders = await run.orders()
    sold = {u for o in orders for u in o.units}
    free_unit = next(u for u in range(1, 21) if u not in sold)
    stranger = Order(Purchase(new_order_no(0), sku, 424242, (free_unit,), 1, 0, 0), "admitted")
    violations = check(await run.snapshot(make_db(tmp_path / "orders.db", [*orders, stranger])))
    assert "db_unit_not_admitted" in kinds(violations), violations


async def test_catches_a_200_answered_with_other_units(api: Api, sku: str, tmp_path: Path):
    """The client was told units Redis did not give that order."""
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    key = next(json.loads(line)["key"] for line in run.record.read_text().splitlines()
               if json.loads(line)["order_no"] == order.order_no)
    wrong = [u for u in range(1, 21) if u not in order.units][:1]
    run.write({"sku": sku, "order_no": order.order_no, "units": wrong, "user_id": order.user_id, "key": key})
    violations = check(await run.snapshot())
    assert kinds(violations) == {"admitted_mismatch"}, violations
    assert order.order_no in violations[0].message


async def test_catches_a_db_order_that_differs_from_redis(api: Api, sku: str, tmp_path: Path):
    """The store holds the order for another user than Redis admitted it for."""
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    assert check(await run.snapshot(make_db(tmp_path / "clean.db", orders))) == []
    db = OrdersStore(tmp_path / "orders.db")
    for order in orders:
        db.deliver(order)
    db.execute("UPDATE orders SET user_id = 777777 WHERE order_no = ?", orders[0].order_no)
    violations = check(await run.snapshot(db.path))
    assert kinds(violations) == {"db_order_mismatch"}, violations
    assert orders[0].order_no in violations[0].message


async def test_catches_an_order_stored_twice(api: Api, sku: str, tmp_path: Path):
    """A store without UNIQUE(order_no) that took one delivery twice."""
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    db = OrdersStore(tmp_path / "orders.db", unique=False)
    for order in orders:
        db.deliver(order)
    db.deliver(orders[0], units=False)
    violations = check(await run.snapshot(db.path))
    assert "db_order_twice" in kinds(violations), violations
    assert any(v.kind == "db_order_twice" and orders[0].order_no in v.message for v in violations)


async def test_catches_a_rejected_order_in_the_db(api: Api, sku: str, tmp_path: Path):
    """The relay compensated an order the store had in fact stored."""
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    gw = api.gateway
    await Returns(gw.store, gw.sold_out).reject(orders[0], "test")
    clean = make_db(tmp_path / "clean.db", orders[1:])
    assert check(await run.snapshot(clean)) == []
    violations = check(await run.snapshot(make_db(tmp_path / "orders.db", orders)))
    assert "rejected_in_db" in kinds(violations), violations


async def test_catches_a_buyer_count_that_differs_from_the_orders(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    sk = run.keys.shard(sku, shard_of_order(order.order_no))
    await run.redis.hincrby(sk.buyers, str(order.user_id), 1)
    violations = check(await run.snapshot())
    assert kinds(violations) == {"buyers_mismatch"}, violations
    assert str(order.user_id) in violations[0].message


async def test_catches_one_order_answered_to_two_keys(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    run.write({"sku": sku, "order_no": order.order_no, "units": list(order.units), "user_id": order.user_id,
               "key": "another-key-0001"})
    violations = check(await run.snapshot())
    assert kinds(violations) == {"order_two_keys"}, violations


# -- a DB where one is expected ----------------------------------------------------------------------

async def test_a_missing_db_is_never_a_pass(api: Api, backend: Backend, sku: str, tmp_path: Path):
    """A database URL that names nothing readable: the Python API reports it, the command
    line says it could not verify (2); only --no-db checks Redis alone."""
    run = await small_run(api, sku, tmp_path)
    snap = await run.snapshot(tmp_path / "not-there.db")
    assert snap.db is None and snap.db_problem and "not-there.db" in snap.db_problem
    assert kinds(check(snap)) == {"db_unreadable"}

    settings = api.gateway.settings
    base = ["--sku", sku, "--redis-url", backend.url, "--redis-mode", backend.mode,
            "--key-prefix", settings.key_prefix, "--admitted", str(run.record)]
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a file, but the orders service never opened it
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    for url in (f"sqlite:///{tmp_path}/not-there.db", f"sqlite:///{empty}", f"sqlite:///{garbage}"):
        assert await asyncio.to_thread(verify.main, [*base, "--database-url", url]) == 2, url
    assert await asyncio.to_thread(verify.main, [*base, "--no-db"]) == 0
    orders = make_db(tmp_path / "orders.db", await run.orders())
    assert await asyncio.to_thread(verify.main, [*base, "--database-url", f"sqlite:///{orders}"]) == 0


async def test_reads_a_store_of_the_old_schema(api: Api, sku: str, tmp_path: Path):
    """No live flags, pay_by, refunds or releases: every unit row counts as live."""
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    db = OrdersStore(tmp_path / "orders.db", schema=OLD_SCHEMA)
    for order in orders:
        db.conn.execute("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (order.order_no, sku, order.user_id, 1, 0, ",".join(map(str, order.units))))
        db.conn.execute("INSERT INTO order_units (sku, unit, order_no) VALUES (?, ?, ?)",
                        (sku, order.units[0], order.order_no))
    snap = await run.snapshot(db.path)
    assert snap.db is not None and len(snap.db.live_claims()) == len(orders)
    assert check(snap) == []


# -- invariant 7: units come back once, sold again at most once; paid orders stay paid ------------------

async def test_lifecycle_run_passes(api: Api, sku: str, tmp_path: Path):
    """Expired, cancelled and late-paid orders released, their units sold again, a paid
    order kept: every invariant holds, and the summary counts the releases and resales."""
    life = await lifecycle_run(api, sku, tmp_path)
    assert len(life.resales) == 3
    snap = await life.snapshot()
    assert check(snap, expect_sold_out=True) == []
    s = verify.summary(snap)
    assert s["released_units"] == 3 and s["resold_units"] == 3
    assert s["balance"]["sold"] == 15 and s["balance"]["returned"] == 3 and s["balance"]["live"] == 12
    assert s["db"]["refunds_due"] == 1 and s["orders"]["released"] == 3
    text = verify.render(snap, [])
    assert "units released" in text and "OK: every invariant holds" in text
    assert verify.delivery_pending(snap) == 0


@pytest.mark.parametrize("field", ["reason", "release_reason"])
async def test_release_records_old_and_new(api: Api, sku: str, tmp_path: Path, field: str):
    """A released order's reason under either name; a buyer still counted after a
    release (a gateway may keep the limit used) is not a violation."""
    life = await lifecycle_run(api, sku, tmp_path)
    key = life.run.order_key(life.expired.order_no)
    await life.run.redis.hdel(key, "reason")
    await life.run.redis.hset(key, field, "expired")
    sk = life.run.keys.shard(sku, shard_of_order(life.cancelled.order_no))
    await life.run.redis.hincrby(sk.buyers, str(life.cancelled.user_id), 1)
    snap = await life.snapshot()
    assert snap.orders[life.expired.order_no].reason == "expired"
    assert check(snap) == []


async def test_catches_a_unit_row_live_for_a_closed_order(api: Api, sku: str, tmp_path: Path):
    life = await lifecycle_run(api, sku, tmp_path)
    life.db.execute("UPDATE order_units SET live = 0 WHERE order_no = ?", life.paid.order_no)
    violations = check(await life.snapshot())
    assert "db_live_mismatch" in kinds(violations), violations
    assert any(life.paid.order_no in v.message for v in violations if v.kind == "db_live_mismatch")


async def test_catches_a_unit_in_two_live_orders(api: Api, sku: str, tmp_path: Path):
    """The store still holds an expired order's units live while they were sold again."""
    life = await lifecycle_run(api, sku, tmp_path)
    life.db = OrdersStore(tmp_path / "relaxed.db", unique=False)
    for order in await life.run.orders():
        closed = order.order_no in (life.expired.order_no, life.cancelled.order_no, life.late.order_no)
        life.db.deliver(order, state="expired" if closed else "pending")
        if closed:
            life.db.add_units([(sku, u, order.order_no) for u in order.units], live=True)
    violations = check(await life.snapshot())
    assert {"db_unit_twice", "db_live_mismatch"} <= kinds(violations), violations


async def test_catches_a_paid_order_released(api: Api, sku: str, tmp_path: Path):
    life = await lifecycle_run(api, sku, tmp_path)
    assert check(await life.snapshot()) == []
    await life.run.release(life.paid, "expired")
    violations = check(await life.snapshot())
    assert "paid_order_released" in kinds(violations), violations
    assert any(life.paid.order_no in v.message for v in violations if v.kind == "paid_order_released")


async def test_catches_a_payment_answered_200_for_an_order_that_expired(api: Api, sku: str, tmp_path: Path):
    """The client was told its payment went through; the order expired anyway."""
    life = await lifecycle_run(api, sku, tmp_path)
    life.run.write(payment_line(life.expired, "n-lost", 200, "OK", "paid", late=False))
    violations = check(await life.snapshot())
    assert kinds(violations) == {"paid_order_released"}, violations


async def test_catches_a_release_the_store_never_closed(api: Api, sku: str, tmp_path: Path):
    """The gateway released an order that is still pending in the store."""
    life = await lifecycle_run(api, sku, tmp_path)
    victim = next(o for o in await life.run.orders()
                  if o.status == "admitted" and o.order_no != life.paid.order_no)
    await life.run.release(victim, "expired")
    violations = check(await life.snapshot())
    assert {"released_but_live", "units_unbalanced"} <= kinds(violations), violations


async def test_catches_a_release_for_the_wrong_reason(api: Api, sku: str, tmp_path: Path):
    life = await lifecycle_run(api, sku, tmp_path)
    await life.run.redis.hset(life.run.order_key(life.cancelled.order_no), "reason", "expired")
    violations = check(await life.snapshot())
    assert kinds(violations) == {"release_reason_mismatch"}, violations


async def test_catches_a_release_the_gateway_acknowledged_but_did_not_apply(api: Api, sku: str, tmp_path: Path):
    """The store closed the order and the gateway answered its release, yet Redis holds
    the order's units as sold: they never came back."""
    life = await lifecycle_run(api, sku, tmp_path)
    victim = next(o for o in await life.run.orders()
                  if o.status == "admitted" and o.order_no != life.paid.order_no)
    life.db.close(victim.order_no, "cancelled")
    violations = check(await life.snapshot())
    assert {"release_not_applied", "units_unbalanced"} <= kinds(violations), violations
    # While the release is still on its way, the same state is in flight, not a violation.
    life.db.execute("UPDATE releases SET done_at = NULL, outcome = NULL WHERE order_no = ?", victim.order_no)
    snap = await life.snapshot()
    assert check(snap) == []
    assert verify.summary(snap)["balance"]["in_flight"] == 1
    assert verify.delivery_pending(snap) == 2  # the order, and its release in the outbox


async def test_catches_a_late_payment_not_due_for_refund(api: Api, sku: str, tmp_path: Path):
    life = await lifecycle_run(api, sku, tmp_path)
    life.run.write(payment_line(life.expired, "n-forgotten", 409, "ORDER_CLOSED", "expired", late=True))
    violations = check(await life.snapshot())
    assert kinds(violations) == {"late_payment_not_refunded"}, violations


async def test_catches_units_out_of_balance(api: Api, sku: str, tmp_path: Path):
    """A live order in the store for a unit Redis holds as free: sold − returned no
    longer equals what the live orders hold."""
    run = await small_run(api, sku, tmp_path, stock=20, buyers=10)
    orders = await run.orders()
    sold = {u for o in orders for u in o.units}
    free_unit = next(u for u in range(1, 21) if u not in sold)
    stranger = Order(Purchase(new_order_no(0), sku, 424242, (free_unit,), 1, 0, 0), "admitted")
    violations = check(await run.snapshot(make_db(tmp_path / "orders.db", [*orders, stranger])))
    assert {"units_unbalanced", "db_unit_not_admitted"} <= kinds(violations), violations
    message = next(v.message for v in violations if v.kind == "units_unbalanced")
    assert "sold 10 − returned 0 = 10" in message and "live 11" in message


async def test_catches_a_release_that_kept_its_units(api: Api, sku: str, tmp_path: Path):
    """Released, but its units never went back: a released order keeps nothing."""
    run = await small_run(api, sku, tmp_path)
    order = (await run.orders())[0]
    await run.redis.hset(run.order_key(order.order_no), mapping={"status": "released", "reason": "expired"})
    violations = check(await run.snapshot())
    assert "unit_lost" in kinds(violations), violations
    assert any(v.kind == "unit_lost" and "released" in v.message for v in violations)


async def test_catches_a_release_applied_twice(api: Api, sku: str, tmp_path: Path):
    """A repeated release that gave the units back a second time: the unit is both free
    and sold again (units go back once)."""
    life = await lifecycle_run(api, sku, tmp_path)
    unit = life.expired.units[0]
    sk = life.run.keys.shard(sku, shard_of_order(life.expired.order_no))
    await life.run.redis.rpush(sk.units, f"{unit}-{unit}")
    await life.run.redis.hincrby(sk.stock, "remaining", 1)
    violations = check(await life.snapshot())
    assert {"unit_free_and_sold", "counter_mismatch"} <= kinds(violations), violations


# -- invariant 8: a key admits at most one purchase across all sales -----------------------------------

async def test_catches_a_key_that_bought_in_two_sales(api: Api, sku: str, tmp_path: Path):
    """Sent to a second sale, a used key answers 422 (nothing recorded): clean. A record
    of it admitted there too is a violation, reported for both sales."""
    run = await small_run(api, sku, tmp_path)
    other = Run(api, f"{sku}-b", run.record)
    await api.create_sale(other.sku, 20, shards=4)
    lines = [json.loads(line) for line in run.record.read_text().splitlines()]
    first = lines[0]
    status, body, _ = await api.buy(other.sku, first["user_id"], first["key"], 1)
    assert status == 422 and body["code"] == "IDEMPOTENCY_KEY_REUSED", body
    await other.crowd(range(1, 6))
    assert check(await run.snapshot()) == [] and check(await other.snapshot()) == []

    bought = (await other.orders())[0]
    other.write({"sku": other.sku, "order_no": bought.order_no, "units": list(bought.units),
                 "user_id": first["user_id"], "key": first["key"]})
    violations = check(await run.snapshot())
    assert kinds(violations) == {"key_two_sales"}, violations
    assert "key_two_sales" in kinds(check(await other.snapshot()))


# -- the sale's window -----------------------------------------------------------------------------------

async def test_catches_a_purchase_admitted_before_the_start(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    orders = await run.orders()
    first = min(o.purchase.admitted_at for o in orders)
    run.write(records.sale_entry(sku=sku, scenario="test", outcome="created", ts=time.time(),
                                 starts_at_ms=first - 1000))
    assert check(await run.snapshot()) == []
    run.write(records.sale_entry(sku=sku, scenario="test", outcome="created", ts=time.time(),
                                 starts_at_ms=first + 1))
    violations = check(await run.snapshot())
    assert kinds(violations) == {"admitted_before_start"}, violations


def test_the_window_comes_from_the_record_or_the_stored_sale():
    note = records.SaleNote(line=1, sku="s", scenario="t", outcome="created", starts_at_ms=5000, payment_ttl=5)
    assert verify.SaleWindow.of(note, {}) == verify.SaleWindow(5000, 5)
    stored = {"starts_at": "2026-12-01T12:00:00Z", "payment_ttl": 30}
    assert verify.SaleWindow.of(None, stored) == verify.SaleWindow(1796126400000, 30)
    assert verify.SaleWindow.of(None, {}) == verify.SaleWindow()


@pytest.mark.parametrize("url, path", [("sqlite:///orders.db", "orders.db"),
                                       ("sqlite:///./x/o.db", "./x/o.db"),
                                       ("sqlite:////abs/o.db", "/abs/o.db"),
                                       ("postgresql://h/db", None)])
def test_sqlite_urls(url: str, path: str | None):
    assert verify.sqlite_path(url) == path
