"""Adversarial review, round 2 (after tests/test_adversarial.py): attacks on the sold-out
fast path, idempotency bindings over time, delivery of released orders, scripts resent,
and the sale window's edges; on real Redis (standalone and Cluster).

Each test is one attack and asserts the invariant it tries to break: it passes when the
code is right. Interleavings are driven step by step through the real store functions,
as two gateway processes would call them; time is moved by shortening TTLs (never by a
sleep a result depends on).

Attack -> result -> fix:
  fast path, units back and sold out again between two watches of a process
      -> DEFECT: the watcher confirmed a sold-out sale by its mark alone and kept its
         old list of users with a recorded outcome, so a buyer of the returned units
         (whose key holds a 200) was answered 410 from memory -> the sold-out state
         learnt carries the count of returns it was read under; a watch or a load that
         sees another count drops what it knew (gateway/admission/soldout.py)
  fast path, learning the buyers while units come back and sell out again
      -> DEFECT: ``_load`` read the buyers first and the sold-out state after, so a
         buyer added in between was missing -> state first, buyers, state again with
         the same count of returns (same fix)
  a key bound in its own slot (claim_key) for a sale of another shard count, resent
  later -> DEFECT: the binding kept the TTL of its first send, the purchase's outcome
         got a fresh one; once the binding expired, the key (its outcome still stored)
         bought again on another sale -> claim_key renews the binding on every send,
         and the binding outlives the outcome (TTL + a margin)
  release of an order while its delivery is being retried (5xx) or paused (breaker)
      -> DEFECT: the relay looked at the order's status only before its first POST and
         delivered the released order at the next retry -> it looks again before
         every retry (gateway/delivery/relay.py)
  fast path for a key used on another sale; every script resent with the same
  arguments; moves resent after later steps, or into a re-created sale; moves a crash
  left half-done holding every unit; a rejection and a release of one order at once;
  a release of a deleted sale's order; purchase exactly at ``ends_at``, or before the
  start by Redis's clock only; release after the end; breaker opening and closing with
  refused orders; concurrent resends of one key through two processes -> defended.

Not fixed (noted): a release that lands while the order's POST is on the wire cannot
stop that POST (the relay logs it; if the endpoint keeps that order, a unit sold again
meets UNIT_TAKEN and stays counted as sold); a key that bought just before ``ends_at``
and is resent after it hears 410 SALE_ENDED (the contract ranks SALE_ENDED before
IDEMPOTENT_CONFLICT), its order still delivered and shown by GET /api/orders.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp import web

from gateway.admission.snapshot import read_sale
from gateway.admission.window import outside
from gateway.app import Gateway
from gateway.http.errors import ApiError
from gateway.models import Sale, Transfer
from gateway.store.connection import is_redis_failure
from gateway.store.scripts import compensate as compensate_script
from gateway.store.scripts import mark_delivered as mark_delivered_script
from gateway.store.scripts import purchase as purchase_script
from gateway.store.scripts import sales as sale_scripts
from gateway.store.scripts import sold_out as sold_out_script
from gateway.store.scripts import transfer as transfer_script
from gateway.store.store import Store
from tests.support.api import Backend, new_sku, serve
from tests.support.delivery import backlog, eventually, running_relay
from tests.support.steps import until

# -- helpers ------------------------------------------------------------------------------------


async def _age(store: Store, keys: list[str], ms: int) -> None:
    """Move time on by ``ms`` for these keys' TTLs (a key whose TTL runs out is gone)."""
    for key in keys:
        left = await store.client.pttl(key)
        if left <= 0:
            continue
        if left <= ms:
            await store.client.delete(key)
        else:
            await store.client.pexpire(key, left - ms)


async def _conserved(store: Store, sale: Sale) -> Any:
    snap = await read_sale(store, sale)
    assert snap.consistent
    assert snap.remaining + snap.sold + snap.in_transfer == sale.stock, snap
    return snap


