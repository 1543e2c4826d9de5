"""Adversarial review of the purchase, move, compensation/release and creation/deletion
paths (review of 078ea89), on real Redis (standalone and Cluster, some behind the fault
proxy).

Each test is one attack. A test that FAILS exposes a defect (its docstring names the
contract rule or invariant it breaks); a test that passes is an attack the gateway
defended, kept as a regression test. Interleavings that need a precise order are driven
step by step through the real store functions, as two processes would call them; the
fault proxy's delays only put events in order, no assertion depends on a duration.

Failing (defects), by section:
  1, 2   a key admitted twice: delete + re-create with another shard count; a sale
         re-created under a process's cached view (the key is never bound)
  5      false SOLD_OUT: a buyer joining a refill confirms it with a later counter; a
         sold-out mark between compensate.lua and the return's count
  6, 12  a 503 "nothing was admitted" for a purchase that was made (connection reset)
  7      a SKU stuck for good (PUT + DELETE at once; a creation taken over after its
         lease); a half-made sale sold by a process with a cached view
  7, 8   a DELETE answered 204 undone by the creator's lease renewal; a late sold-out
         mark re-creates a key of a deleted sale
  9      no release route (404); a released, undelivered order is still delivered
  10     shards of a primary lost for good never sell again (WAIT for a replica)
  11     a sale window: 500, and the key bound although "nothing is recorded"
  13     a SOLD_OUT from the shared flag is recorded; two identical PUTs both 201
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from devtools.faultproxy import Predicate
from gateway.admission.moves import Refill
from gateway.admission.snapshot import read_sale
from gateway.app import Gateway
from gateway.models import Sale
from gateway.store.connection import connect
from gateway.store.keys import KeySpace
from gateway.store.scripts import compensate as compensate_script
from gateway.store.scripts import purchase as purchase_script
from gateway.store.scripts import sales as sale_scripts
from gateway.store.store import SaleTaken, Store
from tests.support.api import Api, Backend, new_sku, serve
from tests.support.delivery import eventually, running_relay
from tests.support.faults import Proxied
from tests.support.steps import until

# -- helpers ------------------------------------------------------------------------------------


def _store(backend: Backend, settings: Any = None, **overrides: object) -> Store:
    s = settings or backend.settings(**overrides)
    return Store(connect(s), KeySpace(s.key_prefix))


def _evalsha_of(sha: str) -> Predicate:
    def match(args: list[bytes]) -> bool:
        return len(args) > 1 and args[0].upper() == b"EVALSHA" and args[1] == sha.encode()
    return match


def _nth(predicate: Predicate, n: int, seen: threading.Event | None = None) -> Predicate:
    """Matches only the ``n``-th command that ``predicate`` matches (the proxy runs the
    predicate in its own thread, once per command); sets ``seen`` when it does."""
    count = 0
    lock = threading.Lock()

    def match(args: list[bytes]) -> bool:
        nonlocal count
        if not predicate(args):
            return False
        with lock:
            count += 1
            hit = count == n
        if hit and seen is not None:
            seen.set()
        return hit
    return match


def _command_on(name: str, key: str) -> Predicate:
    def match(args: list[bytes]) -> bool:
        return len(args) > 1 and args[0].upper() == name.encode() and args[1] == key.encode()
    return match


async def _wait_event(event: threading.Event, *tasks: asyncio.Task[Any]) -> None:
    while not event.is_set():
        for task in tasks:
            if task.done():
                raise AssertionError(f"ended too early: {task.result()!r}")
        await asyncio.sleep(0.005)


async def _load_scripts(client: Any, *scripts: Any) -> None:
    """Load scripts up front, so that a call held by the proxy is a real run (not the
    NOSCRIPT before the load)."""
    for script in scripts:
        await client.script_load(script.source)


async def _conserved(store: Store, sale: Sale) -> None:
    snap = await read_sale(store, sale)
    assert snap.consistent
    assert snap.remaining + snap.sold + snap.in_transfer == sale.stock, snap


async def _all_keys(store: Store) -> list[str]:
    pattern = f"*{store.keys.prefix}*"
    if isinstance(store.client, RedisCluster):
        found: list[str] = []
        for node in store.client.get_primaries():
            found += await store.client.keys(pattern, target_nodes=node)
        return sorted(found)
    return sorted([k async for k in store.client.scan_iter(match=pattern)])


async def _left_of(store: Store, sku: str) -> list[str]:
    """Keys of the SKU left after a delete: the idempotency records are not per sale (they
    expire by themselves), and a closed shard's tombstone expires within twice the
    creation lease (it keeps a creator still at work from bringing the shard back)."""
    left = []
    for key in await _all_keys(store):
        if sku not in key or ":idem:" in key:
            continue
        if ":closed:" in key and 0 < await store.client.pttl(key) <= 2 * store.creation_lease_ms:
            continue
        left.append(key)
    return left


async def _delete_via_api(api: Api, sku: str) -> None:
    resp = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
    assert resp.status == 204, await resp.text()


# == 1. one key, one purchase: across a delete and re-create with another shard count ==========

@pytest.mark.parametrize("key_mode", ["client", "token"])
@pytest.mark.parametrize(("first", "then"), [(16, 16), (4, 4), (4, 16), (16, 4)])
async def test_a_key_buys_once_across_a_delete_and_recreate_of_the_sku(
        backend: Backend, sku: str, key_mode: str, first: int, then: int) -> None:
    """Invariant 8 / 3. User 5: 5 % 16 == 5, 5 % 4 == 1, so with 4 shards the key is bound
    in slot 5 (claim_key) and its outcome kept in slot 1; with 16 shards both in slot 5.
    The idempotency records outlive the delete (by design); a sale created anew is another
    sale (a new generation), so the key, bound to the first, answers 422 whatever the
    shard counts."""
    async with serve(backend.settings(key_mode=key_mode)) as api:
        user = 5
        key = await api.token(user) if key_mode == "token" else f"k-{uuid.uuid4().hex}"
        await api.create_sale(sku, 10, shards=first)
        status, body, _ = await api.buy(sku, user, key)
        assert status == 200, body
        await _delete_via_api(api, sku)
        await api.create_sale(sku, 10, shards=then)
        status, body, _ = await api.buy(sku, user, key)
        assert status != 200, f"the key bought a second time ({first} -> {then} shards): {body}"
        assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), body


# == 2. one key, one purchase: a sale re-created under a process's cached view =================

async def test_a_key_used_after_a_recreate_seen_late_is_bound_for_every_sale(backend: Backend) -> None:
    """Invariant 8. The gateway caches a sale for 5 s. Another process deletes it and
    creates it again with 4 shards; the purchase script answers SALE_NOT_FOUND, the
    purchase path re-reads the sale and buys in the new one, but it bound the key
    (claim_key) only for the shard count it had cached (16: no binding needed). The key
    then buys again on any 16-shard sale."""
    async with serve(backend.settings(key_mode="client")) as api:
        x, y = new_sku(), new_sku()
        await api.create_sale(x, 10, shards=16)
        await api.create_sale(y, 10, shards=16)
        assert await api.gateway.sales.get(x) is not None  # cached by this process
        other = _store(backend, api.gateway.settings)  # another gateway process
        try:
            found = await other.sale_record(x)
            assert found is not None
            await other.delete_sale(found[0])
            assert await other.create_sale(Sale(x, 10, shards=4))
        finally:
            await other.close()
        user, key = 5, f"k-{uuid.uuid4().hex}"
        status, body, _ = await api.buy(x, user, key)
        assert status == 200, body
        status, body, _ = await api.buy(y, user, key)
        assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), \
            f"one key admitted on two sales: {status} {body}"


# == 3. one key, many concurrent submissions over sales of different shard counts ===============

async def test_one_key_sent_concurrently_to_sales_of_three_shard_counts_buys_once(
        backend: Backend) -> None:
    """Invariant 3 / 8 (defended): claim_key and the purchase in slot 5 decide it."""
    async with serve(backend.settings(key_mode="client")) as api:
        sales = {n: new_sku() for n in (4, 8, 16)}
        for n, sku in sales.items():
            await api.create_sale(sku, 50, shards=n)
        user, key = 5, f"k-{uuid.uuid4().hex}"
        results = await asyncio.gather(*(api.buy(sku, user, key)
                                         for sku in sales.values() for _ in range(20)))
        oks = [body for status, body, _ in results if status == 200]
        assert len(oks) == 1, oks
        assert {s for s, _, _ in results} <= {200, 409, 422}
        sold = [(await api.sale(sku))["sold"] for sku in sales.values()]
        assert sum(sold) == 1, sold


# == 4. identity: braces, another user's token or key =============================================

async def test_braces_in_user_text_are_refused_before_any_slot_is_chosen(backend: Backend,
                                                                          sku: str) -> None:
    """A `{` or `}` in a SKU, a key or a user id never reaches a key name (defended)."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 10, shards=4)
        status, body, _ = await api.buy("a%7Bb%7D", 1, "key-00000001")
        assert (status, body["code"]) == (400, "BAD_REQUEST"), body
        status, body, _ = await api.buy(sku, 1, "key-{0000001}")
        assert (status, body["code"]) == (400, "BAD_REQUEST"), body
        status, body, _ = await api.buy(sku, None, "key-00000001", headers={"X-User-Id": "1{2}"})
        assert status == 401, body
        assert (await api.sale(sku))["sold"] == 0


