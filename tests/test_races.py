"""Correct under resends, slow Redis and races: one regression test per defect found by
a review of the purchase, move, compensation and creation paths (each failed before its
fix), on standalone Redis and on Cluster.

A "resend" is what redis-py does after a socket timeout or a lost connection: it sends
the same command again, although the first one may have run. Every script must give
the same result when run twice.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio.cluster import RedisCluster

from devtools.faultproxy import Predicate
from gateway.admission.moves import Refill
from gateway.admission.snapshot import read_sale
from gateway.app import Gateway
from gateway.models import Sale, Transfer
from gateway.store.connection import connect
from gateway.store.keys import KeySpace
from gateway.store.scripts import transfer
from gateway.store.store import Store
from tests.support.api import Backend, serve
from tests.support.faults import Proxied
from tests.support.steps import until


def _store(backend: Backend, **settings: object) -> Store:
    s = backend.settings(**settings)
    return Store(connect(s), KeySpace(s.key_prefix))


def _evalsha_of(sha: str) -> Predicate:
    def match(args: list[bytes]) -> bool:
        return len(args) > 1 and args[0].upper() == b"EVALSHA" and args[1] == sha.encode()
    return match


async def _created(store: Store, sku: str, stock: int, shards: int, **fields: int) -> Sale:
    assert await store.create_sale(Sale(sku, stock, shards=shards, **fields))
    sale = await store.get_sale(sku)
    assert sale is not None
    return sale


async def _conserved(store: Store, sale: Sale) -> None:
    """Every unit is free in a shard, sold, or in a recorded move: nothing lost or doubled."""
    snap = await read_sale(store, sale)
    assert snap.consistent
    assert snap.remaining + snap.sold + snap.in_transfer == sale.stock, snap


# -- 1. a resent transfer_out -----------------------------------------------------------------

async def test_transfer_out_sent_twice_moves_its_units_once(backend: Backend, sku: str) -> None:
    store = _store(backend)
    try:
        sale = await _created(store, sku, 100, 4)
        move_id = uuid.uuid4().hex
        first = await store.transfer_out(sale, 0, 1, 10, move_id)
        assert first is not None and first[0] == 10
        # What redis-py does when the first reply was late: the same command again.
        assert await store.transfer_out(sale, 0, 1, 10, move_id) == first
        assert (await store.shard_states(sale, [0]))[0].remaining == 15
        await _conserved(store, sale)
        move = Transfer(move_id, 0, 1, first[1], first[0], 0)
        await store.transfer_in(sale, move)
        await store.transfer_done(sale, move)
        # A resend that arrives after the move was finished takes nothing either.
        assert await store.transfer_out(sale, 0, 1, 10, move_id) == first
        assert [s.remaining for s in await store.shard_states(sale)] == [15, 35, 25, 25]
        await _conserved(store, sale)
    finally:
        await store.close()


async def test_a_transfer_out_resent_after_a_timeout_loses_no_unit(proxied: Proxied, sku: str) -> None:
    """Reproduced with a reply held past the client's socket timeout: the client resends
    the call (standalone too: its retry policy must be the asyncio one to be used)."""
    store = _store(proxied.backend, redis_timeout=0.3)
    try:
        sale = await _created(store, sku, 100, 4)
        donor = store.keys.shard(sku, 0)
        await store.client.script_load(transfer.OUT.source)  # the late reply is a real run
        proxied.proxy_for_key(donor.stock).delay_reply_to(_evalsha_of(transfer.OUT.sha), 0.6)
        move_id = uuid.uuid4().hex
        moved = await store.transfer_out(sale, 0, 1, 10, move_id)
        assert moved is not None and moved[0] == 10
        assert (await store.shard_states(sale, [0]))[0].remaining == 15
        await _conserved(store, sale)
    finally:
        proxied.clear()
        await store.close()


# -- 2. a half-created sale ------------------------------------------------------------------

async def test_a_put_cut_by_its_deadline_is_finished_by_the_next(backend: Backend, sku: str) -> None:
    body = {"stock": 2048, "shards": 1024}
    settings = backend.settings(key_mode="client")
    async with serve(settings.replace(request_timeout=0.05)) as api:
        resp = await api.client.put(f"/admin/sales/{sku}", json=body, headers=api.admin)
        assert resp.status in (201, 503), await resp.text()
    async with serve(settings) as api:
        resp = await api.client.put(f"/admin/sales/{sku}", json=body, headers=api.admin)
        assert resp.status in (201, 409), await resp.text()
        if resp.status == 409:  # the first PUT did finish (in the background): it is complete
            assert (await resp.json())["code"] == "SALE_EXISTS"
        view = await api.sale(sku)
        assert (view["stock"], view["remaining"], len(view["shards"])) == (2048, 2048, 1024)
        # A buyer of every shard buys; every shard's stream is read by the relay.
        results = await asyncio.gather(*(api.gateway.purchases.buy(u, sku, f"key-{u:010d}", 1)
                                         for u in range(1024)))
        assert {r.status for r in results} == {200}
        streams = await api.gateway.store.relay_shards()
        assert streams >= 1024


async def test_a_crashed_put_is_finished_or_undone_by_the_next(backend: Backend, sku: str) -> None:
    store = _store(backend)
    try:
        # A creator that died after a third of the shards: claimed, never finished.
        sale = Sale(sku, 90, shards=9)
        claimed = await store.begin_sale(sale)
        for shard in range(3):
            await store.create_shard(claimed, shard)
        assert await store.get_sale(sku) is None  # not for sale while half made
        # The same PUT again finishes it.
        assert await store.create_sale(Sale(sku, 90, shards=9))
        snap = await read_sale(store, await store.get_sale(sku))  # type: ignore[arg-type]
        assert (snap.remaining, len(snap.states)) == (90, 9)
        assert not await store.create_sale(Sale(sku, 90, shards=9))  # now it exists

        # Another half-made sale, then a PUT with other parameters: refused while its
        # creator may still be at work (its lease), then undone and made anew.
        store.creation_lease_ms = 300
        other = f"{sku}-b"
        claimed = await store.begin_sale(Sale(other, 40, shards=8))
        for shard in range(5):
            await store.create_shard(claimed, shard)
        assert not await store.create_sale(Sale(other, 12, shards=3))
        await asyncio.sleep(0.4)  # the lease is over: its creator is taken to be dead
        assert await store.create_sale(Sale(other, 12, shards=3))
        snap = await read_sale(store, await store.get_sale(other))  # type: ignore[arg-type]
        assert (snap.remaining, [s.remaining for s in snap.states]) == (12, [4, 4, 4])
        stray = [await store.client.exists(store.keys.shard(other, s).stock) for s in range(3, 8)]
        assert stray == [0] * 5, "shards of the undone sale are left"
    finally:
        await store.close()


# -- 3. one key, one purchase, across shard counts ---------------------------------------------

@pytest.mark.parametrize("key_mode", ["token", "client"])
async def test_a_key_buys_once_across_sales_of_any_shard_count(backend: Backend, key_mode: str) -> None:
    async with serve(backend.settings(key_mode=key_mode)) as api:
        a, b, c = (f"sku-{uuid.uuid4().hex[:6]}" for _ in range(3))
        await api.create_sale(a, 10, shards=16)
        await api.create_sale(c, 10, shards=16)
        await api.create_sale(b, 10, shards=4)
        for first, then in ((a, [c, b]), (b, [a, c])):
            user = 5 if first == a else 21  # 5 % 16 != 5 % 4; 21 % 4 == 1 != 21 % 16
            key = await api.token(user) if key_mode == "token" else f"k-{uuid.uuid4().hex}"
            status, body, _ = await api.buy(first, user, key)
            assert status == 200, body
            for other in then:
                status, body, _ = await api.buy(other, user, key)
                assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), (other, body)
            status, body, _ = await api.buy(first, user, key)
            assert (status, body["code"]) == (409, "IDEMPOTENT_CONFLICT"), body
        assert [(await api.sale(s))["sold"] for s in (a, b, c)] == [1, 1, 0]


# -- 4. a sold-out flag must not outlive units given back ---------------------------------------

async def test_units_given_back_during_a_sold_out_check_are_sold(backend: Backend, sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:
        gw = api.gateway
        await api.create_sale(sku, 2, shards=2)
        bought = [await gw.purchases.buy(u, sku, f"key-{u:010d}", 1) for u in (0, 1)]
        assert [o.status for o in bought] == [200, 200]
        sale = await gw.sales.get(sku)
        assert sale is not None
        # A buyer's sold-out check: what it knew of the sale before its consistent read
        # of every shard, and that read, which finds nothing...
        refill, seen = await gw.rebalancer.refill(sale, 0, 1)
        assert refill is Refill.SOLD_OUT and not seen.sold_out
        # ...and, before it records that, a refused delivery gives a unit back.
        order = await gw.store.get_order(bought[0].body["order_no"])
        assert order is not None
        await gw.returns.reject(order, "refused")
        await gw.sold_out.confirm(sale, seen)  # too late: units came back since `seen`
        gw.sold_out.forget(sku)  # and not only until this process's memory expires
        again = await gw.purchases.buy(7, sku, f"key-{7:010d}", 1)
        assert (again.status, again.body["code"]) == (200, "OK"), again.body


# -- 5. buyers waiting on a shared refill always get an answer ----------------------------------

async def test_waiters_of_a_refill_whose_owner_is_cancelled_get_an_answer(proxied: Proxied,
                                                                          sku: str) -> None:
    gw = Gateway.build(proxied.backend.settings(key_mode="client", redis_timeout=3.0))
    try:
        await gw.store.create_sale(Sale(sku, 16, shards=16))
        assert (await gw.purchases.buy(0, sku, f"key-{0:010d}", 1)).status == 200  # shard 0 empty
        await gw.store.client.script_load(transfer.OUT.source)
        for proxy in proxied.proxies:  # a slow move: the refill takes a while
            proxy.delay_reply_to(_evalsha_of(transfer.OUT.sha), 0.8)
        owner = asyncio.create_task(gw.purchases.buy(16, sku, f"key-{16:010d}", 1))
        await until(lambda: gw.rebalancer.refilling(sku, 0) >= 1, owner)
        waiter = asyncio.create_task(gw.purchases.buy(32, sku, f"key-{32:010d}", 1))
        await until(lambda: gw.rebalancer.refilling(sku, 0) >= 2, owner, waiter)
        owner.cancel()  # e.g. its client went away
        outcome = await waiter  # not a CancelledError: an answer
        assert outcome.status == 200, outcome.body
    finally:
        proxied.clear()
        await gw.close()


# -- 6. the standalone client retries -------------------------------------------------------------

async def test_the_redis_client_resends_a_call_whose_reply_was_lost(proxied: Proxied) -> None:
    """redis-py resends after a timeout only if given an asyncio retry policy; the
    standalone client was given the synchronous one, so it never retried (and a resend
    is safe only because every script is)."""
    settings = proxied.backend.settings(redis_timeout=0.3)
    client = connect(settings)
    key = f"{{{settings.key_prefix}:0}}:probe"
    try:
        proxied.proxy_for_key(key).delay_reply_to("INCRBY", 0.6)
        await client.incr(key)  # answered: resent once, not an error
        assert int(await client.get(key)) == 2  # (and it ran twice: INCR is not a script)
    finally:
        proxied.clear()
        await client.aclose()


# -- 7. orders of a deleted sale --------------------------------------------------------------

async def test_an_order_of_a_deleted_sale_gives_nothing_to_the_next_sale(backend: Backend,
                                                                         sku: str) -> None:
    store = _store(backend)
    try:
        sale = await _created(store, sku, 4, 1)
        bought = await store.purchase(sale, 1, "key-0000000001", 1, 0)
        order = await store.get_order(bought.order_no)
        assert order is not None
        record = await store.client.hgetall(store.keys.order(bought.order_no, 0))
        await store.delete_sale(sale)
        # What a purchase racing the delete used to leave: its order record alone.
        await store.client.hset(store.keys.order(bought.order_no, 0), mapping=record)
        again = await _created(store, sku, 4, 1)
        # The endpoint refuses the old order: its unit belongs to no sale any more.
        await store.compensate(order, "refused")
        snap = await read_sale(store, again)
        assert (snap.remaining, snap.sold) == (4, 0)
        free = await store.client.lrange(store.keys.shard(sku, 0).units, 0, -1)
        assert free == ["1-4"], free
    finally:
        await store.close()


async def test_purchases_racing_a_delete_leave_no_order_behind(backend: Backend, sku: str) -> None:
    store = _store(backend, key_mode="client")
    try:
        sale = await _created(store, sku, 10_000, 4)

        async def buy(user: int) -> None:
            try:
                await store.purchase(sale, user, f"key-{user:010d}", 1, user % 4)
            except Exception:  # the sale may be gone under it: any answer will do
                pass

        buyers = [asyncio.create_task(buy(u)) for u in range(400)]
        await asyncio.sleep(0.01)
        await store.delete_sale(sale)
        await asyncio.gather(*buyers)
        left = []
        clients = (store.client.get_primaries() if isinstance(store.client, RedisCluster)
                   else [None])
        for node in clients:
            pattern = f"{{{store.keys.prefix}:*}}:order:*"
            if node is None:
                left += [k async for k in store.client.scan_iter(match=pattern)]
            else:
                left += await store.client.keys(pattern, target_nodes=node)
        # Orders admitted after the shards were closed cannot exist; those before are deleted.
        remaining = [k for k in left if await store.client.hget(k, "sku") == sku]
        assert remaining == [], remaining[:5]
    finally:
        await store.close()