class _Endpoint:
    """A seckill endpoint on a local port: answers ``status`` to every POST (201 stores
    the order: ``accepted``); ``on_post`` is set at every POST."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.posts: list[tuple[str, int]] = []
        self.accepted: list[str] = []
        self.on_post = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        order_no = (await request.json())["order_no"]
        status = self.status
        self.posts.append((order_no, status))
        if 200 <= status < 300:
            self.accepted.append(order_no)
        self.on_post.set()
        return web.json_response({"code": "CREATED" if status < 300 else "NOPE"}, status=status)

    async def __aenter__(self) -> _Endpoint:
        app = web.Application()
        app.router.add_post("/orders", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/orders"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


# == 1. the sold-out fast path ===================================================================

async def _sold_out_then_back_and_resold(p: Gateway, q: Gateway, sku: str) -> tuple[Sale, str]:
    """Stock 1 over 2 shards. u0 (via Q) buys the unit; u1 (via P) hears SOLD_OUT: P now
    knows the sale is sold out. Then, through Q only: u0's order is released, u3 buys the
    unit that came back, u5 hears SOLD_OUT (the sale is marked sold out again). Returns
    the sale and u3's key."""
    first = await q.purchases.buy(0, sku, "key-u0-00000001", 1)
    assert first.status == 200, first.body
    out = await p.purchases.buy(1, sku, "key-u1-00000001", 1)
    assert out.status == 410, out.body
    sale = await p.store.get_sale(sku)
    assert sale is not None
    return sale, first.body["order_no"]


async def _back_and_resold(q: Gateway, sku: str, order_no: str) -> None:
    order = await q.store.get_order(order_no)
    assert order is not None
    assert (await q.returns.release(order, "cancelled")).returned == 1
    bought = await q.purchases.buy(3, sku, "key-u3-00000001", 1)
    assert bought.status == 200, bought.body
    again = await q.purchases.buy(5, sku, "key-u5-00000001", 1)
    assert again.status == 410, again.body


async def test_a_buyer_of_returned_units_is_not_told_410_by_a_watch_that_missed_the_return(
        backend: Backend, sku: str) -> None:
    """Fast path (invariant 3): units come back and sell out again between two watches of
    process P. P must not answer the new buyer's key 410 from memory: that key holds a
    200 (P must replay it, or say it conflicts)."""
    settings = backend.settings(key_mode="client")
    p, q = Gateway.build(settings), Gateway.build(settings)
    try:
        await p.store.create_sale(Sale(sku, 1, shards=2))
        sale, order_no = await _sold_out_then_back_and_resold(p, q, sku)
        await until(lambda: p.sold_out.answers(sale, 7), most=2000)  # P answers from memory now
        await _back_and_resold(q, sku, order_no)
        await p.sold_out.refresh(p.sales.cached)  # one watch of P, after all that
        resent = await p.purchases.buy(3, sku, "key-u3-00000001", 1)
        assert resent.status == 409 and resent.body["original"]["status"] == 200, \
            f"u3's key holds a 200, P said {resent.status} {resent.body}"
    finally:
        await p.close()
        await q.close()


async def test_learning_a_sold_out_sale_while_units_come_back_misses_no_buyer(
        backend: Backend, sku: str) -> None:
    """Fast path (invariant 3): while P loads the users who must still go to Redis, units
    come back, are bought and the sale sells out again. P must not keep a list without
    that buyer."""
    settings = backend.settings(key_mode="client")
    p, q = Gateway.build(settings), Gateway.build(settings)
    try:
        await p.store.create_sale(Sale(sku, 1, shards=2))
        first = await q.purchases.buy(0, sku, "key-u0-00000001", 1)
        assert first.status == 200, first.body
        load_users = p.store.touched_users
        interleaved = False

        async def touched_then_return(sale: Sale) -> set[int]:
            nonlocal interleaved
            users = await load_users(sale)
            if not interleaved:
                interleaved = True
                await _back_and_resold(q, sku, first.body["order_no"])
            return users

        p.store.touched_users = touched_then_return  # type: ignore[method-assign]
        out = await p.purchases.buy(1, sku, "key-u1-00000001", 1)
        assert out.status == 410, out.body
        await until(lambda: interleaved and not p.sold_out._learning, most=2000)
        resent = await p.purchases.buy(3, sku, "key-u3-00000001", 1)
        assert resent.status == 409 and resent.body["original"]["status"] == 200, \
            f"u3's key holds a 200, P said {resent.status} {resent.body}"
    finally:
        await p.close()
        await q.close()


