"""The bundled orders service (the reference seckill endpoint), on SQLite and PostgreSQL:
orders stored once, units never twice, payments once per notify_id, shipping guarded by
the order's version.

"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from gateway.orders.app import create_orders_app
from gateway.orders.db import NewOrder
from gateway.orders.sqlite import SqliteOrders
from tests.support.delivery import orders_config
from tests.support.orders import Client, new_no


async def test_order_is_stored_once_and_read_back(orders_client: Client):
    order_no = new_no()
    status, body = await orders_client.post_order(order_no, [3, 4])
    assert status == 201 and body["code"] == "CREATED"
    assert body["state"] == "pending" and body["state_version"] == 1
    status, body = await orders_client.post_order(order_no, [3, 4])
    assert status == 409 and body["code"] == "ORDER_EXISTS"
    status, body = await orders_client.get(order_no)
    assert status == 200
    assert body == {"code": "OK", "order_no": order_no, "sku": "sku-1", "user_id": 42,
                    "units": [3, 4], "quantity": 2, "amount": 500, "admitted_at": 1700000000000,
                    "pay_by": None, "state": "pending", "state_version": 1}
    status, body = await orders_client.get(new_no())
    assert status == 404 and body["code"] == "ORDER_NOT_FOUND"


async def test_concurrent_deliveries_of_one_order_store_it_once(orders_client: Client):
    order_no = new_no()
    answers = await asyncio.gather(*(orders_client.post_order(order_no, [1, 2]) for _ in range(20)))
    assert sorted(status for status, _ in answers) == [201] + [409] * 19
    assert {body["code"] for status, body in answers if status == 409} == {"ORDER_EXISTS"}
    assert [o.order_no for o in await orders_client.service.db.list_orders("sku-1")] == [order_no]


async def test_unit_held_by_another_order_is_refused_and_nothing_is_stored(orders_client: Client):
    first, second = new_no(), new_no()
    assert (await orders_client.post_order(first, [1, 2]))[0] == 201
    status, body = await orders_client.post_order(second, [2, 3, 1])
    assert status == 409 and body["code"] == "UNIT_TAKEN" and sorted(body["units"]) == [1, 2]
    assert (await orders_client.get(second))[0] == 404
    # One transaction: the free unit 3 was not kept either, so another order may take it.
    assert (await orders_client.post_order(new_no(), [3]))[0] == 201
    # Units are per SKU.
    assert (await orders_client.post_order(new_no(), [1, 2], sku="sku-2"))[0] == 201


async def test_orders_racing_for_one_unit_have_one_winner(orders_client: Client):
    answers = await asyncio.gather(*(orders_client.post_order(new_no(), [7, 100 + i]) for i in range(10)))
    assert sorted(status for status, _ in answers) == [201] + [409] * 9
    assert all(body["units"] == [7] for status, body in answers if status == 409)
    stored = await orders_client.service.db.list_orders("sku-1")
    assert len(stored) == 1


async def test_same_notification_twenty_times_moves_the_order_once(orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1])
    answers = await asyncio.gather(*(orders_client.notify("n-1", order_no) for _ in range(20)))
    assert {(status, body["code"]) for status, body in answers} == {(200, "OK")}
    assert sum(not body["duplicate"] for _, body in answers) == 1
    status, body = await orders_client.get(order_no)
    assert body["state"] == "paid" and body["state_version"] == 2  # exactly one transition
    # Another notification for the paid order is recorded without a second move.
    status, body = await orders_client.notify("n-2", order_no)
    assert status == 200 and body["state"] == "paid" and body["state_version"] == 2
    async with orders_client.service.db.transaction(readonly=True) as tx:
        rows = await tx.fetchall("SELECT notify_id FROM payments WHERE order_no = $1", order_no)
    assert sorted(r[0] for r in rows) == ["n-1", "n-2"]


async def test_payment_notification_errors(orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1], amount=500)
    status, body = await orders_client.notify("n-a", order_no, amount=499)
    assert status == 422 and body["code"] == "AMOUNT_MISMATCH"
    status, body = await orders_client.notify("n-b", new_no())
    assert status == 404 and body["code"] == "ORDER_NOT_FOUND"
    assert (await orders_client.get(order_no))[1]["state"] == "pending"  # neither had an effect
    # A failed payment is recorded, and moves nothing.
    status, body = await orders_client.notify("n-c", order_no, status="FAILED")
    assert status == 200 and body["state"] == "pending"
    # The same notify_id for another payment is not a repeat.
    status, body = await orders_client.notify("n-c", order_no, status="SUCCESS")
    assert status == 409 and body["code"] == "NOTIFY_ID_REUSED"
    status, body = await orders_client.notify_raw(b'{"notify_id": "x"}')
    assert status == 400 and body["code"] == "BAD_REQUEST"


async def test_shipping_is_guarded_by_state_and_version(orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1])
    status, body = await orders_client.ship(order_no, None)
    assert status == 428 and body["code"] == "PRECONDITION_REQUIRED"
    status, body = await orders_client.ship(order_no, 1)
    assert status == 409 and body["code"] == "INVALID_STATE" and body["state"] == "pending"
    await orders_client.notify("n-1", order_no)
    status, body = await orders_client.ship(order_no, 1)
    assert status == 412 and body["code"] == "PRECONDITION_FAILED" and body["state_version"] == 2
    status, body = await orders_client.ship(new_no(), 1)
    assert status == 404
    status, body = await orders_client.ship(order_no, "abc")
    assert status == 400
    # Two clerks ship with the version they read: one wins.
    answers = await asyncio.gather(*(orders_client.ship(order_no, '"2"') for _ in range(5)))
    assert sorted(status for status, _ in answers) == [200, 412, 412, 412, 412]
    status, body = await orders_client.get(order_no)
    assert body["state"] == "shipped" and body["state_version"] == 3
    status, body = await orders_client.ship(order_no, 3)
    assert status == 409 and body["code"] == "INVALID_STATE"


@pytest.mark.parametrize("body", [
    {"order_no": "x"},
    {"order_no": "a b", "sku": "s", "user_id": 1, "units": [1], "quantity": 1, "amount": 0},
    {"order_no": "o1", "sku": "s", "user_id": -1, "units": [1], "quantity": 1, "amount": 0},
    {"order_no": "o1", "sku": "s", "user_id": 1, "units": [1, 1], "quantity": 2, "amount": 0},
    {"order_no": "o1", "sku": "s", "user_id": 1, "units": [1], "quantity": 2, "amount": 0},
    {"order_no": "o1", "sku": "s", "user_id": 1, "units": [0], "quantity": 1, "amount": 0},
    {"order_no": "o1", "sku": "s", "user_id": 1, "units": [], "quantity": 0, "amount": 0},
    [1, 2],
])
async def test_malformed_orders_are_refused(orders_client: Client, body):
    status, answer = await orders_client.call("POST", "/orders", body)
    assert status == 400 and answer["code"] == "BAD_REQUEST"


async def test_every_answer_is_json_with_a_code(orders_client: Client):
    status, body = await orders_client.post_order("o-1", [1], headers={"Idempotency-Key": "o-2"})
    assert status == 400  # the key must name the order it comes with
    async with orders_client.session.post(orders_client.service.url("/orders"), data=b"{nope",
                                   headers=orders_client.service.auth) as resp:
        assert resp.status == 400 and (await resp.json())["code"] == "BAD_REQUEST"
    assert (await orders_client.call("GET", "/nowhere"))[1]["code"] == "NOT_FOUND"
    assert (await orders_client.call("PUT", "/orders"))[1]["code"] == "METHOD_NOT_ALLOWED"
    assert (await orders_client.call("GET", "/healthz")) == (200, {"code": "OK", "database": "up",
                                                            "releases_pending": 0})


async def test_schema_has_the_names_the_verifier_reads(orders_client: Client):
    await orders_client.post_order("o-1", [5])
    await orders_client.notify("n-1", "o-1")
    async with orders_client.service.db.transaction(readonly=True) as tx:
        order = await tx.fetchone(
            "SELECT order_no, sku, user_id, quantity, amount, units, admitted_at, state, "
            "state_version, created_at FROM orders")
        unit = await tx.fetchone("SELECT sku, unit, order_no FROM order_units")
        payment = await tx.fetchone("SELECT notify_id, order_no, amount, received_at FROM payments")
    assert order[:9] == ("o-1", "sku-1", 42, 1, 500, "5", 1700000000000, "paid", 2)
    assert unit == ("sku-1", 5, "o-1")
    assert payment[:3] == ("n-1", "o-1", 500)


async def test_a_locked_sqlite_database_answers_503(tmp_path):
    """Busy past the busy timeout is "unavailable" (the relay retries it), never a 500."""
    path = str(tmp_path / "orders.db")
    db = SqliteOrders(path, busy_timeout_ms=50)
    async with ClientSession() as session:
        config = orders_config()
        server = TestServer(create_orders_app(db, config))
        await server.start_server()
        # The service writes in the background too (expiry): wait for our turn.
        blocker = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            async with session.post(server.make_url("/orders"), json={
                    "order_no": "o-1", "sku": "s", "user_id": 1, "units": [1], "quantity": 1,
                    "amount": 0}, headers={"Authorization": f"Bearer {config.orders_token}"}) as resp:
                assert resp.status == 503 and (await resp.json())["code"] == "UNAVAILABLE"
                assert "Retry-After" in resp.headers
            blocker.execute("ROLLBACK")
            result = await db.insert_order(NewOrder("o-1", "s", 1, (1,), 1, 0))
            assert result.order is not None and result.order.units == (1,)
        finally:
            blocker.close()
            await server.close()


async def test_a_cancelled_request_leaves_the_store_usable(orders_client: Client):
    """A handler cancelled mid-transaction (the orders_client went away) must not leave the
    connection inside a transaction, or every later request would fail."""
    db = orders_client.service.db
    for step in range(4):  # cancel at successive points of the transaction
        task = asyncio.create_task(db.insert_order(NewOrder(f"c-{step}", "sku-c", 1, (step + 1,), 1, 0)))
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    result = await db.insert_order(NewOrder("after", "sku-c", 1, (99,), 1, 0))
    assert result.order is not None and result.order.order_no == "after"