async def test_a_token_or_key_of_another_user_never_gets_the_first_users_outcome(
        backend: Backend, sku: str) -> None:
    """Token mode: another user's token is refused; client mode: B sending A's key is a
    different key (defended)."""
    async with serve(backend.settings(key_mode="token")) as api:
        await api.create_sale(sku, 10, shards=4)
        token = await api.token(1)
        assert (await api.buy(sku, 1, token))[0] == 200
        status, body, _ = await api.buy(sku, 2, token)
        assert (status, body["code"]) == (403, "TOKEN_INVALID"), body
    async with serve(backend.settings(key_mode="client")) as api:
        other = new_sku()
        await api.create_sale(other, 10, shards=4)
        key = f"k-{uuid.uuid4().hex}"
        assert (await api.buy(other, 1, key))[0] == 200
        status, body, _ = await api.buy(other, 2, key)
        assert status == 200 and body["user_id"] == 2, body


# == 5. false SOLD_OUT ==============================================================================

async def _two_units_sold(gw: Gateway, sku: str) -> tuple[Sale, list[Any]]:
    """A sale of 2 units over 2 shards, both sold (user 0 in shard 0, user 1 in shard 1)."""
    await gw.store.create_sale(Sale(sku, 2, shards=2))
    bought = [await gw.purchases.buy(u, sku, f"key-{u:010d}", 1) for u in (0, 1)]
    assert [o.status for o in bought] == [200, 200], [o.body for o in bought]
    sale = await gw.sales.get(sku)
    assert sale is not None
    return sale, bought