async def test_a_key_used_on_another_sale_meets_the_fast_path_but_never_buys_twice(
        backend: Backend) -> None:
    """Invariant 8 with the fast path: a key that bought on sale A is sent to sale B
    (another shard count), which this process knows to be sold out: the answer is 410
    from memory, nothing is recorded; once units come back to B the key answers 422."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        a, b = new_sku(), new_sku()
        await gw.store.create_sale(Sale(a, 5, shards=16))
        await gw.store.create_sale(Sale(b, 1, shards=4))
        user, key = 13, "key-reused-0001"
        assert (await gw.purchases.buy(user, a, key, 1)).status == 200
        bought = await gw.purchases.buy(2, b, "key-u2-00000001", 1)
        assert bought.status == 200
        assert (await gw.purchases.buy(6, b, "key-u6-00000001", 1)).status == 410
        sale_b = await gw.store.get_sale(b)
        assert sale_b is not None
        await until(lambda: gw.sold_out.answers(sale_b, user), most=2000)
        assert (await gw.purchases.buy(user, b, key, 1)).status == 410  # from memory
        order = await gw.store.get_order(bought.body["order_no"])
        assert order is not None
        await gw.returns.release(order, "cancelled")
        with pytest.raises(ApiError) as again:
            await gw.purchases.buy(user, b, key, 1)
        assert (again.value.status, again.value.code) == (422, "IDEMPOTENCY_KEY_REUSED")
        assert (await read_sale(gw.store, sale_b)).sold == 0
    finally:
        await gw.close()


# == 2. one key, one purchase, over time ========================================================

async def test_a_key_bound_for_another_shard_count_stays_bound_while_its_outcome_lives(
        backend: Backend) -> None:
    """Invariant 8. User 13 on a 4-shard sale: the key is bound in slot 13 (claim_key), its
    outcome kept in slot 1. A first send bound the key and ended before its purchase ran
    (a 503); the client sends it again 250 s later and buys. While that outcome is stored,
    the key must not buy on a 16-shard sale (whose purchase reads only slot 13)."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        x, y = new_sku(), new_sku()
        await gw.store.create_sale(Sale(x, 5, shards=4))
        await gw.store.create_sale(Sale(y, 5, shards=16))
        sale_x = await gw.store.get_sale(x)
        assert sale_x is not None
        user, key = 13, "key-late-resend-1"
        binding = gw.store.keys.key_record(user, key)
        outcome = gw.store.keys.shard(x, 1).idempotency(user, key)
        assert await gw.store.bind_key(user, key, sale_x, 1)  # the first send
        await _age(gw.store, [binding], 250_000)
        assert (await gw.purchases.buy(user, x, key, 1)).status == 200  # the resend
        # Time passes: the outcome has one second left.
        await _age(gw.store, [binding, outcome], await gw.store.client.pttl(outcome) - 1000)
        assert await gw.store.client.exists(outcome)
        try:
            other = await gw.purchases.buy(user, y, key, 1)
        except ApiError as refused:
            assert (refused.status, refused.code) == (422, "IDEMPOTENCY_KEY_REUSED")
        else:
            raise AssertionError(f"one key bought on two sales: {other.status} {other.body}")
    finally:
        await gw.close()


async def test_concurrent_resends_of_one_key_through_two_processes_admit_once(
        backend: Backend, sku: str) -> None:
    """Invariant 3: one key sent 20 times at once through each of two processes, on a
    sale whose buyer's shard is empty (every send needs a move): one order, every 200 or
    conflict names it."""
    settings = backend.settings(key_mode="client")
    p, q = Gateway.build(settings), Gateway.build(settings)
    try:
        await p.store.create_sale(Sale(sku, 4, shards=8))  # shards 0, 2, 4, 6 hold a unit
        user, key = 13, "key-crowd-000001"  # shard 5: empty
        answers = await asyncio.gather(*(gw.purchases.buy(user, sku, key, 1)
                                         for gw in (p, q) for _ in range(20)),
                                       return_exceptions=True)
        # A send that met a Redis failure (a 503 over HTTP) tells nothing; every other
        # answer, and one more send afterwards, must name the same single order.
        assert all(is_redis_failure(a) for a in answers if isinstance(a, BaseException)), answers
        results = [a for a in answers if not isinstance(a, BaseException)]
        results.append(await p.purchases.buy(user, sku, key, 1))
        orders = {r.body["order_no"] for r in results if r.status == 200}
        orders |= {r.body["original"]["body"]["order_no"] for r in results
                   if r.status == 409 and r.body.get("original")}
        assert len(orders) == 1, results
        sale = await p.store.get_sale(sku)
        assert sale is not None
        assert (await _conserved(p.store, sale)).sold == 1
    finally:
        await p.close()
        await q.close()


