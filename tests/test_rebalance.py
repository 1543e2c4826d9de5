"""No false sold-out: units move between shards, conserved and crash-safe (issue 3).

On standalone Redis and on Redis Cluster (the ``backend`` fixture), through the HTTP API
where the outcome matters and through ``Store``/``Rebalancer`` where a step must be
stopped half-way. Conservation is checked on what Redis holds: every unit 1..S is in
exactly one place, a shard's free ranges (list ``ShardKeys.units``), a live order, or a
transfer record that its receiver has not applied.

No test depends on timing: orders of events are taken from one event loop's sequence
counter, and waits for background work are polls with a generous deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import sys
import textwrap
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from gateway.admission.moves import Rebalancer, Refill
from gateway.admission.purchase import PurchaseService
from gateway.admission.returns import Returns
from gateway.admission.sales import SaleCache
from gateway.admission.soldout import SoldOut
from gateway.config import Settings
from gateway.models import Order, Sale, Transfer
from gateway.store.connection import connect
from gateway.store.keys import KeySpace, shard_of
from gateway.store.scripts.purchase import Code as Purchase
from gateway.store.scripts.transfer import Applied as TransferIn
from gateway.store.store import Store
from tests.support.api import Api, Backend, new_sku, serve

# -- reading what Redis holds ------------------------------------------------------------

@dataclass
class Holdings:
    """Where each unit of a sale is, read key by key from Redis."""

    free: list[int]                 # in some shard's free ranges
    sold: list[int]                 # in a live (not rejected) order
    in_transfer: list[int]          # in a transfer record its receiver has not applied
    orders: list                    # every order record (gateway.models.Order)
    remaining: int                  # sum of the shards' "remaining" counters
    sold_counter: int               # sum of the shards' "sold" counters
    records: int                    # transfer records still present (applied or not)

    def everywhere(self) -> Counter:
        return Counter(self.free) + Counter(self.sold) + Counter(self.in_transfer)


def expand(ranges: str | list[str]) -> list[int]:
    if isinstance(ranges, str):
        ranges = [r for r in ranges.split(",") if r]
    units: list[int] = []
    for r in ranges:
        lo, hi = (int(x) for x in r.split("-"))
        units.extend(range(lo, hi + 1))
    return units


async def holdings(store: Store, sale: Sale) -> Holdings:
    client = store.client
    free: list[int] = []
    sold: list[int] = []
    pending: list[int] = []
    orders = []
    remaining = sold_counter = records = 0
    for shard in range(sale.shards):
        sk = store.keys.shard(sale.sku, shard)
        free.extend(expand(await client.lrange(sk.units, 0, -1)))
        stock = await client.hgetall(sk.stock)
        remaining += int(stock.get("remaining", 0))
        sold_counter += int(stock.get("sold", 0))
        for order_no in await client.smembers(sk.order_index):
            order = Order.from_record(await client.hgetall(sk.order(order_no)))
            orders.append(order)
            if order.status != "rejected":
                sold.extend(order.units)
        for transfer_id, record in (await client.hgetall(sk.transfers_out)).items():
            records += 1
            transfer = Transfer.parse(transfer_id, shard, record)
            receiver = store.keys.shard(sale.sku, transfer.receiver)
            if not await client.sismember(receiver.transfers_in, transfer_id):
                pending.extend(expand(transfer.ranges))
    return Holdings(free, sold, pending, orders, remaining, sold_counter, records)


async def assert_conserved(store: Store, sale: Sale) -> Holdings:
    """Every unit 1..S exactly once, and the counters agree with the lists."""
    h = await holdings(store, sale)
    everywhere = h.everywhere()
    twice = sorted(u for u, n in everywhere.items() if n > 1)
    assert not twice, f"units in two places: {twice[:20]}"
    assert sorted(everywhere) == list(range(1, sale.stock + 1)), "units lost or invented"
    assert h.remaining == len(h.free)
    assert h.sold_counter == len(h.sold)
    return h


async def sale_of(api: Api, sku: str) -> Sale:
    sale = await api.gateway.store.get_sale(sku)
    assert sale is not None
    return sale


def admin_total(view: dict) -> int:
    """Units the admin view accounts for: in shards, sold, in transfer."""
    assert view["remaining"] == sum(s["remaining"] for s in view["shards"])
    assert view["sold"] == sum(s["sold"] for s in view["shards"])
    return view["remaining"] + view["sold"] + view["in_transfer"]


# -- a crowd of buyers -------------------------------------------------------------------

@dataclass
class Answer:
    user: int
    status: int
    body: dict
    sent: int       # position of "request sent" in the run's event sequence
    received: int   # position of "answer received"


async def crowd(api: Api, sku: str, users: list[int], concurrency: int = 100,
                quantity: int | None = None) -> list[Answer]:
    """Every user buys once (client key mode), ``concurrency`` at a time. Each answer
    carries the positions of its send and its receipt in one sequence, taken on the
    single event loop that runs every request, so the order of events is exact."""
    sequence = itertools.count()
    sem = asyncio.Semaphore(concurrency)

    async def one(user: int) -> Answer:
        async with sem:
            sent = next(sequence)
            status, body, _ = await api.buy(sku, user, f"crowd-{user}-{sku}", quantity)
            return Answer(user, status, body, sent, next(sequence))

    return list(await asyncio.gather(*(one(u) for u in users)))


def assert_no_false_sold_out(answers: list[Answer], stock: int) -> None:
    """Exactly ``stock`` units sold, each once, and no SOLD_OUT told while units were left.

    What is checkable without clocks: units only ever leave the sale by being sold here
    (no compensation runs in these tests, and a move keeps them in the sale), so "units
    left" can only go down. A 410 answered at time t was wrong iff some unit was still
    unsold at t. If a 200 request was *sent* after that 410 was *received*, the unit it
    got was unsold when the 410 was answered (answered <= received < sent <= admitted),
    so that 410 was a false sold-out. Hence: every 410 must be received after the last
    200 was sent. (The converse does not hold: a false 410 that overlaps the last
    purchases in time cannot be told apart; the count check below and the double
    collect's own tests cover the rest.) And since demand > stock and nothing fails,
    the 200s must number exactly the stock."""
    ok = [a for a in answers if a.status == 200]
    sold_out = [a for a in answers if a.status == 410]
    others = Counter((a.status, a.body.get("code")) for a in answers if a.status not in (200, 410))
    assert not others, f"answers other than 200 and 410: {others}"
    assert all(a.body["code"] == "SOLD_OUT" for a in sold_out)
    assert len(ok) == stock, (len(ok), stock)
    units = sorted(u for a in ok for u in a.body["units"])
    assert units == list(range(1, stock + 1)), "a unit was given twice, or one is missing"
    if sold_out:
        last_ok_sent = max(a.sent for a in ok)
        early = [a for a in sold_out if a.received < last_ok_sent]
        assert not early, (f"{len(early)} SOLD_OUT answered before a later purchase "
                           f"still got a unit (first at event {min(a.received for a in early)}, "
                           f"last 200 sent at event {last_ok_sent})")


async def assert_sold_out_view(api: Api, sku: str, stock: int) -> None:
    view = await api.sale(sku)
    assert (view["sold"], view["remaining"], view["in_transfer"]) == (stock, 0, 0), view
    assert view["sold_out"] is True
    assert all(s["transfers_out"] == 0 for s in view["shards"]), view["shards"]


# -- skew --------------------------------------------------------------------------------

async def test_all_buyers_in_one_shard(backend: Backend):
    """3,000 buyers, all in shard 3 of 16, race for 1,000 units: all 1,000 are sold,
    each once, and nobody hears SOLD_OUT while a unit is left anywhere."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        stock = 1000
        await api.create_sale(sku, stock, shards=16)
        users = [16 * i + 3 for i in range(3000)]
        answers = await crowd(api, sku, users, concurrency=100)
        assert_no_false_sold_out(answers, stock)
        await assert_sold_out_view(api, sku, stock)
        sale = await sale_of(api, sku)
        h = await assert_conserved(api.gateway.store, sale)
        assert h.free == [] and h.in_transfer == [] and h.records == 0
        # Every unit went through shard 3: the moves brought the others' units there.
        assert {int(o.order_no.split("-")[0]) for o in h.orders} == {3}
        assert api.gateway.rebalancer.moves > 0


def zipf_users(seed: int, count: int, shards: int, s: float = 1.3) -> list[int]:
    """``count`` distinct users spread over shards by a Zipf law: the shard of rank k
    (ranks in a random order of the shards) gets a share proportional to 1/k^s."""
    rng = random.Random(seed)
    order = list(range(shards))
    rng.shuffle(order)
    weights = [1 / (k + 1) ** s for k in range(shards)]
    per_shard = Counter(rng.choices(order, weights, k=count))
    users = [shard + shards * i for shard, n in per_shard.items() for i in range(n)]
    rng.shuffle(users)
    return users


@pytest.mark.parametrize(("seed", "buyers"), [(7, 900), (2024, 400)])
async def test_zipf_skew_sells_exactly_the_stock(backend: Backend, seed: int, buyers: int):
    """Users spread over the shards by a Zipf law (a few shards hold most buyers), with
    demand above the stock and exactly equal to it: every unit is sold, each once."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        stock = 400
        await api.create_sale(sku, stock, shards=16)
        users = zipf_users(seed, buyers, 16)
        answers = await crowd(api, sku, users, concurrency=64)
        assert_no_false_sold_out(answers, stock)
        await assert_sold_out_view(api, sku, stock)
        h = await assert_conserved(api.gateway.store, await sale_of(api, sku))
        assert h.free == [] and h.in_transfer == []


# -- quantity > 1 ------------------------------------------------------------------------

async def test_quantity_above_the_shards_units_is_served_by_a_move(backend: Backend):
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 32, shards=16, per_user_limit=5)  # 2 units a shard
        status, body, _ = await api.buy(sku, 3, "qty-five-1", 5)
        assert status == 200, body
        assert len(set(body["units"])) == 5
        view = await api.sale(sku)
        assert (view["sold"], admin_total(view)) == (5, 32)
        assert view["shards"][3]["sold"] == 5
        await assert_conserved(api.gateway.store, await sale_of(api, sku))


async def test_quantity_above_what_is_left_is_refused_and_takes_nothing(backend: Backend):
    """Three units left, five asked: not SOLD_OUT (units are left), but
    INSUFFICIENT_STOCK, recorded against the key, with nothing taken."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 8, shards=4, per_user_limit=5)  # 2 units a shard
        # Sell 5: shards 0 and 1 empty, one unit left in 2, two in 3.
        for user, q in ((0, 2), (1, 2), (2, 1)):
            assert (await api.buy(sku, user, f"fill-{user}-key", q))[0] == 200
        status, body, _ = await api.buy(sku, 4, "greedy-key-4", 5)  # shard 0, empty
        assert (status, body["code"]) == (409, "INSUFFICIENT_STOCK")
        view = await api.sale(sku)
        assert (view["sold"], view["remaining"], admin_total(view)) == (5, 3, 8)
        # Recorded against the key: a retry gets the same outcome, still nothing taken.
        status, again, _ = await api.buy(sku, 4, "greedy-key-4", 5)
        assert again["original"] == {"status": 409, "body": body}
        # The sale is not sold out: right after, buyers of other empty shards get the
        # units left (the 410 above must not leave a "sold out" memory behind).
        status, one, _ = await api.buy(sku, 5, "after-greedy-5", 1)   # shard 1, empty
        assert status == 200, one
        status, two, _ = await api.buy(sku, 8, "after-greedy-8", 2)   # shard 0, empty
        assert status == 200, two
        status, last, _ = await api.buy(sku, 9, "after-greedy-9", 1)
        assert (status, last["code"]) == (410, "SOLD_OUT")
        await assert_sold_out_view(api, sku, 8)


async def test_retry_of_a_success_after_sell_out_keeps_its_outcome(backend: Backend):
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 2, shards=2)
        status, first, _ = await api.buy(sku, 1, "winner-key-1")
        assert status == 200
        assert (await api.buy(sku, 0, "winner-key-0"))[0] == 200
        assert (await api.buy(sku, 3, "late-key-3"))[0] == 410   # shard 1, now known sold out
        for _ in range(500):  # (learned in the background: who still goes to Redis)
            if api.gateway.sold_out.known(sku):
                break
            await asyncio.sleep(0.01)
        assert api.gateway.sold_out.known(sku)
        status, again, _ = await api.buy(sku, 1, "winner-key-1")
        assert (status, again["original"]) == (409, {"status": 200, "body": first})