async def test_a_buyer_joining_a_refill_late_cannot_confirm_its_stale_sold_out(
        proxied: Proxied, sku: str) -> None:
    """Contract "no false sold-out" (410 while a unit is free). A buyer reads the sold-out
    state (its `returns` counter) and then joins a refill already running; that refill's
    consistent read of the shards was made before a unit came back. The joiner confirms
    the refill's SOLD_OUT against its own, later, counter: mark_sold_out.lua agrees (no
    return since *its* read), the sale is flagged sold out while the returned unit sits
    in shard 1, and every buyer of shard 0 gets 410 until the next return."""
    gw = Gateway.build(proxied.backend.settings(key_mode="client", redis_timeout=5.0,
                                                request_timeout=10.0))
    try:
        sale, bought = await _two_units_sold(gw, sku)
        stock0 = gw.store.keys.shard(sku, 0).stock
        second_read = threading.Event()
        # The refill reads every shard, then reads again (_same_twice): hold the reply
        # of the second read (it has run in Redis) while a unit comes back.
        proxied.proxy_for_key(stock0).delay_reply_to(
            _nth(_command_on("HMGET", stock0), 2, second_read), 1.5)
        owner = asyncio.create_task(gw.rebalancer.refill(sale, 0, 1))  # e.g. a buyer's
        await _wait_event(second_read, owner)
        await asyncio.sleep(0.2)  # (ordering only: let the held read run in Redis)
        order = await gw.store.get_order(bought[1].body["order_no"])
        assert order is not None
        await gw.returns.reject(order, "refused")  # unit 2 back in shard 1, counted
        joiner = asyncio.create_task(gw.purchases.buy(2, sku, f"key-{2:010d}", 1))
        await until(lambda: gw.rebalancer.refilling(sku, 0) >= 2, owner, joiner)
        assert (await owner)[0] is Refill.SOLD_OUT  # (its snapshot predates the return)
        outcome = await joiner
        snap = await read_sale(gw.store, sale)
        assert snap.remaining + snap.in_transfer + snap.sold == 2
        assert (outcome.status, outcome.body.get("code")) == (200, "OK"), \
            f"410 with a unit free in the sale: {outcome.body}; shards " \
            f"{[s.remaining for s in snap.states]}"
    finally:
        proxied.clear()
        await gw.close()


async def test_a_return_counted_after_a_sold_out_mark_leaves_no_false_sold_out(
        backend: Backend, sku: str) -> None:
    """Contract "no false sold-out". A return is two calls in two slots: compensate.lua
    (units back in their shard) and then HINCRBY returns. A sold-out check whose snapshot
    predates the first and whose mark_sold_out.lua runs between the two records the sale
    sold out, with the unit free. If the process doing the return dies between its two
    calls (the relay: the entry is claimed again only after SECKILL_RELAY_CLAIM_IDLE_MS),
    the flag stays until then and every buyer outside shard 1 gets 410 (recorded against
    their keys for good)."""
    gw = Gateway.build(backend.settings(key_mode="client"))
    try:
        sale, bought = await _two_units_sold(gw, sku)
        refill, seen = await gw.rebalancer.refill(sale, 0, 1)  # a buyer's check
        assert refill is Refill.SOLD_OUT
        order = await gw.store.get_order(bought[1].body["order_no"])
        assert order is not None
        # The relay's compensation, as Returns makes it: announced, then the units back,
        # and not yet counted (the relay might die here).
        await gw.store.count_return(order, "begin")
        assert (await gw.store.compensate(order, "refused")).returned == 1
        recorded = await gw.sold_out.confirm(sale, seen)
        gw.sold_out.forget(sku)
        outcome = await gw.purchases.buy(2, sku, f"key-{2:010d}", 1)  # shard 0
        assert not recorded and outcome.status == 200, \
            f"sold-out recorded ({recorded}) with unit 2 free in shard 1: {outcome.body}"
    finally:
        await gw.close()


async def test_units_given_back_after_a_sell_out_are_sold_in_any_shard(backend: Backend,
                                                                       sku: str) -> None:
    """Defended: once the return is counted, the flag is stale at once and a buyer of
    another shard gets the unit (moved)."""
    gw = Gateway.build(backend.settings(key_mode="client"))
    try:
        sale, bought = await _two_units_sold(gw, sku)
        sold_out = await gw.purchases.buy(2, sku, f"key-{2:010d}", 1)
        assert sold_out.status == 410
        order = await gw.store.get_order(bought[1].body["order_no"])
        assert order is not None
        assert await gw.returns.reject(order, "refused") is compensate_script.Compensated.DONE
        again = await gw.purchases.buy(4, sku, f"key-{4:010d}", 1)  # shard 0
        assert again.status == 200, again.body
        await _conserved(gw.store, sale)
    finally:
        await gw.close()


# == 6. a purchase's reply lost with its connection ===================================================

