"""The relay: every admitted purchase ends as exactly one order in the orders store, or
as `rejected` with its units back in the sale; through endpoint failures, lost answers,
a relay killed with SIGKILL, and units the database refuses.

Real Redis (standalone and Cluster), a real orders service on SQLite, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from devtools.processes import free_port
from gateway.delivery.endpoint import Verdict, judge
from gateway.orders.db import NewOrder, open_orders_db
from tests.support.api import Backend, new_sku, serve
from tests.support.delivery import (
    ORDERS_TOKEN,
    PAYMENT_SECRET,
    admit,
    all_delivered,
    backlog,
    eventually,
    gateway_orders,
    orders_service,
    running_relay,
    settled,
    statuses,
    upstream,
)


async def _stored(service, sku: str) -> dict[str, tuple[int, ...]]:
    return {o.order_no: o.units for o in await service.db.list_orders(sku)}


@pytest.mark.slow
async def test_every_admitted_purchase_is_delivered_once(backend: Backend, sqlite_url: str):
    """5,000 purchases, two relays at once, started before the sale exists."""
    settings = backend.settings(key_mode="client")
    sku, n = new_sku(), 5000
    async with orders_service(sqlite_url) as orders, serve(settings) as api:
        gw = api.gateway
        async with running_relay(settings, orders.orders_url, consumer="a") as a, \
                running_relay(settings, orders.orders_url, consumer="b") as b:
            await api.create_sale(sku, 6000, shards=16, price=250)
            started = asyncio.get_running_loop().time()
            admitted = await admit(gw, sku, range(n))
            await settled(gw, 16)
            elapsed = asyncio.get_running_loop().time() - started
            delivered = [_sample(r, "seckill_relay_delivered_total", result="delivered")
                         for r in (a, b)]
        print(f"\n{backend.mode}: {n} admitted and delivered in {elapsed:.1f}s "
              f"({n / elapsed:.0f}/s; relays {delivered[0]:.0f} + {delivered[1]:.0f})")
        assert await all_delivered(gw, admitted)
        stored = await _stored(orders, sku)
        assert stored == admitted  # exactly the admitted set, each once, with its units
        rows = await orders.db.list_orders(sku)
        assert {(r.amount, r.quantity, r.state) for r in rows} == {(250, 1, "pending")}
        units = [u for r in rows for u in r.units]
        assert len(units) == len(set(units)) == n
        assert await backlog(gw, 16) == 0
        # The API shows it too.
        order_no = next(iter(admitted))
        user = (await gw.store.get_order(order_no)).user_id
        resp = await api.client.get(f"/api/orders/{order_no}", headers={"X-User-Id": str(user)})
        assert (await resp.json())["status"] == "delivered"


async def test_endpoint_failing_then_recovering(backend: Backend, sqlite_url: str):
    """500s, then answers lost after the order was stored: all delivered, none twice."""
    settings = backend.settings(key_mode="client")
    sku, n = new_sku(), 200
    async with orders_service(sqlite_url) as orders, serve(settings) as api, \
            upstream(orders.orders_url, fail_first=60, stall_next=5, stall_seconds=1.0) as up:
        await api.create_sale(sku, n, shards=4)
        admitted = await admit(api.gateway, sku, range(n))
        async with running_relay(settings, up.url, request_timeout=0.5) as relay:
            await settled(api.gateway, 4)
            retries = _sample(relay, "seckill_relay_retries_total")
        assert await all_delivered(api.gateway, admitted)
        assert await _stored(orders, sku) == admitted
        assert up.answered[500] == 60
        assert up.posts > n + 60  # the lost answers were asked again ...
        assert up.answered.get(409, 0) >= 1  # ... and the store said it had them
        assert retries >= 65
        assert await backlog(api.gateway, 4) == 0


async def test_unit_taken_compensates_and_the_key_tells_the_truth(backend: Backend,
                                                                  database_url: str):
    """A Redis failover lost the write that sold unit 1, and Redis issued it again: the
    database refuses it, the purchase is compensated, and nothing is sold twice.
    (On SQLite and PostgreSQL.)"""
    settings = backend.settings(key_mode="client")
    sku = new_sku()
    async with orders_service(database_url) as orders, serve(settings) as api:
        gw = api.gateway
        await api.create_sale(sku, 4, shards=1, per_user_limit=2, price=100)
        await orders.db.insert_order(NewOrder("0-lost", sku, 999, (1,), 1, 100))
        status, body, _ = await api.buy(sku, 7, "key-of-user-7", 2)
        assert status == 200 and body["units"] == [1, 2]
        order_no = body["order_no"]
        async with running_relay(settings, orders.orders_url):
            await eventually(lambda: _status_is(gw, order_no, "rejected"), "the order is rejected")
            resp = await api.client.get(f"/api/orders/{order_no}", headers={"X-User-Id": "7"})
            assert (await resp.json())["status"] == "rejected"
            sale = await api.sale(sku)
            assert (sale["remaining"], sale["sold"]) == (3, 1)  # unit 2 is back; unit 1 is sold
            status, body, _ = await api.buy(sku, 7, "key-of-user-7", 2)
            assert status == 409 and body["code"] == "IDEMPOTENT_CONFLICT"
            assert body["order_status"] == "rejected"
            # The user may buy again, and the returned unit sells to someone.
            bought = await admit(gw, sku, [7], quantity=2) | await admit(gw, sku, [8])
            await settled(gw, 1)
            assert await all_delivered(gw, bought)
        stored = await _stored(orders, sku)
        assert order_no not in stored
        units = sorted(u for held in stored.values() for u in held)
        assert units == [1, 2, 3, 4]  # every unit once, none twice
        assert (await api.sale(sku))["remaining"] == 0


async def test_other_4xx_rejects_and_returns_every_unit(standalone: Backend, sqlite_url: str):
    settings = standalone.settings(key_mode="client")
    sku = new_sku()
    async with orders_service(sqlite_url) as orders, serve(settings) as api, \
            upstream(orders.orders_url, reject_with=422) as up:
        await api.create_sale(sku, 3, shards=1, per_user_limit=3)
        admitted = await admit(api.gateway, sku, [5], quantity=3)
        assert (await api.sale(sku))["remaining"] == 0
        async with running_relay(settings, up.url):
            order_no = next(iter(admitted))
            await eventually(lambda: _status_is(api.gateway, order_no, "rejected"), "rejected")
        assert (await api.sale(sku))["remaining"] == 3
        assert (await gateway_orders(api.gateway, admitted))[order_no].reason == "422 REFUSED"
        assert await admit(api.gateway, sku, [5], quantity=3, key_tag="again-")  # limit given back


async def test_entries_left_by_a_dead_relay_are_claimed(standalone: Backend, sqlite_url: str):
    settings = standalone.settings(key_mode="client")
    sku, n = new_sku(), 30
    async with orders_service(sqlite_url) as orders, serve(settings) as api:
        gw = api.gateway
        await api.create_sale(sku, n, shards=2)
        admitted = await admit(gw, sku, range(n))
        client = gw.store.client
        for shard in range(2):  # a relay that read everything, then died
            stream = gw.store.keys.stream(shard)
            await client.xgroup_create(stream, "relay", id="0", mkstream=True)
            await client.xreadgroup("relay", "dead-relay", {stream: ">"}, count=1000)
        pending = [await client.xpending(gw.store.keys.stream(s), "relay") for s in range(2)]
        assert sum(p["pending"] for p in pending) == n
        async with running_relay(settings, orders.orders_url, claim_idle_ms=300, claim_every=0.1):
            await settled(gw, 2)
        assert await all_delivered(gw, admitted)
        assert await _stored(orders, sku) == admitted
        for shard in range(2):
            assert (await client.xpending(gw.store.keys.stream(shard), "relay"))["pending"] == 0


async def test_deleted_sale_is_still_delivered(standalone: Backend, sqlite_url: str):
    """The order records are gone with the sale; the stream entries still carry the
    purchases, and they are delivered and acknowledged."""
    settings = standalone.settings(key_mode="client")
    sku, n = new_sku(), 10
    async with orders_service(sqlite_url) as orders, serve(settings) as api, \
            upstream(orders.orders_url, hold_from=1) as up:
        gw = api.gateway
        await api.create_sale(sku, n, shards=2)
        async with running_relay(settings, up.url, concurrency=1):
            admitted = await admit(gw, sku, range(n))
            await eventually(lambda: _true(up.held == 1), "a delivery is in flight")
            await gw.store.delete_sale(await gw.store.get_sale(sku))
            up.release()
            await eventually(lambda: _stored_count_is(orders, sku, n), "all stored")
            await settled(gw, 2)
        assert await _stored(orders, sku) == admitted


async def test_stop_lets_in_flight_deliveries_finish(standalone: Backend, sqlite_url: str):
    settings = standalone.settings(key_mode="client")
    sku, n = new_sku(), 40
    async with orders_service(sqlite_url) as orders, serve(settings) as api, \
            upstream(orders.orders_url, hold_from=1) as up:
        gw = api.gateway
        await api.create_sale(sku, n, shards=2)
        admitted = await admit(gw, sku, range(n))
        async with running_relay(settings, up.url, concurrency=8) as relay:
            await eventually(lambda: _true(up.held == 8), "eight deliveries are in flight")
            stopping = asyncio.create_task(relay.stop())
            await asyncio.sleep(0)  # stop() has begun: nothing new is read or sent
            up.release()
            await stopping
        # The eight in flight were stored, settled and acknowledged before stop() returned.
        stored = await _stored(orders, sku)
        assert len(stored) == 8 and up.posts == 8
        found = await statuses(gw, admitted)
        assert {no for no, status in found.items() if status == "delivered"} == set(stored)
        assert await backlog(gw, 2) == n - 8


async def test_gateway_serve_runs_the_relay(standalone: Backend, sqlite_url: str):
    async with orders_service(sqlite_url) as orders:
        settings = standalone.settings(relay=True, upstream_url=orders.orders_url,
                                       upstream_token=ORDERS_TOKEN)
        sku = new_sku()
        async with serve(settings) as api:
            assert api.gateway.relay is not None
            await api.create_sale(sku, 5, shards=2)
            status, body, _ = await api.buy_with_token(sku, 11)
            assert status == 200

            async def delivered() -> bool:
                resp = await api.client.get(f"/api/orders/{body['order_no']}",
                                            headers={"X-User-Id": "11"})
                return (await resp.json())["status"] == "delivered"

            await eventually(delivered, "the order reads delivered")
        assert list(await _stored(orders, sku)) == [body["order_no"]]


@pytest.mark.slow
async def test_relay_killed_mid_delivery_and_restarted(standalone: Backend, tmp_path: Path):
    """`seckill-gateway relay` and `seckill-gateway orders serve` as real processes; the
    relay is SIGKILLed with deliveries in flight, then restarted under the same name."""
    sku, n = new_sku(), 600
    settings = standalone.settings(key_mode="client")
    db_url = f"sqlite:///{tmp_path}/orders.db"
    env = {**os.environ, "SECKILL_REDIS_URL": settings.redis_url, "SECKILL_REDIS_MODE": "standalone",
           "SECKILL_KEY_PREFIX": settings.key_prefix, "SECKILL_DATABASE_URL": db_url,
           "SECKILL_ORDERS_TOKEN": ORDERS_TOKEN, "SECKILL_PAYMENT_SECRET": PAYMENT_SECRET,
           "SECKILL_UPSTREAM_TOKEN": ORDERS_TOKEN}
    port = free_port()
    with _process(["orders", "serve", "--port", str(port)], env, tmp_path / "orders.log") as orders:
        await _wait_http(f"http://127.0.0.1:{port}/healthz")
        async with serve(settings) as api, \
                upstream(f"http://127.0.0.1:{port}/orders", hold_from=151) as up:
            gw = api.gateway
            await api.create_sale(sku, n, shards=4)
            admitted = await admit(gw, sku, range(n))
            relay_env = {**env, "SECKILL_UPSTREAM_URL": up.url}
            relay = ["relay", "--consumer", "relay-1", "--concurrency", "16", "--metrics-port", "0"]
            with _process(relay, relay_env, tmp_path / "relay-1.log") as first:
                await eventually(lambda: _true(up.held >= 8), "deliveries are held in flight")
                first.kill()
                first.wait()
            assert up.posts < n  # killed mid-delivery
            up.release()  # the held requests still reach the store; their answers are lost
            with _process(relay, relay_env, tmp_path / "relay-2.log") as second:
                await settled(gw, 4, timeout=90)  # its own pending entries, read again
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=30) == 0  # a clean, drained stop
            assert await all_delivered(gw, admitted)
            assert up.posts > n  # entries pending at the kill were delivered again
        orders.send_signal(signal.SIGTERM)
        assert orders.wait(timeout=30) == 0
    db = open_orders_db(db_url)
    await db.open()
    try:
        stored = {o.order_no: o.units for o in await db.list_orders(sku)}
    finally:
        await db.close()
    assert stored == admitted  # each admitted purchase stored exactly once


# -- helpers ------------------------------------------------------------------------------

def _sample(relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


async def _true(value: bool) -> bool:
    return value


async def _status_is(gw, order_no: str, status: str) -> bool:
    return (await statuses(gw, [order_no]))[order_no] == status


async def _stored_count_is(service, sku: str, n: int) -> bool:
    return len(await service.db.list_orders(sku)) == n



@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``python -m gateway <args>``, killed on the way out if still running."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_http(url: str) -> None:
    async def answers() -> bool:
        try:
            async with ClientSession() as session, session.get(url) as resp:
                return resp.status == 200
        except OSError:
            return False

    await eventually(answers, f"{url} answers", timeout=30)


@pytest.mark.parametrize("status, body, verdict", [
    (201, b"", Verdict(True)),
    (200, b"not json", Verdict(True)),
    (409, b'{"code":"ORDER_EXISTS"}', Verdict(True)),
    (409, b"", Verdict(True)),
    (409, b'{"code":"UNIT_TAKEN","units":[4,9]}', Verdict(False, "UNIT_TAKEN", (4,), 409)),
    (409, b'{"code":"UNIT_TAKEN"}', Verdict(False, "UNIT_TAKEN", (3, 4), 409)),  # keep all back
    (422, b'{"code":"AMOUNT"}', Verdict(False, "422 AMOUNT", status=422)),
    (400, b"<html>", Verdict(False, "400", status=400)),
    # Not a refusal of the order: the relay's credentials (a configuration fault).
    (401, b'{"code":"UNAUTHENTICATED"}', Verdict(False, "401 UNAUTHENTICATED", status=401,
                                                 misconfigured=True)),
    (403, b"", Verdict(False, "403", status=403, misconfigured=True)),
    (500, b"", None), (503, b"", None), (429, b"", None), (408, b"", None), (302, b"", None),
])
def test_answers_are_judged_by_the_contract(status: int, body: bytes, verdict):
    assert judge(status, body, (3, 4)) == verdict