# -- a move stopped half-way -------------------------------------------------------------

async def test_move_interrupted_between_its_steps(backend: Backend):
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        stock = 160
        await api.create_sale(sku, stock, shards=16)  # 10 units a shard
        for user in (3, 19, 5):
            assert (await api.buy(sku, user, f"before-move-{user}"))[0] == 200
        store, sale = api.gateway.store, await sale_of(api, sku)

        # Step 1 only, then "crash": the units are in the record, nowhere else.
        transfer_id = uuid.uuid4().hex
        count, ranges = await store.transfer_out(sale, 5, 3, 7, transfer_id)
        assert count == 7 and len(expand(ranges)) == 7
        view = await api.sale(sku)
        assert view["in_transfer"] == 7 and admin_total(view) == stock
        assert view["shards"][5]["transfers_out"] == 1
        h = await assert_conserved(store, sale)
        assert sorted(h.in_transfer) == sorted(expand(ranges))

        # Purchases go on meanwhile, without touching the units in transfer.
        assert (await api.buy(sku, 21, "during-move-21"))[0] == 200
        assert admin_total(await api.sale(sku)) == stock

        # The sweep finishes it: units at the receiver, the record gone.
        assert await api.gateway.rebalancer.sweep(sale) == 1
        view = await api.sale(sku)
        assert view["in_transfer"] == 0 and admin_total(view) == stock
        assert [s["transfers_out"] for s in view["shards"]] == [0] * 16
        assert view["shards"][3]["remaining"] == 10 - 2 + 7
        await assert_conserved(store, sale)

        # Step 2 again (a late mover, a second sweeper) adds nothing.
        transfer = Transfer(transfer_id, 5, 3, ranges, count, 0)
        assert await store.transfer_in(sale, transfer) is TransferIn.ALREADY_APPLIED
        assert await store.transfer_in(sale, transfer) is TransferIn.ALREADY_APPLIED
        assert (await api.sale(sku))["shards"][3]["remaining"] == 15
        await assert_conserved(store, sale)