async def test_a_connection_reset_after_the_purchase_ran_does_not_say_nothing_was_admitted(
        proxied: Proxied, sku: str) -> None:
    """Contract, 503: "nothing was admitted, unless the body says outcome_unknown". The
    batcher writes the purchase; the script runs; the connection is reset before its
    reply comes back. Link.abort gives the caller a ConnectionError, which the middleware
    answers 503 *without* outcome_unknown ("nothing was admitted") although the purchase
    was made (the same key then answers 409 with the original 200)."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=5.0,
                                        request_timeout=10.0)
    async with serve(settings) as api:
        await api.create_sale(sku, 10, shards=16)
        store = api.gateway.store
        await _load_scripts(store.client, purchase_script.SCRIPT)
        user, key = 1, f"k-{uuid.uuid4().hex}"
        ran = threading.Event()
        proxy = proxied.proxy_for_key(store.keys.shard(sku, 1).stock)
        proxy.delay_reply_to(_nth(_evalsha_of(purchase_script.SCRIPT.sha), 1, ran), 3.0)
        buying = asyncio.create_task(api.buy(sku, user, key))
        await _wait_event(ran, buying)
        await asyncio.sleep(0.2)  # (ordering only: the script has run in Redis)
        proxy.reset_all()
        status, body, _ = await buying
        proxied.clear()
        again, original, _ = await api.buy(sku, user, key)
        admitted = again == 409 and original.get("original", {}).get("status") == 200
        assert status != 503 or body.get("outcome_unknown") or not admitted, \
            f"503 said nothing was admitted, yet the key's outcome is {original}"


async def test_a_reply_held_for_wait_and_lost_with_its_connection_says_outcome_unknown(
        proxied: Proxied, sku: str) -> None:
    """Defended: a purchase's OK held for the WAIT that closes its pipeline, then the
    connection drops before WAIT answers: 503 with outcome_unknown, and the same key
    tells the real outcome."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=5.0,
                                        request_timeout=10.0, replica_acks=1,
                                        replica_ack_timeout_ms=1000)
    if proxied.backend.mode == "standalone":
        # No replica: there is no WAIT to lose; the purchase is answered without one.
        async with serve(settings) as api:
            await api.create_sale(sku, 10, shards=16)
            status, body, _ = await api.buy(sku, 1, f"k-{uuid.uuid4().hex}")
            text = await (await api.client.get("/metrics")).text()
            assert status == 200 and "seckill_unprotected_purchases_total 1.0" in text, body
        return
    async with serve(settings) as api:
        await api.create_sale(sku, 10, shards=16)
        store = api.gateway.store
        # (standalone has no replica: the WAIT closing the creation's pipelines blocks
        # the connection for its whole timeout; let it end before the purchase is sent)
        await store.batcher.drain()  # type: ignore[union-attr]
        await _load_scripts(store.client, purchase_script.SCRIPT)
        user, key = 1, f"k-{uuid.uuid4().hex}"
        waited = threading.Event()
        proxy = proxied.proxy_for_key(store.keys.shard(sku, 1).stock)
        proxy.delay_reply_to(_nth(lambda a: bool(a) and a[0].upper() == b"WAIT", 1, waited), 4.0)
        buying = asyncio.create_task(api.buy(sku, user, key))
        await _wait_event(waited, buying)
        await asyncio.sleep(0.2)
        proxy.reset_all()
        status, body, _ = await buying
        proxied.clear()
        assert (status, body.get("outcome_unknown")) == (503, True), body
        # It was admitted. (Asked again through the gateway, standalone Redis, which has
        # no replica, would hold the stored OK for a WAIT that never counts one.)
        record = store.keys.shard(sku, 1).idempotency(user, key)
        assert await store.client.hget(record, "outcome") == "OK"


# == 7. sales half made: stuck, or for sale =====================================================

async def _can_be_made_again(store: Store, sku: str) -> bool:
    """Whatever the PUTs and DELETEs an operator tries, does the SKU become a sale again?
    The same PUT; a DELETE and the PUT; once every lease is over, a PUT with other
    parameters."""
    if await store.create_sale(Sale(sku, 40, shards=4)):
        return True
    found = await store.sale_record(sku)
    if found is not None:
        await store.delete_sale(found[0])
    if await store.create_sale(Sale(sku, 40, shards=4)):
        return True
    await asyncio.sleep(store.creation_lease_ms / 1000 + 0.1)
    return await store.create_sale(Sale(sku, 12, shards=3))


async def test_a_creation_taken_over_after_its_lease_never_leaves_the_sku_stuck(
        backend: Backend, sku: str) -> None:
    """As above, with a creator slower than its lease (a GC pause, a slow Redis): the
    next PUT (other parameters) undoes the half-made sale and claims the SKU; the slow
    creator's next create_shard lands between the undo and the new creator's shards."""
    store = _store(backend)
    store.creation_lease_ms = 300
    try:
        slow = await store.begin_sale(Sale(sku, 40, shards=4))
        assert slow is not None
        await store.create_shard(slow, 0)
        await asyncio.sleep(0.4)  # its lease is over
        fresh = await store.begin_sale(Sale(sku, 12, shards=3))  # the next PUT: undo, claim
        assert fresh is not None and fresh.generation != slow.generation
        late = await store.create_shard(slow, 1)  # the slow creator goes on...
        with pytest.raises(SaleTaken):
            await store._renew(slow)  # ...and stops at its next renewal (it has lost)
        made = await store.create_sale(Sale(sku, 12, shards=3))  # the new creator goes on
        assert made or await _can_be_made_again(store, sku), \
            f"SKU stuck after a creation was taken over (the slow creator's shard: {late!r})"
    finally:
        await store.close()


