"""The sale lifecycle at the orders service: cancel, expiry past pay_by, late payments
(409 ORDER_CLOSED, due for refund), the release of closed orders' units at the gateway
(a fake one here, that records every call), and the re-sale of released units. On
SQLite and PostgreSQL, over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gateway.orders.config import ReleaseConfig
from tests.support.api import ADMIN_TOKEN
from tests.support.delivery import eventually, orders_service
from tests.support.orders import Client, new_no

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ReleaseCall:
    order_no: str
    reason: str
    status: int  # what the fake gateway answered


@dataclass
class FakeGateway:
    """The gateway's ``POST /admin/orders/{no}/release``: 503 to the first ``fail_first``
    calls, then 200, or 404 for orders in ``unknown``; 401 without the admin token."""

    fail_first: int = 0
    unknown: set[str] = field(default_factory=set)
    hold_first: bool = False  # never answer the first call
    calls: list[ReleaseCall] = field(default_factory=list)
    held: int = 0
    url: str = ""

    async def release(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            return web.json_response({"code": "UNAUTHENTICATED"}, status=401)
        order_no = request.match_info["order_no"]
        reason = (await request.json())["reason"]
        if self.hold_first and not self.held:
            self.held += 1
            await asyncio.Event().wait()
        status = (503 if len(self.calls) < self.fail_first
                  else 404 if order_no in self.unknown else 200)
        self.calls.append(ReleaseCall(order_no, reason, status))
        return web.json_response({"code": {200: "OK", 404: "ORDER_NOT_FOUND"}.get(status, "UNAVAILABLE")},
                                 status=status)

    def acks(self) -> Counter[str]:
        """Releases acknowledged (200), per order."""
        return Counter(call.order_no for call in self.calls if call.status == 200)

    def reasons(self) -> dict[str, str]:
        return {call.order_no: call.reason for call in self.calls}


@contextlib.asynccontextmanager
async def fake_gateway(**behaviour) -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway(**behaviour)
    app = web.Application()
    app.router.add_post("/admin/orders/{order_no}/release", gateway.release)
    server = TestServer(app)
    await server.start_server()
    gateway.url = str(server.make_url("/")).rstrip("/")
    try:
        yield gateway
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def service_client(database_url: str, gateway_url: str | None = None,
                         **tuning) -> AsyncIterator[Client]:
    async with orders_service(database_url, gateway_url, **tuning) as service, \
            ClientSession() as session:
        yield Client(service, session)


async def state_of(orders_client: Client, order_no: str) -> str:
    return (await orders_client.get(order_no))[1]["state"]


async def until_state(orders_client: Client, order_no: str, state: str) -> None:
    async def reached() -> bool:
        return await state_of(orders_client, order_no) == state

    await eventually(reached, f"{order_no} is {state}")


async def until_released(gateway: FakeGateway, *clients: Client) -> None:
    """Until no service has a release left to send."""
    async def drained() -> bool:
        return all([await c.releases_pending() == 0 for c in clients])

    await eventually(drained, "every release is acknowledged")


# -- cancel ---------------------------------------------------------------------------------

async def test_cancel_moves_a_pending_order_once_and_releases_its_units(database_url: str):
    async with fake_gateway() as gateway, service_client(database_url, gateway.url) as orders_client:
        order_no = new_no()
        await orders_client.post_order(order_no, [3, 4])
        status, body = await orders_client.cancel(order_no)
        assert status == 200 and body["code"] == "OK" and not body["duplicate"]
        assert body["state"] == "cancelled" and body["state_version"] == 2
        # A repeat is the same result, and moves nothing.
        status, body = await orders_client.cancel(order_no)
        assert status == 200 and body["duplicate"] and body["state_version"] == 2
        await until_released(gateway, orders_client)
        assert gateway.acks() == {order_no: 1} and gateway.reasons() == {order_no: "cancelled"}
        status, body = await orders_client.cancel(new_no())
        assert status == 404 and body["code"] == "ORDER_NOT_FOUND"


async def test_paid_and_shipped_orders_do_not_cancel(database_url: str):
    async with fake_gateway() as gateway, service_client(database_url, gateway.url) as orders_client:
        order_no = new_no()
        await orders_client.post_order(order_no, [1])
        await orders_client.notify("n-1", order_no)
        status, body = await orders_client.cancel(order_no)
        assert (status, body["code"], body["state"]) == (409, "INVALID_STATE", "paid")
        assert (await orders_client.ship(order_no, 2))[0] == 200
        status, body = await orders_client.cancel(order_no)
        assert (status, body["code"], body["state"]) == (409, "INVALID_STATE", "shipped")
        assert (await orders_client.get(order_no))[1]["state_version"] == 3
        assert await orders_client.releases_pending() == 0 and gateway.calls == []


# -- late payments ----------------------------------------------------------------------------

async def _late_payments_are_refused_and_listed(orders_client: Client, order_no: str, state: str) -> None:
    status, body = await orders_client.notify("n-late", order_no)
    assert (status, body["code"], body["state"]) == (409, "ORDER_CLOSED", state)
    assert not body["duplicate"]
    status, body = await orders_client.notify("n-late", order_no)  # the provider retries
    assert (status, body["code"], body["duplicate"]) == (409, "ORDER_CLOSED", True)
    status, body = await orders_client.notify("n-late-2", order_no)  # and pays twice
    assert (status, body["code"]) == (409, "ORDER_CLOSED")
    # A failed payment brought no money: recorded, nothing to refund.
    status, body = await orders_client.notify("n-failed", order_no, status="FAILED")
    assert (status, body["state"]) == (200, state)
    refunds = [r for r in await orders_client.refunds() if r["order_no"] == order_no]
    assert sorted(r["notify_id"] for r in refunds) == ["n-late", "n-late-2"]
    assert all(r["amount"] == 500 and r["received_at"].endswith("Z") for r in refunds)
    _, order = await orders_client.get(order_no)
    assert order["state"] == state and order["state_version"] == 2  # never live again


async def test_late_payment_after_cancel_is_409_order_closed_and_due_for_refund(orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1])
    await orders_client.cancel(order_no)
    await _late_payments_are_refused_and_listed(orders_client, order_no, "cancelled")


async def test_late_payment_after_expiry_is_409_order_closed_and_due_for_refund(orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1], pay_by=now_ms() - 1)
    await until_state(orders_client, order_no, "expired")
    await _late_payments_are_refused_and_listed(orders_client, order_no, "expired")


# -- expiry and releases ----------------------------------------------------------------------

async def test_an_unpaid_order_expires_after_pay_by_and_is_released(database_url: str):
    async with fake_gateway(fail_first=3) as gateway, \
            service_client(database_url, gateway.url) as orders_client:
        due, no_deadline, later = new_no(), new_no(), new_no()
        pay_by = now_ms() + 300
        await orders_client.post_order(due, [1], pay_by=pay_by)
        await orders_client.post_order(no_deadline, [2])
        await orders_client.post_order(later, [3], pay_by=now_ms() + 3_600_000)
        _, body = await orders_client.get(due)
        assert body["pay_by"] == pay_by and body["state"] == "pending"
        await until_state(orders_client, due, "expired")
        assert (await orders_client.get(due))[1]["state_version"] == 2
        await until_released(gateway, orders_client)
        assert gateway.acks() == {due: 1} and gateway.reasons() == {due: "expired"}
        assert [call.status for call in gateway.calls] == [503, 503, 503, 200]  # retried
        assert await state_of(orders_client, no_deadline) == await state_of(orders_client, later) == "pending"


async def test_two_services_on_one_database_release_each_expired_order_once(database_url: str):
    # Small batches: the two services' expirers and senders take turns on the queues.
    small = dict(expire_batch=4, releases=ReleaseConfig(poll_every=0.05, batch=3,
                                                        backoff_base=0.02, backoff_cap=0.2))
    async with fake_gateway(fail_first=5) as gateway, \
            service_client(database_url, gateway.url, **small) as a, \
            service_client(database_url, gateway.url, **small) as b:
        order_nos = [new_no() for _ in range(30)]
        pay_by = now_ms() + 200
        for i, order_no in enumerate(order_nos):
            status, _ = await (a, b)[i % 2].post_order(order_no, [i + 1], pay_by=pay_by)
            assert status == 201

        async def all_acknowledged() -> bool:
            return set(gateway.acks()) == set(order_nos)

        await eventually(all_acknowledged, "every expired order is released")
        await until_released(gateway, a, b)
        assert gateway.acks() == Counter({order_no: 1 for order_no in order_nos})
        assert set(gateway.reasons().values()) == {"expired"}
        for order_no in order_nos:
            _, body = await a.get(order_no)
            assert (body["state"], body["state_version"]) == ("expired", 2)


async def test_releases_wait_in_the_database_until_a_gateway_is_configured(database_url: str):
    known, unknown = new_no(), new_no()
    async with service_client(database_url) as orders_client:  # no SECKILL_GATEWAY_URL
        for unit, order_no in enumerate((known, unknown), 1):
            await orders_client.post_order(order_no, [unit])
            await orders_client.cancel(order_no)
        assert await orders_client.releases_pending() == 2
    async with fake_gateway(unknown={unknown}) as gateway, \
            service_client(database_url, gateway.url) as orders_client:
        await until_released(gateway, orders_client)
        # 404: the gateway does not know the order; not retried.
        assert sorted((c.order_no, c.status) for c in gateway.calls) == sorted(
            [(known, 200), (unknown, 404)])


async def test_a_release_cut_short_is_sent_by_another_service_after_its_lease(
        database_url: str):
    leased = dict(releases=ReleaseConfig(poll_every=0.05, lease=1.0, timeout=0.9,
                                         backoff_base=0.02, backoff_cap=0.2))
    order_no = new_no()
    async with fake_gateway(hold_first=True) as gateway:
        async with service_client(database_url, gateway.url, **leased) as first:
            await first.post_order(order_no, [1])
            await first.cancel(order_no)

            async def claimed() -> bool:
                return gateway.held == 1

            await eventually(claimed, "the first service is sending the release")
        # The first service stopped mid-send (as in a crash): its lease runs out.
        async with service_client(database_url, gateway.url, **leased) as second:
            await until_released(gateway, second)
        assert gateway.acks() == {order_no: 1}


# -- races ------------------------------------------------------------------------------------

async def test_pay_cancel_and_expiry_race_and_exactly_one_wins(database_url: str):
    rng = random.Random(7)
    async with fake_gateway() as gateway, \
            service_client(database_url, gateway.url, expire_every=0.005) as orders_client:
        outcomes: dict[str, tuple[str, int, list[str]]] = {}  # order_no -> state, unit, notices
        for unit in range(1, 51):
            order_no = new_no()
            pay_by = rng.choice([None, now_ms() + rng.randint(0, 20)])
            assert (await orders_client.post_order(order_no, [unit], pay_by=pay_by))[0] == 201
            notices = [f"{order_no}-n{i}" for i in range(4)]
            # The calls come a little late (so that the expirer, every 5 ms, wins some
            # rounds), and spread out a little (so that either kind may come first).
            start = rng.uniform(0, 0.03)
            calls = [("pay", _later(start + rng.uniform(0, 0.01), orders_client.notify(n, order_no)))
                     for n in notices]
            calls += [("cancel", _later(start + rng.uniform(0, 0.01), orders_client.cancel(order_no)))
                      for _ in range(4)]
            answers = await asyncio.gather(*(call for _, call in calls))
            _, order = await orders_client.get(order_no)
            assert order["state_version"] == 2, order  # one move from pending, no more
            _check_round(order["state"], [(kind, status, body) for (kind, _), (status, body)
                                          in zip(calls, answers)])
            outcomes[order_no] = (order["state"], unit, notices)

        closed = {no: state for no, (state, _, _) in outcomes.items() if state != "paid"}
        await until_released(gateway, orders_client)
        assert gateway.acks() == Counter(dict.fromkeys(closed, 1))  # paid XOR released
        assert gateway.reasons() == closed
        refunded = {r["notify_id"] for r in await orders_client.refunds()}
        assert refunded == {n for no in closed for n in outcomes[no][2]}
        # A unit is in at most one live order: a closed order's unit sells again.
        for order_no, (state, unit, _) in outcomes.items():
            status, body = await orders_client.post_order(new_no(), [unit])
            assert status == (409 if state == "paid" else 201), (state, body)


async def _later(delay: float, call: Awaitable[T]) -> T:
    await asyncio.sleep(delay)
    return await call


def _check_round(state: str, answers: list[tuple[str, int, dict]]) -> None:
    pays = [(status, body["code"]) for kind, status, body in answers if kind == "pay"]
    cancels = [(status, body) for kind, status, body in answers if kind == "cancel"]
    if state == "paid":
        assert set(pays) == {(200, "OK")}
        assert {(status, body["code"]) for status, body in cancels} == {(409, "INVALID_STATE")}
        return
    assert set(pays) == {(409, "ORDER_CLOSED")}, (state, pays)
    if state == "expired":
        assert {(status, body["code"]) for status, body in cancels} == {(409, "INVALID_STATE")}
        return
    assert state == "cancelled"
    assert {status for status, _ in cancels} == {200}
    assert sum(not body["duplicate"] for _, body in cancels) == 1


# -- re-sale of released units ------------------------------------------------------------------

async def test_a_released_unit_sells_again_and_a_live_one_does_not(orders_client: Client):
    cancelled, expired, paid = new_no(), new_no(), new_no()
    await orders_client.post_order(cancelled, [5])
    await orders_client.post_order(expired, [6], pay_by=now_ms() - 1)
    await orders_client.post_order(paid, [7])
    await orders_client.notify("n-paid", paid)
    await orders_client.cancel(cancelled)
    await until_state(orders_client, expired, "expired")
    resold = {}
    for unit in (5, 6):
        resold[unit] = new_no()
        status, body = await orders_client.post_order(resold[unit], [unit])
        assert status == 201 and body["units"] == [unit]
        # Now the new order holds it.
        status, body = await orders_client.post_order(new_no(), [unit, 9])
        assert (status, body["code"], body["units"]) == (409, "UNIT_TAKEN", [unit])
    status, body = await orders_client.post_order(new_no(), [7])
    assert (status, body["code"], body["units"]) == (409, "UNIT_TAKEN", [7])
    # A late redelivery of the closed order finds it stored: it does not come back.
    status, body = await orders_client.post_order(cancelled, [5])
    assert (status, body["code"]) == (409, "ORDER_EXISTS")
    assert await state_of(orders_client, cancelled) == "cancelled"
    async with orders_client.service.db.transaction(readonly=True) as tx:
        rows = await tx.fetchall("SELECT order_no, live FROM order_units WHERE sku = $1 AND unit = $2",
                                 "sku-1", 5)
    assert sorted((no, bool(live)) for no, live in rows) == sorted(
        [(cancelled, False), (resold[5], True)])