# == 3. a released order is never delivered afterwards ============================================

async def test_an_order_released_while_its_delivery_is_retried_is_not_delivered(
        backend: Backend, sku: str) -> None:
    """Contract (release): the endpoint answers 503, the relay retries; meanwhile the order
    is released (its units are back on sale). The next retry must not deliver it."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        await gw.store.create_sale(Sale(sku, 2, shards=1))
        bought = await gw.purchases.buy(0, sku, "key-00000000001", 1)
        assert bought.status == 200
        order_no = bought.body["order_no"]
        async with _Endpoint(503) as endpoint:
            async with running_relay(settings, endpoint.url):
                await endpoint.on_post.wait()
                order = await gw.store.get_order(order_no)
                assert order is not None
                assert (await gw.returns.release(order, "cancelled")).returned == 1
                endpoint.status = 201

                async def drained() -> bool:
                    return await backlog(gw, 1) == 0
                await eventually(drained, "the relay has handled the entry", timeout=30)
            assert order_no not in endpoint.accepted, "a released order was delivered"
        final = await gw.store.get_order(order_no)
        assert final is not None and final.status == "released"
    finally:
        await gw.close()


async def test_an_order_released_while_delivery_is_paused_is_not_delivered_on_resume(
        backend: Backend, sku: str) -> None:
    """Contract (release) with the breaker: the endpoint refuses the relay's credentials
    (401: delivery pauses, nothing given back); the order is released; the endpoint is
    fixed. The probe and the resumed delivery must not deliver the released order."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        await gw.store.create_sale(Sale(sku, 2, shards=1))
        bought = await gw.purchases.buy(0, sku, "key-00000000001", 1)
        assert bought.status == 200
        order_no = bought.body["order_no"]
        async with _Endpoint(401) as endpoint:
            async with running_relay(settings, endpoint.url, probe_every=0.05) as relay:
                await endpoint.on_post.wait()
                await until(lambda: relay.breaker.paused, most=2000)
                order = await gw.store.get_order(order_no)
                assert order is not None
                assert (await gw.returns.release(order, "expired")).returned == 1
                endpoint.status = 201

                async def drained() -> bool:
                    return await backlog(gw, 1) == 0
                await eventually(drained, "the relay has handled the entry", timeout=30)
            assert order_no not in endpoint.accepted, "a released order was delivered"
        assert (await read_sale(gw.store, await gw.store.get_sale(sku))).remaining == 2  # type: ignore[arg-type]
    finally:
        await gw.close()