async def test_a_process_that_cached_a_sale_cannot_buy_in_its_half_made_successor(
        backend: Backend, sku: str) -> None:
    """Contract: a half-made sale is not for sale. A process caches a sale (5 s); the
    SKU is deleted and a new sale of it (same shard count) is being created elsewhere.
    purchase.lua checks the shard count, not the generation, so the stale process sells
    units of the sale still in `creating` (one that may yet be undone)."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 8, shards=4)
        assert await api.gateway.sales.get(sku) is not None  # cached here
        other = _store(backend, api.gateway.settings)
        try:
            found = await other.sale_record(sku)
            assert found is not None
            await other.delete_sale(found[0])
            successor = await other.begin_sale(Sale(sku, 8, shards=4))
            assert successor is not None
            await other.create_shard(successor, 1)  # one shard made so far
            status, body, _ = await api.buy(sku, 5, f"k-{uuid.uuid4().hex}")  # user 5: shard 1
            state = (await other.sale_record(sku))[1]  # type: ignore[index]
            assert status != 200, f"bought in a sale still {state!r}: {body}"
        finally:
            await other.close()


# == 8. delete leaves nothing behind ==============================================================

async def test_a_delete_leaves_no_key_of_the_sale(backend: Backend, sku: str) -> None:
    """Defended when nothing races: after purchases, a move, a rejection and a sold-out
    check, DELETE leaves only what is not per sale (idempotency records, the purchase
    streams, the relay's mark, the token secret)."""
    async with serve(backend.settings(key_mode="client")) as api:
        gw = api.gateway
        await api.create_sale(sku, 3, shards=2)
        outcomes = [await gw.purchases.buy(u, sku, f"key-{u:010d}", 1) for u in (0, 2, 4, 6)]
        assert [o.status for o in outcomes] == [200, 200, 200, 410]
        order = await gw.store.get_order(outcomes[0].body["order_no"])
        assert order is not None
        await gw.returns.reject(order, "refused")
        await _delete_via_api(api, sku)
        left = await _left_of(gw.store, sku)
        assert left == [], left


async def test_a_late_sold_out_mark_or_return_count_leaves_no_key_after_a_delete(
        backend: Backend, sku: str) -> None:
    """A process whose sold-out check (or a return's count) ends after the DELETE
    re-creates the sale's sold-out record: a key of a deleted sale left behind."""
    async with serve(backend.settings(key_mode="client")) as api:
        gw = api.gateway
        await api.create_sale(sku, 1, shards=1)
        bought = await gw.purchases.buy(0, sku, "key-0000000000", 1)
        assert bought.status == 200
        sale = await gw.sales.get(sku)
        assert sale is not None
        seen = await gw.sold_out.read(sale)
        await _delete_via_api(api, sku)
        await gw.sold_out.confirm(sale, seen)  # the check that began before the delete
        order = await gw.store.get_order(bought.body["order_no"])
        assert order is None  # (deleted with the sale)
        left = await _left_of(gw.store, sku)
        assert left == [], left


# == 9. releases and compensations ================================================================

async def test_the_release_route_gives_units_back(backend: Backend, sku: str) -> None:
    """Contract: POST /admin/orders/{no}/release {"reason": "cancelled"} -> 200, units
    back in the sale, once. The route does not exist (404): the bundled orders service
    reads 404 as "unknown order" and drops the release, so every expired or cancelled
    order's units are lost to the sale (invariant 7)."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 2, shards=2)
        status, body, _ = await api.buy(sku, 0, "key-0000000000")
        assert status == 200, body
        url = f"/admin/orders/{body['order_no']}/release"
        resp = await api.client.post(url, json={"reason": "cancelled"}, headers=api.admin)
        assert resp.status == 200, (resp.status, await resp.text())
        assert (await api.sale(sku))["remaining"] == 2
        again = await api.client.post(url, json={"reason": "cancelled"}, headers=api.admin)
        assert again.status == 200
        assert (await api.sale(sku))["remaining"] == 2


async def test_a_compensation_resent_after_a_lost_reply_returns_its_units_once(
        proxied: Proxied, sku: str) -> None:
    """Defended: the client resends compensate.lua after its reply was late; the second
    run answers ALREADY and moves nothing."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=0.3)
    gw = Gateway.build(settings)
    try:
        await gw.store.create_sale(Sale(sku, 4, per_user_limit=2, shards=1))
        bought = await gw.purchases.buy(0, sku, "key-0000000000", 2)
        assert bought.status == 200, bought.body
        order = await gw.store.get_order(bought.body["order_no"])
        assert order is not None
        await _load_scripts(gw.store.client, compensate_script.SCRIPT)
        proxied.proxy_for_key(gw.store.keys.shard(sku, 0).stock).delay_reply_to(
            _evalsha_of(compensate_script.SCRIPT.sha), 0.6)
        result = await gw.returns.release(order, "cancelled")
        proxied.clear()
        assert result.outcome in (compensate_script.Compensated.DONE,
                                  compensate_script.Compensated.ALREADY)
        sale = await gw.store.get_sale(sku)
        assert sale is not None
        snap = await read_sale(gw.store, sale)
        assert (snap.remaining, snap.sold) == (4, 0), snap
        free = await gw.store.client.lrange(gw.store.keys.shard(sku, 0).units, 0, -1)
        assert sorted(free) == ["1-1", "2-2", "3-4"], free
        # A rejection after the release (or a second release) moves nothing.
        assert await gw.returns.reject(order, "refused") is compensate_script.Compensated.ALREADY
        assert (await gw.returns.release(order, "expired")).outcome \
            is compensate_script.Compensated.ALREADY
        assert (await read_sale(gw.store, sale)).remaining == 4
    finally:
        proxied.clear()
        await gw.close()


async def test_a_released_order_not_yet_delivered_is_never_delivered(backend: Backend,
                                                                     sku: str) -> None:
    """Contract (release): "an order not yet delivered is then never delivered". The
    relay POSTs every stream entry without looking at the order's status: the released
    order reaches the endpoint, which then holds a live order for a unit that is back on
    sale (invariant 7: a unit in two live orders once it is sold again)."""
    posted: list[str] = []

    async def endpoint(request: web.Request) -> web.Response:
        posted.append((await request.json())["order_no"])
        return web.json_response({"code": "CREATED"}, status=201)

    app = web.Application()
    app.router.add_post("/orders", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = backend.settings(key_mode="client")
    gw = Gateway.build(settings)
    try:
        await gw.store.create_sale(Sale(sku, 2, shards=1))
        bought = await gw.purchases.buy(0, sku, "key-0000000000", 1)
        assert bought.status == 200
        order = await gw.store.get_order(bought.body["order_no"])
        assert order is not None
        assert (await gw.returns.release(order, "cancelled")).returned == 1
        async with running_relay(settings, f"http://127.0.0.1:{port}/orders"):
            async def drained() -> bool:
                return await gw.store.client.xlen(gw.store.keys.stream(0)) == 0 or bool(posted)
            await eventually(drained, "the relay has handled the stream", timeout=20)
            await asyncio.sleep(0.3)
        assert order.order_no not in posted, "a released order was delivered"
    finally:
        await gw.close()
        await runner.cleanup()


async def test_a_put_and_a_delete_at_once_never_leave_the_sku_stuck(proxied: Proxied,
                                                                    sku: str) -> None:
    """Contract: a sale is never left stuck by a PUT that failed half-way. A PUT of 300
    shards (two batches, the lease renewed after each) and a DELETE of the SKU at once:
    the DELETE closes every shard while the creator is between its batches, and is still
    finishing (deleting the orders of the closed shards) when the creator makes its
    second batch. create_shard.lua finds no shard there and makes shards 256..299 of the
    deleted generation; the creator's renewal meets `deleting` and stops (409). The
    DELETE then removes the record (204). From then on every creation of the SKU meets
    those shards (OTHER_GENERATION) and fails, and no DELETE removes them (close_shard of
    another generation leaves them alone): the SKU is stuck for good. (The proxy holds
    two replies, after their commands ran, to put the steps in this order: the creator's
    first lease renewal, and the DELETE's last steps.) Now a closed shard is remembered
    for a while (create_shard answers CLOSED to its old creator), and a creator that
    meets a shard of a generation the registry no longer names replaces it."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=8.0,
                                        request_timeout=20.0)
    body = {"stock": 600, "shards": 300}
    async with serve(settings) as api:
        store = api.gateway.store
        await _load_scripts(store.client, sale_scripts.STATE)
        renewed = threading.Event()
        proxied.proxy_for_key(store.keys.sale(sku)).delay_reply_to(
            _nth(_evalsha_of(sale_scripts.STATE.sha), 1, renewed), 1.0)
        proxied.proxy_for_key(store.keys.sales).delay_reply_to(
            _command_on("HDEL", store.keys.sales), 3.0)
        put = asyncio.create_task(api.client.put(f"/admin/sales/{sku}", json=body,
                                                 headers=api.admin))
        await _wait_event(renewed, put)  # the first batch is made; the lease renewed
        deleted = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
        first = await put
        proxied.clear()
        statuses = [first.status, deleted.status]
        for _ in range(2):
            resp = await api.client.put(f"/admin/sales/{sku}", json=body, headers=api.admin)
            statuses.append(resp.status)
            if resp.status == 201:
                break
            statuses.append((await api.client.delete(f"/admin/sales/{sku}",
                                                     headers=api.admin)).status)
        stray = await store.client.hget(store.keys.shard(sku, 299).stock, "generation")
        assert 201 in statuses[2:], \
            f"SKU stuck: PUT, DELETE, then PUT/DELETE...: {statuses}; shard 299 of " \
            f"generation {stray!r} left"


async def test_a_delete_answered_204_during_a_put_stays_deleted(proxied: Proxied, sku: str) -> None:
    """Contract: DELETE -> 204, "the sale and all its keys are gone". A DELETE that comes
    while a PUT of 300 shards is between its batches answers 204; the creator then makes
    its second batch (shards of the deleted generation) and renews its lease with
    claim_sale.lua, which, finding no record, claimed the SKU anew under the deleted
    generation: after the 204 the registry record was back (`creating`) with 44 shards.
    Now the renewal only extends a creation still under way (sale_state.lua), and
    create_shard refuses a closed generation."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=3.0,
                                        request_timeout=10.0)
    async with serve(settings) as api:
        store = api.gateway.store
        await _load_scripts(store.client, sale_scripts.STATE)
        renewed = threading.Event()
        proxied.proxy_for_key(store.keys.sale(sku)).delay_reply_to(
            _nth(_evalsha_of(sale_scripts.STATE.sha), 1, renewed), 1.0)
        put = asyncio.create_task(api.client.put(
            f"/admin/sales/{sku}", json={"stock": 600, "shards": 300}, headers=api.admin))
        await _wait_event(renewed, put)
        deleted = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
        created = await put
        proxied.clear()
        assert (deleted.status, created.status) == (204, 409)
        record = await store.client.hgetall(store.keys.sale(sku))
        shards = sum([await store.client.exists(store.keys.shard(sku, s).stock)
                      for s in range(300)])
        assert (record.get("state"), shards) == (None, 0), \
            f"after DELETE 204: record {record.get('state')!r}, {shards} shards"


# == 10. a primary lost for good (invariant 10) ====================================================

async def test_shards_of_a_primary_lost_for_good_sell_again_after_the_failover(
        local_cluster: Any, sku: str) -> None:
    """Invariant 10: a primary killed and never restarted costs purchases for the
    failover time only. The batcher decided once, when it connected, to WAIT for one
    replica per pipeline; the promoted replica has no replica of its own, every WAIT
    counts 0, and every purchase on its shards (a retry of a key too) answers 503
    outcome_unknown for as long as the node stays dead. (tests/test_failover.py
    restarts the killed node at once, which hides this.)"""
    cluster = local_cluster
    settings = Backend("cluster", cluster.url, cluster).settings(key_mode="client",
                                                                 request_timeout=3.0)
    gw = Gateway.build(settings)
    victim = None
    try:
        await gw.store.create_sale(Sale(sku, 1000, shards=16))
        assert (await gw.purchases.buy(0, sku, "key-000000000000", 1)).status == 200
        slot = key_slot(gw.store.keys.tag(0).encode())
        victim = cluster.primary_for_slot(slot)
        replica = cluster.replicas_of(victim)[0]
        await asyncio.to_thread(cluster.kill, victim)
        for _ in range(300):  # until the cluster has promoted the replica
            try:
                if cluster.primary_for_slot(slot) is replica:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.1)
        assert cluster.primary_for_slot(slot) is replica
        answers: list[tuple[int, Any]] = []
        for attempt in range(1, 41):  # buyers of shard 0, one after another
            try:
                outcome = await gw.purchases.buy(16 * attempt, sku, f"key-{attempt:012d}", 1)
                answers.append((outcome.status, outcome.body.get("code")))
            except Exception as exc:  # a 503 in the HTTP layer
                answers.append((503, f"{type(exc).__name__}: {str(exc)[:60]}"))
            if answers[-1][0] == 200:
                break
            await asyncio.sleep(0.25)
        assert answers[-1][0] == 200, \
            f"shard 0 never sells again after the failover: {answers[-3:]}"
    finally:
        await gw.close()
        if victim is not None and not victim.running:
            await asyncio.to_thread(cluster.restart, victim)
            await asyncio.to_thread(cluster.wait_until_healthy, 60)