async def test_a_move_of_a_deleted_sale_never_lands_in_its_successor(backend: Backend):
    """The SKU is deleted and created again between the two steps of a move: the old
    sale's units must not join the new sale (its shards have the same keys), or the
    new sale would hold those unit numbers twice."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 40, shards=4)
        store, old = api.gateway.store, await sale_of(api, sku)
        transfer_id = uuid.uuid4().hex
        count, ranges = await store.transfer_out(old, 0, 2, 4, transfer_id)
        resp = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
        assert resp.status == 204
        await api.create_sale(sku, 40, shards=4)
        new = await sale_of(api, sku)
        assert new.generation != old.generation
        late = Transfer(transfer_id, 0, 2, ranges, count, 0)
        assert await store.transfer_in(old, late) is TransferIn.NO_SHARD
        assert await store.transfer_out(old, 1, 2, 4, uuid.uuid4().hex) is None
        view = await api.sale(sku)
        assert (view["remaining"], view["in_transfer"]) == (40, 0)
        await assert_conserved(store, new)


async def test_move_interrupted_after_step_two(backend: Backend):
    """Steps 1 and 2 ran, the record was not deleted: the units are counted once (at
    the receiver, not also in transfer), and the sweep only deletes the record."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 40, shards=4)
        store, sale = api.gateway.store, await sale_of(api, sku)
        transfer_id = uuid.uuid4().hex
        count, ranges = await store.transfer_out(sale, 0, 2, 4, transfer_id)
        transfer = Transfer(transfer_id, 0, 2, ranges, count, 0)
        assert await store.transfer_in(sale, transfer) is TransferIn.APPLIED
        view = await api.sale(sku)
        assert (view["in_transfer"], view["remaining"], admin_total(view)) == (0, 40, 40)
        assert view["shards"][0]["transfers_out"] == 1
        assert await api.gateway.rebalancer.sweep(sale) == 1
        view = await api.sale(sku)
        assert [s["remaining"] for s in view["shards"]] == [6, 10, 14, 10]
        assert [s["transfers_out"] for s in view["shards"]] == [0] * 4
        await assert_conserved(store, sale)