async def test_the_breaker_opening_and_closing_loses_no_admitted_purchase(
        backend: Backend, sku: str) -> None:
    """Invariant 5 with the breaker: the endpoint refuses every order (404) until fixed;
    delivery pauses after 3 refusals in a row; once fixed, a probe resumes delivery. Every
    200 ends delivered (accepted by the endpoint) or rejected with its units back."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        await gw.store.create_sale(Sale(sku, 10, shards=2))
        orders = []
        for user in range(8):
            outcome = await gw.purchases.buy(user, sku, f"key-{user:012d}", 1)
            assert outcome.status == 200
            orders.append(outcome.body["order_no"])
        async with _Endpoint(404) as endpoint:
            async with running_relay(settings, endpoint.url, pause_after=3, probe_every=0.05,
                                     concurrency=1) as relay:
                await until(lambda: relay.breaker.paused, most=2000)
                endpoint.status = 201

                async def drained() -> bool:
                    return await backlog(gw, 2) == 0
                await eventually(drained, "every entry is handled", timeout=30)
                assert not relay.breaker.paused
        found = {no: await gw.store.get_order(no) for no in orders}
        status = {no: o.status if o else "missing" for no, o in found.items()}
        rejected = [no for no, s in status.items() if s == "rejected"]
        assert set(status.values()) <= {"delivered", "rejected"}, status
        assert 0 < len(rejected) < 3, status  # refused before the pause; the 3rd waited
        assert {no for no, s in status.items() if s == "delivered"} <= set(endpoint.accepted)
        sale = await gw.store.get_sale(sku)
        assert sale is not None
        snap = await _conserved(gw.store, sale)
        assert snap.remaining == 2 + len(rejected), (snap, status)
    finally:
        await gw.close()


# == 4. every script resent with the same arguments ===============================================

async def test_a_purchase_script_run_twice_admits_once(backend: Backend, sku: str) -> None:
    """redis-py resends a call whose reply was late: purchase.lua twice with the same
    arguments (same order number) takes one unit, writes one stream entry."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 3, shards=1))
        assert sale is not None
        sk = gw.store.keys.shard(sku, 0)
        request = purchase_script.Request(
            user_id=7, sku=sku, quantity=1, order_no="0-" + uuid.uuid4().hex, now_ms=1,
            outcome_ttl=300, shards=1, generation=sale.generation, short_outcome="")
        idem = sk.idempotency(7, "key-twice-00001")
        one = await purchase_script.run(gw.store.client, sk, idem, request)
        two = await purchase_script.run(gw.store.client, sk, idem, request)
        assert one.code is purchase_script.Code.OK
        assert two.code is purchase_script.Code.DUPLICATE and two.same_attempt
        assert (two.order_no, two.units) == (one.order_no, one.units)
        assert await gw.store.client.xlen(sk.stream) == 1
        assert (await _conserved(gw.store, sale)).sold == 1
    finally:
        await gw.close()


async def test_each_step_of_a_move_run_twice_and_late_moves_units_once(backend: Backend,
                                                                        sku: str) -> None:
    """Every step of a move twice, and step 1 and 2 again after step 3 (a resend that
    arrives late): units conserved, none twice in the free lists."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 8, shards=2))
        assert sale is not None
        store, tid = gw.store, uuid.uuid4().hex
        first = await store.transfer_out(sale, 0, 1, 3, tid)
        assert await store.transfer_out(sale, 0, 1, 3, tid) == first
        assert first is not None and first[0] == 3
        move = Transfer(tid, 0, 1, first[1], first[0], 0)
        assert await store.transfer_in(sale, move) is transfer_script.Applied.APPLIED
        assert await store.transfer_in(sale, move) is transfer_script.Applied.ALREADY_APPLIED
        await store.transfer_done(sale, move)
        await store.transfer_done(sale, move)
        assert await store.transfer_out(sale, 0, 1, 3, tid) == first  # late, after step 3
        assert await store.transfer_in(sale, move) is transfer_script.Applied.ALREADY_APPLIED
        snap = await _conserved(store, sale)
        assert [s.remaining for s in snap.states] == [1, 7], snap
        units: list[int] = []
        for shard in (0, 1):
            for rng in await store.client.lrange(store.keys.shard(sku, shard).units, 0, -1):
                lo, hi = map(int, rng.split("-"))
                units += range(lo, hi + 1)
        assert sorted(units) == list(range(1, 9)), units
    finally:
        await gw.close()


async def test_compensate_and_mark_delivered_run_twice_count_once(backend: Backend,
                                                                  sku: str) -> None:
    """compensate.lua (release) twice, a rejection after it, mark_delivered twice on another
    order, a release of that delivered order twice: each unit back once, buyers freed once."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 4, per_user_limit=2, shards=1))
        assert sale is not None
        one = await gw.purchases.buy(0, sku, "key-00000000001", 2)
        two = await gw.purchases.buy(1, sku, "key-00000000002", 1)
        assert one.status == two.status == 200
        a = await gw.store.get_order(one.body["order_no"])
        b = await gw.store.get_order(two.body["order_no"])
        assert a is not None and b is not None
        store = gw.store
        r1 = await store.compensate(a, "cancelled", status="released")
        r2 = await store.compensate(a, "cancelled", status="released")
        assert (r1.outcome, r1.returned) == (compensate_script.Compensated.DONE, 2)
        assert r2.outcome is compensate_script.Compensated.ALREADY
        assert (await store.compensate(a, "refused")).outcome is compensate_script.Compensated.ALREADY
        assert await store.mark_delivered(b) is mark_delivered_script.Delivered.MARKED
        assert await store.mark_delivered(b) is mark_delivered_script.Delivered.UNCHANGED
        assert (await store.compensate(b, "expired", status="released")).returned == 1
        assert (await store.compensate(b, "expired", status="released")).returned == 0
        assert await store.mark_delivered(b) is mark_delivered_script.Delivered.UNCHANGED
        snap = await _conserved(store, sale)
        assert (snap.remaining, snap.sold, snap.released) == (4, 0, 3), snap
        assert await store.client.hgetall(store.keys.shard(sku, 0).buyers) == {}
        # The units can be sold again, each once.
        again = [await gw.purchases.buy(u, sku, f"key-again-{u:04d}", 1) for u in range(10, 15)]
        assert [r.status for r in again].count(200) == 4
        sold = sorted(u for r in again if r.status == 200 for u in r.body["units"])
        assert sold == [1, 2, 3, 4], sold
    finally:
        await gw.close()