# == 11. the sale window (not settable through the API yet) =========================================

async def test_a_purchase_before_the_start_answers_403_and_leaves_the_key_usable(
        backend: Backend, sku: str) -> None:
    """Contract: 403 SALE_NOT_STARTED, "nothing is recorded, the key stays usable". The
    script answers NOT_STARTED, which render() does not know (STATUS[""]): 500. And for a
    sale of 4 shards the key was bound (claim_key) before the script looked at the
    window: sent to another sale it answers 422. (A window can only be set through the
    store for now: the PUT refuses starts_at.)"""
    async with serve(backend.settings(key_mode="client")) as api:
        later = int(time.time() * 1000) + 3_600_000
        assert await api.gateway.store.create_sale(Sale(sku, 10, shards=4, starts_at=later))
        running = new_sku()
        await api.create_sale(running, 10, shards=4)
        key = f"k-{uuid.uuid4().hex}"
        status, body, _ = await api.buy(sku, 5, key)
        early = (status, body.get("code"))
        status, body, _ = await api.buy(running, 5, key)
        assert (early, status) == ((403, "SALE_NOT_STARTED"), 200), (early, status, body)


# == 12. many buyers, resends and resets: nothing oversold, lost or doubled ========================

@dataclass
class _Crowd:
    gw: Gateway
    sale: Sale
    finals: dict[int, tuple[int, dict]]   # user -> the final answer to its key
    attempts: list[tuple[int, int, dict]]  # (user, status, body) of every answer