async def test_buyer_of_an_empty_shard_gets_the_units_of_a_stuck_move(backend: Backend):
    """Every shard is empty, the last units sit in a transfer record whose mover died:
    the sale is not sold out, and the next buyer (any shard) gets them."""
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 4, shards=4)
        for user in (0, 1, 2):
            assert (await api.buy(sku, user, f"early-key-{user}"))[0] == 200
        store, sale = api.gateway.store, await sale_of(api, sku)
        count, _ = await store.transfer_out(sale, 3, 1, 1, uuid.uuid4().hex)
        assert count == 1
        view = await api.sale(sku)
        assert (view["remaining"], view["in_transfer"], view["sold_out"]) == (0, 1, False)
        status, body, _ = await api.buy(sku, 6, "late-buyer-6")   # shard 2
        assert status == 200, body
        assert body["units"] == [4]
        assert (await api.buy(sku, 7, "last-buyer-7"))[1]["code"] == "SOLD_OUT"
        await assert_sold_out_view(api, sku, 4)


CRASHING_MOVER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    import gateway.store.store
    from gateway.config import Settings
    from gateway.store.keys import KeySpace
    from gateway.store.connection import connect
    from gateway.store.store import Store

    # The record must look older than the gateway's sweep threshold (5 s).
    gateway.store._now_ms = lambda: int(time.time() * 1000) - 60_000

    async def main():
        settings = Settings(redis_url=os.environ["URL"], redis_mode=os.environ["MODE"])
        store = Store(connect(settings), KeySpace(os.environ["PREFIX"]))
        sale = await store.get_sale(os.environ["SKU"])
        count, ranges = await store.transfer_out(sale, int(os.environ["DONOR"]),
                                                 int(os.environ["RECEIVER"]), 6, "crashed-mover")
        print(json.dumps({"count": count, "ranges": ranges}), flush=True)
        await asyncio.sleep(3600)   # "transfer_in" would come next; SIGKILL comes first

    asyncio.run(main())