async def test_sale_scripts_and_sold_out_marks_run_twice_change_nothing_more(
        backend: Backend, sku: str) -> None:
    """claim_sale, create_shard, sale_state, claim_key, count_return and mark_sold_out,
    each twice with the same arguments: the second run changes nothing (one shard, its
    units once; the key bound once; no return left announced)."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        store, keys = gw.store, gw.store.keys
        fresh = Sale(sku, 6, shards=2, generation="g" + uuid.uuid4().hex[:8], created_at=1)
        c1 = await sale_scripts.claim(store.client, keys.sale(sku), fresh, 1, 10_000)
        c2 = await sale_scripts.claim(store.client, keys.sale(sku), fresh, 1, 10_000)
        assert (c1.claim, c2.claim) == (sale_scripts.Claim.CLAIMED, sale_scripts.Claim.RESUME)
        for shard in (0, 1):
            sk = keys.shard(sku, shard)
            assert await sale_scripts.create_shard(store.client, sk, fresh) is sale_scripts.Shard.CREATED
            assert await sale_scripts.create_shard(store.client, sk, fresh) is sale_scripts.Shard.EXISTED
        for _ in range(2):
            assert await sale_scripts.set_state(store.client, keys.sale(sku), fresh.generation, "ready")
        snap = await _conserved(store, fresh)
        assert [s.remaining for s in snap.states] == [3, 3]
        fp = purchase_script.fingerprint(sku, 1, fresh.generation)
        record = keys.key_record(5, "key-bound-twice")
        assert await purchase_script.bind_key(store.client, record, fp, 300)
        assert await purchase_script.bind_key(store.client, record, fp, 300)
        assert not await purchase_script.bind_key(store.client, record, fp + "x", 300)
        for step in ("begin", "begin", "end"):
            await sold_out_script.count_return(store.client, keys.sale(sku), step, "0-x",
                                               fresh.generation, 1)
        registry = await store.client.hgetall(keys.sale(sku))
        assert not [f for f in registry if f.startswith("returning:")], registry
        seen = await store.sold_out_state(fresh)
        assert await store.mark_sold_out(fresh, seen)
        assert await store.mark_sold_out(fresh, seen)
        assert (await store.sold_out_state(fresh)).sold_out
    finally:
        await gw.close()


async def test_closing_a_shard_twice_and_a_late_create_leave_the_sale_deleted(
        backend: Backend, sku: str) -> None:
    """A delete's close_shard resent, then the creator's create_shard resent late: the
    shard stays closed (no sale comes back), nothing can be bought."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 4, shards=2))
        assert sale is not None
        assert (await gw.purchases.buy(0, sku, "key-00000000001", 1)).status == 200
        sk = gw.store.keys.shard(sku, 0)
        first = await sale_scripts.close_shard(gw.store.client, sk, sale.generation, 20_000)
        second = await sale_scripts.close_shard(gw.store.client, sk, sale.generation, 20_000)
        assert first == second and first is not None and len(first) == 1
        assert await sale_scripts.create_shard(gw.store.client, sk, sale) is sale_scripts.Shard.CLOSED
        await gw.store.delete_sale(sale)
        assert await gw.store.get_sale(sku) is None
        gw.forget_sale(sku)
        with pytest.raises(ApiError) as refused:
            await gw.purchases.buy(2, sku, "key-00000000002", 1)
        assert refused.value.status == 404
    finally:
        await gw.close()