async def _crowd_under_faults(proxied: Proxied, sku: str, api: Api, *, stock: int,
                              buyers: int, seed: int) -> _Crowd:
    """A crowd skewed onto shard 0 of 8 (moves), each buyer sending its key again on a
    503 until it gets a final answer, while replies are held past the socket timeout
    (the client resends; the batcher's watchdog drops its connection) and connections
    are reset; then Redis is whole again and every buyer gets through."""
    rng = random.Random(seed)
    users = list(dict.fromkeys(8 * i if rng.random() < 0.7 else rng.randrange(10**6)
                               for i in range(buyers)))
    await api.create_sale(sku, stock, shards=8)
    finals: dict[int, tuple[int, dict]] = {}
    attempts: list[tuple[int, int, dict]] = []
    limit = asyncio.Semaphore(24)

    async def buy(user: int) -> None:
        key = f"key-{user:012d}"
        async with limit:
            for _ in range(60):
                try:
                    status, body, _ = await api.buy(sku, user, key)
                except Exception as exc:  # the test client itself
                    status, body = 599, {"code": repr(exc)}
                attempts.append((user, status, body))
                if status not in (503, 599):
                    break
                await asyncio.sleep(0.05)
            finals[user] = (status, body)

    stop = asyncio.Event()

    async def chaos() -> None:
        for _ in range(40):
            if stop.is_set():
                break
            proxy = rng.choice(proxied.proxies)
            if rng.random() < 0.6:
                proxy.delay_next_replies(rng.randint(1, 8), 0.6)
            else:
                proxy.reset_all()
            await asyncio.sleep(rng.uniform(0.02, 0.12))

    faults = asyncio.create_task(chaos())
    try:
        await asyncio.gather(*(buy(u) for u in users))
    finally:
        stop.set()
        await faults
        proxied.clear()
    sale = await api.gateway.store.get_sale(sku)
    assert sale is not None
    return _Crowd(api.gateway, sale, finals, attempts)


def _admitted_units(crowd: _Crowd) -> list[int]:
    """Units of every key's purchase: its 200, or (its first answer lost) the original
    200 its retry read back as a conflict."""
    units: list[int] = []
    for status, body in crowd.finals.values():
        if status == 200:
            units += body["units"]
        elif status == 409 and body.get("code") == "IDEMPOTENT_CONFLICT" \
                and body["original"]["status"] == 200:
            units += body["original"]["body"]["units"]
    return units


async def test_no_unit_sold_twice_or_lost_under_resends_and_resets(proxied: Proxied,
                                                                  sku: str) -> None:
    """Invariants 1-4 under faults (defended): units distinct and within stock; every
    unit free, sold or in a move; demand > stock sells it all; every key answered once
    Redis is whole; no 410 while units are left."""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=0.4,
                                        request_timeout=2.0)
    stock = 120
    async with serve(settings) as api:
        crowd = await _crowd_under_faults(proxied, sku, api, stock=stock, buyers=260,
                                          seed=int(os.environ.get("REVIEW_SEED", "7")))
        await crowd.gw.rebalancer.sweep(crowd.sale)
        snap = await read_sale(crowd.gw.store, crowd.sale)
        units = _admitted_units(crowd)
        codes = sorted({(s, b.get("code")) for s, b in crowd.finals.values()})
        assert len(units) == len(set(units)), "a unit sold twice"
        assert snap.consistent and snap.remaining + snap.sold + snap.in_transfer == stock, snap
        assert snap.sold == len(units), (snap.sold, len(units), codes)
        unanswered = [u for u, (s, _) in crowd.finals.items() if s in (503, 599)]
        assert not unanswered, (len(unanswered), codes)
        assert snap.sold == stock, (snap.remaining, codes)