""")


async def test_mover_killed_between_steps_is_finished_by_the_background_sweep(backend: Backend):
    """A real process runs step 1 and is killed with SIGKILL before step 2: the units
    stay counted (in transfer), and the gateway's own sweep loop finishes the move."""
    settings = backend.settings(key_mode="client")
    async with serve(settings) as api:
        gw = api.gateway
        for task in gw.tasks:        # stop the sweep loop while the half-done move is examined
            task.cancel()
        await asyncio.gather(*gw.tasks, return_exceptions=True)
        gw.tasks.clear()
        sku = new_sku()
        stock = 48
        await api.create_sale(sku, stock, shards=8)   # 6 units a shard
        assert (await api.buy(sku, 1, "before-kill-1"))[0] == 200

        env = {**os.environ, "URL": settings.redis_url, "MODE": settings.redis_mode,
               "PREFIX": settings.key_prefix, "SKU": sku, "DONOR": "6", "RECEIVER": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CRASHING_MOVER, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (await proc.stderr.read()).decode()
            moved = json.loads(line)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert moved["count"] == 6

        view = await api.sale(sku)
        assert (view["in_transfer"], view["sold"], admin_total(view)) == (6, 1, stock)
        assert view["shards"][6] == {"shard": 6, "remaining": 0, "sold": 0, "transfers_out": 1}
        sale = await sale_of(api, sku)
        await assert_conserved(gw.store, sale)

        # The gateway's sweep loop, as started with the app, finishes it.
        gw.tasks.append(asyncio.create_task(gw.rebalancer.sweep_forever()))
        for _ in range(200):
            view = await api.sale(sku)
            if view["shards"][6]["transfers_out"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (view["in_transfer"], view["sold"], admin_total(view)) == (0, 1, stock)
        assert view["shards"][6]["transfers_out"] == 0
        assert view["shards"][1]["remaining"] == 6 - 1 + 6
        await assert_conserved(gw.store, sale)
        again = Transfer("crashed-mover", 6, 1, moved["ranges"], 6, 0)
        assert await gw.store.transfer_in(sale, again) is TransferIn.ALREADY_APPLIED
        assert admin_total(await api.sale(sku)) == stock


# -- the refill decision -----------------------------------------------------------------

async def test_refill_outcomes(backend: Backend):
    settings = backend.settings()
    store = Store(connect(settings), KeySpace(settings.key_prefix))
    try:
        sale = Sale(new_sku(), 8, per_user_limit=8, shards=4)
        sale = await store.create_sale(sale)  # type: ignore[assignment]
        assert sale is not None
        rebalancer = Rebalancer(store)
        assert (await rebalancer.refill(sale, 1, 5))[0] is Refill.MOVED
        states = await store.shard_states(sale)
        assert states[1].remaining >= 5 and sum(s.remaining for s in states) == 8
        before = [s.remaining for s in await store.shard_states(sale)]
        assert (await rebalancer.refill(sale, 2, 9))[0] is Refill.INSUFFICIENT
        # Too few units for the asker: nothing moves (it would only feed a tug of war).
        assert [s.remaining for s in await store.shard_states(sale)] == before
        assert (await rebalancer.refill(sale, 2, 8))[0] is Refill.MOVED
        # Drain the sale through shard 2, then ask again: sold out.
        reply = await store.purchase(sale, 2, "drain-all-key", 8, 2)
        assert reply.code is Purchase.OK and sorted(reply.units) == list(range(1, 9))
        assert (await rebalancer.refill(sale, 0, 1))[0] is Refill.SOLD_OUT
        # 20 buyers of one empty shard at once share one refill, which brings units for
        # all of them (16 + 8: the first donor whole, then half of the next), not one each.
        sale2 = Sale(new_sku(), 64, per_user_limit=16, shards=4)  # 16 units a shard
        sale2 = await store.create_sale(sale2)  # type: ignore[assignment]
        assert sale2 is not None
        assert (await store.purchase(sale2, 3, "empty-shard-3", 16, 3)).code is Purchase.OK
        before = rebalancer.moves
        results = [r for r, _ in await asyncio.gather(*(rebalancer.refill(sale2, 3, 1) for _ in range(20)))]
        assert set(results) == {Refill.MOVED}
        assert rebalancer.moves - before == 2
        remaining = [s.remaining for s in await store.shard_states(sale2)]
        assert remaining[3] == 24 and sorted(remaining) == [0, 8, 16, 24]
        await assert_conserved(store, sale2)
    finally:
        await store.close()


# -- random interleavings (property-based) -----------------------------------------------

STOCK, SHARDS, LIMIT = 12, 4, 3


class MoveMachine(RuleBasedStateMachine):
    """Random interleavings of purchases, the three steps of moves (each step may be
    repeated, or never run: a crash), refills, sweeps and compensations, on real Redis.
    After every step: each unit 1..S is in exactly one place (free, a live order, a
    pending transfer) and the counters agree."""

    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(redis_url=self.url, key_prefix=f"m{uuid.uuid4().hex[:10]}")
        self.store = Store(connect(self.settings), KeySpace(self.settings.key_prefix))
        self.sale = Sale(new_sku(), STOCK, per_user_limit=LIMIT, shards=SHARDS)
        self.rebalancer = Rebalancer(self.store)
        self.returns = Returns(self.store, SoldOut(self.store))
        self.service = PurchaseService(self.settings.replace(key_mode="client"), self.store,
                                       SaleCache(self.store), self.returns.sold_out,
                                       self.rebalancer, None)  # type: ignore[arg-type]
        self.transfers: list[Transfer] = []     # out, maybe in, not done
        self.applied: set[str] = set()
        self.given: dict[str, tuple[int, ...]] = {}   # order_no -> units, every admitted order
        self.keys = itertools.count()
        self.sale = self.run(self.store.create_sale(self.sale))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.delete_sale(self.sale))
            self.run(self.store.close())
        finally:
            self.loop.close()

    def _admitted(self, order_no: str, units: tuple[int, ...]) -> None:
        live = {u for no, us in self.given.items() for u in us if no != order_no
                and self._status(no) != "rejected"}
        assert not live & set(units), f"unit given twice: {sorted(live & set(units))}"
        self.given[order_no] = units

    def _status(self, order_no: str) -> str:
        order = self.run(self.store.get_order(order_no))
        return order.status if order else "gone"

    @rule(user=st.integers(0, 15), quantity=st.integers(1, LIMIT))
    def buy_one_call(self, user, quantity):
        """One purchase script call, no refill: NEED_UNITS when the shard is short."""
        shard = shard_of(user, SHARDS)
        reply = self.run(self.store.purchase(self.sale, user, f"k{next(self.keys)}", quantity, shard))
        if reply.code is Purchase.OK:
            assert len(reply.units) == quantity
            self._admitted(reply.order_no, reply.units)

    @rule(user=st.integers(0, 15), quantity=st.integers(1, LIMIT))
    def buy_with_refills(self, user, quantity):
        """The gateway's purchase path: refills until admitted or truly out of units."""
        before = self.run(holdings(self.store, self.sale))
        outcome = self.run(self.service._admit(self.sale, user, f"k{next(self.keys)}", quantity))
        self._forget_finished()   # a refill finishes the transfers it finds pending
        if outcome.status == 200:
            units = tuple(outcome.body["units"])
            assert len(units) == quantity
            self._admitted(outcome.body["order_no"], units)
        elif outcome.status == 410:
            # No false sold-out: nobody else acts meanwhile, so the sale really was empty.
            assert len(before.free) + len(before.in_transfer) == 0, before
        elif outcome.body["code"] == "INSUFFICIENT_STOCK":
            assert 0 < len(before.free) + len(before.in_transfer) < quantity, before
        else:
            assert outcome.status == 409 and outcome.body["code"] == "ALREADY_PURCHASED"

    @rule(donor=st.integers(0, SHARDS - 1), receiver=st.integers(0, SHARDS - 1),
          want=st.integers(1, 6))
    def transfer_out(self, donor, receiver, want):
        if donor == receiver:
            return
        transfer_id = uuid.uuid4().hex
        out = self.run(self.store.transfer_out(self.sale, donor, receiver, want, transfer_id))
        assert out is not None
        count, ranges = out
        if count:
            self.transfers.append(Transfer(transfer_id, donor, receiver, ranges, count, 0))

    @precondition(lambda self: self.transfers)
    @rule(pick=st.integers(0, 100))
    def transfer_in(self, pick):
        transfer = self.transfers[pick % len(self.transfers)]
        result = self.run(self.store.transfer_in(self.sale, transfer))
        expected = TransferIn.ALREADY_APPLIED if transfer.transfer_id in self.applied else TransferIn.APPLIED
        assert result is expected
        self.applied.add(transfer.transfer_id)

    @precondition(lambda self: any(t.transfer_id in self.applied for t in self.transfers))
    @rule(pick=st.integers(0, 100))
    def transfer_done(self, pick):
        applied = [t for t in self.transfers if t.transfer_id in self.applied]
        transfer = applied[pick % len(applied)]
        self.run(self.store.transfer_done(self.sale, transfer))
        self.transfers.remove(transfer)

    @rule()
    def sweep(self):
        """Finishes what the crashed (never continued) moves left behind."""
        self.run(self.rebalancer.sweep(self.sale))
        self.applied.update(t.transfer_id for t in self.transfers)
        self.transfers.clear()

    @rule(receiver=st.integers(0, SHARDS - 1), need=st.integers(1, LIMIT))
    def refill(self, receiver, need):
        before = self.run(holdings(self.store, self.sale))
        result, _ = self.run(self.rebalancer.refill(self.sale, receiver, need))
        after = self.run(self.store.shard_states(self.sale))
        available = len(before.free) + len(before.in_transfer)
        if result is Refill.MOVED:
            # Units arrived, or the refill finished transfers it found pending.
            assert after[receiver].remaining >= need or before.records
        elif result is Refill.SOLD_OUT:
            assert available == 0
        elif result is Refill.INSUFFICIENT:
            assert 0 < available < need
        self._forget_finished()

    def _forget_finished(self) -> None:
        """Drop the transfers whose record is gone: someone finished them (steps 2 and 3)."""
        for transfer in list(self.transfers):
            sk = self.store.keys.shard(self.sale.sku, transfer.donor)
            if not self.run(self.store.client.hexists(sk.transfers_out, transfer.transfer_id)):
                self.transfers.remove(transfer)
                self.applied.add(transfer.transfer_id)

    @precondition(lambda self: self.given)
    @rule(pick=st.integers(0, 100))
    def compensate(self, pick):
        order_no = list(self.given)[pick % len(self.given)]  # order numbers are random: pick by age
        order = self.run(self.store.get_order(order_no))
        self.run(self.returns.reject(order, "refused upstream"))

    @invariant()
    def conserved(self):
        h = self.run(assert_conserved(self.store, self.sale))
        pending = {t.transfer_id for t in self.transfers if t.transfer_id not in self.applied}
        assert len(h.in_transfer) == sum(t.count for t in self.transfers if t.transfer_id in pending)
        assert h.records == len(self.transfers)


def test_random_interleavings_conserve_units(standalone_redis):
    MoveMachine.url = standalone_redis.url
    run_state_machine_as_test(MoveMachine, settings=hsettings(
        max_examples=60, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
