"""The load-test verifier (loadtest.verify): it passes on a clean run through the gateway
API, and catches each kind of seeded violation, on standalone Redis and on Redis Cluster.

Each seeded test breaks one thing the way a bug would (an order record holding a sold
unit, a unit duplicated into a free range, a user over the limit, a unit gone, a 200 with
no order, a key with two orders, a DB unit twice, ...) and asserts that the verifier
names that violation.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest

from gateway.models import Order, Purchase, Transfer
from gateway.store.keys import new_order_no, shard_of_order
from loadtest import verify
from loadtest.verify import Snapshot, Violation, check, collect
from tests.support.api import Api, Backend

SCHEMA = """
CREATE TABLE orders (
    order_no TEXT PRIMARY KEY, sku TEXT NOT NULL, user_id BIGINT NOT NULL, quantity INT NOT NULL,
    amount BIGINT NOT NULL, units TEXT NOT NULL, admitted_at BIGINT,
    state TEXT NOT NULL DEFAULT 'pending', state_version INT NOT NULL DEFAULT 1
);
CREATE TABLE order_units (sku TEXT NOT NULL, unit INT NOT NULL, order_no TEXT NOT NULL{unique});
CREATE TABLE payments (notify_id TEXT PRIMARY KEY, order_no TEXT NOT NULL, amount BIGINT NOT NULL);
"""


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


def make_db(path: Path, orders: Iterable[Order], *, unique: bool = True,
            extra_units: Iterable[tuple[str, int, str]] = ()) -> Path:
    """An orders store as the orders service would hold it after delivering ``orders``."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.format(unique=", UNIQUE (sku, unit)" if unique else ""))
    for o in orders:
        conn.execute("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units, admitted_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (o.order_no, o.sku, o.user_id, o.purchase.quantity, o.purchase.amount, ",".join(map(str, o.units)),
                      o.purchase.admitted_at))
        conn.executemany("INSERT INTO order_units (sku, unit, order_no) VALUES (?, ?, ?)",
                         [(o.sku, u, o.order_no) for u in o.units])
    conn.executemany("INSERT INTO order_units (sku, unit, order_no) VALUES (?, ?, ?)", list(extra_units))
    conn.commit()
    conn.close()
    return path


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


async def test_missing_db_file_is_skipped(api: Api, sku: str, tmp_path: Path):
    run = await small_run(api, sku, tmp_path)
    snap = await run.snapshot(tmp_path / "not-there.db")
    assert snap.db is None and any("DB checks skipped" in n for n in snap.notes)
    assert check(snap) == []


@pytest.mark.parametrize("url, path", [("sqlite:///orders.db", "orders.db"),
                                       ("sqlite:///./x/o.db", "./x/o.db"),
                                       ("sqlite:////abs/o.db", "/abs/o.db"),
                                       ("postgresql://h/db", None)])
def test_sqlite_urls(url: str, path: str | None):
    assert verify.sqlite_path(url) == path