async def test_under_resets_no_503_says_nothing_was_admitted_for_a_purchase_made(
        proxied: Proxied, sku: str) -> None:
    """The 503 of section 6 at scale: keys whose every answer before a retry found the
    purchase made (409 with the original 200) was "nothing was admitted" (a 503 without
    outcome_unknown): one of those answers was false. (A key told "outcome unknown" once
    may have bought then.)"""
    settings = proxied.backend.settings(key_mode="client", redis_timeout=0.4,
                                        request_timeout=2.0)
    async with serve(settings) as api:
        crowd = await _crowd_under_faults(proxied, sku, api, stock=120, buyers=260, seed=4)
        made = {user for user, (status, body) in crowd.finals.items()
                if status == 409 and body.get("code") == "IDEMPOTENT_CONFLICT"
                and body["original"]["status"] == 200}
        earlier: dict[int, list[tuple[int, bool]]] = {}
        for user, status, body in crowd.attempts:
            earlier.setdefault(user, []).append((status, bool(body.get("outcome_unknown"))))
        false_nothing = [user for user in made
                         if all(status == 503 and not unknown
                                for status, unknown in earlier[user][:-1])]
        assert not false_nothing, \
            f"{len(false_nothing)} keys were told only 'nothing was admitted' and had bought"


# == 13. smaller points ==============================================================================

async def test_a_sold_out_answered_from_the_flag_is_not_recorded_against_the_key(
        backend: Backend, sku: str) -> None:
    """Contract: SOLD_OUT outcomes are recorded "except those answered by a gateway
    process that already knows the sale is sold out (then nothing is recorded, and if
    units come back later that key may still buy)". Here a buyer answered from the
    shared flag has its SOLD_OUT recorded (purchase.lua with short_outcome SOLD_OUT): once
    a unit comes back, that key still answers 409 with the old 410."""
    gw = Gateway.build(backend.settings(key_mode="client"))
    try:
        sale, bought = await _two_units_sold(gw, sku)
        first = await gw.purchases.buy(3, sku, f"key-{3:010d}", 1)  # checks, sets the flag
        assert first.status == 410
        assert (await gw.sold_out.read(sale)).sold_out
        known = await gw.purchases.buy(5, sku, f"key-{5:010d}", 1)  # answered from the flag
        assert known.status == 410
        order = await gw.store.get_order(bought[1].body["order_no"])
        assert order is not None
        await gw.returns.reject(order, "refused")  # unit 2 back in shard 1 (user 5's)
        again = await gw.purchases.buy(5, sku, f"key-{5:010d}", 1)
        assert again.status == 200, again.body
    finally:
        await gw.close()


async def test_two_identical_puts_at_once_create_one_sale(backend: Backend, sku: str) -> None:
    """A second identical PUT while the first is at work joins the same creation (a PUT
    with the same parameters is idempotent: that is how a PUT cut off is finished), so
    both may answer 201; there is one sale, one generation, complete, once."""
    store = _store(backend)
    try:
        sale = Sale(sku, 2048, shards=8)
        first = await store.begin_sale(sale)  # the first PUT, at work
        assert first is not None
        assert await store.create_sale(sale)  # the second PUT, meanwhile: finishes it
        for shard in range(sale.shards):  # the first goes on and ends
            await store.create_shard(first, shard)
        assert await sale_scripts.set_state(store.client, store.keys.sale(sku),
                                            first.generation, "ready")
        found = await store.sale_record(sku)
        assert found is not None and found[0].generation == first.generation
        snap = await read_sale(store, found[0])
        assert (snap.remaining, len(snap.states)) == (2048, 8)
    finally:
        await store.close()


async def test_an_unbatched_purchase_resent_by_the_client_answers_its_own_outcome(
        proxied: Proxied, sku: str) -> None:
    """Defended: without a batcher (TLS, a Unix socket) the purchase goes through
    redis-py, which resends it after a late reply; the second run finds the key recorded
    by this very attempt and the caller gets its 200, not a 409."""
    store = _store(proxied.backend, redis_timeout=0.3)
    try:
        assert await store.create_sale(Sale(sku, 10, shards=16))
        sale = await store.get_sale(sku)
        assert sale is not None
        await _load_scripts(store.client, purchase_script.SCRIPT)
        proxied.proxy_for_key(store.keys.shard(sku, 1).stock).delay_reply_to(
            _evalsha_of(purchase_script.SCRIPT.sha), 0.6)
        reply = await store.purchase(sale, 1, "key-0000000001", 1, 1)
        proxied.clear()
        assert (reply.code, reply.outcome, reply.same_attempt) == \
            (purchase_script.Code.DUPLICATE, "OK", True), reply
        assert (await read_sale(store, sale)).sold == 1
    finally:
        proxied.clear()
        await store.close()


async def test_one_user_many_keys_at_once_gets_the_per_user_limit(backend: Backend,
                                                                   sku: str) -> None:
    """Invariant 2 (defended): 30 keys of one user at once on a 4-shard sale (keys bound
    in slot 5, purchases in slot 1): one purchase, the rest ALREADY_PURCHASED."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 50, shards=4)
        results = await asyncio.gather(*(api.buy(sku, 5, f"k-{i:04d}-{uuid.uuid4().hex[:8]}")
                                         for i in range(30)))
        codes = sorted((s, b["code"]) for s, b, _ in results)
        assert codes.count((200, "OK")) == 1, codes
        assert codes.count((409, "ALREADY_PURCHASED")) == 29, codes
        assert (await api.sale(sku))["sold"] == 1