# == 5. the sale's window ==========================================================================

def test_the_window_edges_in_memory_are_half_open() -> None:
    """``starts_at`` is open, ``ends_at`` is closed (a purchase at exactly ``ends_at`` is
    refused): the same rule as the purchase script's."""
    sale = Sale("s", 1, starts_at=1_000, ends_at=2_000)
    early = outside(sale, 999)
    assert early is not None and early.body["code"] == "SALE_NOT_STARTED"
    assert outside(sale, 1_000) is None
    assert outside(sale, 1_999) is None
    refused = outside(sale, 2_000)
    assert refused is not None and refused.body["code"] == "SALE_ENDED"


async def test_a_purchase_at_exactly_ends_at_on_redis_is_refused_and_records_nothing(
        backend: Backend, sku: str) -> None:
    """The purchase script at or after ``ends_at`` by Redis's clock (the process's memory
    still says open): 410 SALE_ENDED, no unit taken, the key not recorded."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 3, shards=1))
        assert sale is not None
        sk = gw.store.keys.shard(sku, 0)
        seconds, micros = await gw.store.client.time()
        await gw.store.client.hset(sk.stock, "ends_at", seconds * 1000 + micros // 1000)
        refused = await gw.purchases.buy(0, sku, "key-at-the-end1", 1)  # returned, not raised
        assert (refused.status, refused.body["code"]) == (410, "SALE_ENDED")
        assert not await gw.store.client.exists(sk.idempotency(0, "key-at-the-end1"))
        assert (await _conserved(gw.store, sale)).sold == 0
    finally:
        await gw.close()


async def test_a_release_after_the_end_gives_units_back_and_nothing_sells(
        backend: Backend, sku: str) -> None:
    """An order released after the sale ended: 200, its units back in the sale once; a
    purchase then answers 410 SALE_ENDED and takes nothing."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 2, shards=2, ends_at="2099-01-01T00:00:00Z")
        status, body, _ = await api.buy(sku, 0, "key-00000000001")
        assert status == 200, body
        gw = api.gateway
        sale = await gw.store.get_sale(sku)
        assert sale is not None
        ended = 1_000  # long ago: the sale is over
        await gw.store.client.hset(gw.store.keys.sale(sku), "ends_at", ended)
        for shard in range(2):
            await gw.store.client.hset(gw.store.keys.shard(sku, shard).stock, "ends_at", ended)
        gw.forget_sale(sku)
        url = f"/admin/orders/{body['order_no']}/release"
        for _ in range(2):
            resp = await api.client.post(url, json={"reason": "expired"}, headers=api.admin)
            assert resp.status == 200, await resp.text()
        status, late, _ = await api.buy(sku, 1, "key-00000000002")
        assert (status, late["code"]) == (410, "SALE_ENDED"), late
        snap = await _conserved(gw.store, sale)
        assert (snap.remaining, snap.sold, snap.released) == (2, 0, 1), snap



# == 6. more: stale moves, crashed moves, racing returns, a deleted sale's orders =================

async def test_a_move_of_a_deleted_sale_resent_into_its_successor_moves_nothing(
        backend: Backend, sku: str) -> None:
    """Resent steps 1 and 2 of a move (same id) that arrive after the sale was deleted and
    created again with the same shards: the new sale loses and gains no unit."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        old = await gw.store.create_sale(Sale(sku, 6, shards=2))
        assert old is not None
        tid = uuid.uuid4().hex
        out = await gw.store.transfer_out(old, 0, 1, 2, tid)
        assert out is not None and out[0] == 2
        await gw.store.delete_sale(old)
        new = await gw.store.create_sale(Sale(sku, 6, shards=2))
        assert new is not None and new.generation != old.generation
        assert await gw.store.transfer_out(old, 0, 1, 2, tid) is None
        move = Transfer(tid, 0, 1, out[1], out[0], 0)
        assert await gw.store.transfer_in(old, move) is transfer_script.Applied.NO_SHARD
        snap = await _conserved(gw.store, new)
        assert [s.remaining for s in snap.states] == [3, 3], snap
    finally:
        await gw.close()


async def test_units_held_by_moves_a_crash_left_half_done_are_sold_not_sold_out(
        backend: Backend, sku: str) -> None:
    """No false SOLD_OUT with moves in flight: every unit of the sale sits in transfer
    records whose mover died before step 2. Buyers in both shards get 200, the last
    buyer 410; nothing is lost."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 2, shards=2))
        assert sale is not None
        assert (await gw.store.transfer_out(sale, 0, 1, 1, uuid.uuid4().hex))[0] == 1  # type: ignore[index]
        assert (await gw.store.transfer_out(sale, 1, 0, 1, uuid.uuid4().hex))[0] == 1  # type: ignore[index]
        assert [s.remaining for s in await gw.store.shard_states(sale)] == [0, 0]
        first = await gw.purchases.buy(0, sku, "key-00000000001", 1)
        second = await gw.purchases.buy(1, sku, "key-00000000002", 1)
        assert (first.status, second.status) == (200, 200), (first.body, second.body)
        last = await gw.purchases.buy(3, sku, "key-00000000003", 1)
        assert last.status == 410, last.body
        assert sorted(first.body["units"] + second.body["units"]) == [1, 2]
        snap = await _conserved(gw.store, sale)
        assert (snap.sold, snap.remaining, snap.in_transfer) == (2, 0, 0), snap
    finally:
        await gw.close()


async def test_a_rejection_and_a_release_of_one_order_at_once_return_its_units_once(
        backend: Backend, sku: str) -> None:
    """The relay's rejection and an admin release of the same order, each sent three
    times, all at once: its units come back once and are sold again once."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 3, per_user_limit=2, shards=2))
        assert sale is not None
        bought = await gw.purchases.buy(0, sku, "key-00000000001", 2)
        assert bought.status == 200
        order = await gw.store.get_order(bought.body["order_no"])
        assert order is not None
        results = await asyncio.gather(*(
            [gw.returns.reject(order, "refused") for _ in range(3)]
            + [gw.returns.release(order, "cancelled") for _ in range(3)]))
        done = [r for r in results
                if (r if isinstance(r, compensate_script.Compensated) else r.outcome)
                is compensate_script.Compensated.DONE]
        assert len(done) == 1, results
        snap = await _conserved(gw.store, sale)
        assert (snap.remaining, snap.sold) == (3, 0), snap
        again = [await gw.purchases.buy(u, sku, f"key-again-{u:04d}", 1) for u in range(10, 14)]
        assert [r.status for r in again] == [200, 200, 200, 410], [r.body for r in again]
    finally:
        await gw.close()


async def test_a_release_of_an_order_of_a_deleted_sale_gives_nothing_to_its_successor(
        backend: Backend, sku: str) -> None:
    """The orders service releases an order whose sale was deleted and created again:
    404 (unknown order), and the new sale gains no unit."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 2, shards=2)
        status, body, _ = await api.buy(sku, 0, "key-00000000001")
        assert status == 200, body
        resp = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
        assert resp.status == 204
        await api.create_sale(sku, 2, shards=2)
        url = f"/admin/orders/{body['order_no']}/release"
        resp = await api.client.post(url, json={"reason": "expired"}, headers=api.admin)
        assert resp.status == 404, await resp.text()
        state = await api.sale(sku)
        assert (state["remaining"], state["sold"]) == (2, 0), state


async def test_a_purchase_refused_before_the_start_by_redis_leaves_the_key_usable(
        backend: Backend, sku: str) -> None:
    """The process's clock says the sale has started, Redis's clock says not yet (a 4-shard
    sale: the key is bound in its own slot first): 403 SALE_NOT_STARTED, nothing recorded,
    and the same request with the same key buys once the sale is open."""
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        sale = await gw.store.create_sale(Sale(sku, 4, shards=4))
        assert sale is not None
        user, key = 13, "key-too-early-01"
        stock = gw.store.keys.shard(sku, user % 4).stock
        await gw.store.client.hset(stock, "starts_at", 4_000_000_000_000)  # Redis: not yet
        early = await gw.purchases.buy(user, sku, key, 1)  # returned, not raised
        assert (early.status, early.body["code"]) == (403, "SALE_NOT_STARTED")
        assert (await _conserved(gw.store, sale)).sold == 0
        await gw.store.client.hset(stock, "starts_at", 0)  # open
        bought = await gw.purchases.buy(user, sku, key, 1)
        assert bought.status == 200, bought.body
    finally:
        await gw.close()
