"""A sale's life through HTTP: its window, the payment deadline, cancellation and units
that come back and are sold again (the gateway with its relay, the bundled orders
service on SQLite and PostgreSQL, Redis standalone and Cluster)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiohttp import ClientSession

from devtools.processes import free_port
from gateway.clock import now_ms, parse_rfc3339, to_rfc3339
from gateway.orders import signing
from tests.support.api import Api, Backend, serve
from tests.support.delivery import ORDERS_TOKEN, PAYMENT_SECRET, eventually, orders_service
from tests.support.faults import Proxied


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def _until_ms(when: int) -> None:
    await asyncio.sleep(max(0.0, (when - now_ms()) / 1000 + 0.05))


# -- the window ---------------------------------------------------------------------------------

async def test_before_the_start_nothing_is_recorded_and_no_redis_call_is_made(proxied: Proxied,
                                                                                  sku: str) -> None:
    settings = proxied.backend.settings(token_secret="lifecycle-secret")
    async with serve(settings) as api:
        assert await api.gateway.started(30)  # its start-up work (scripts loaded) is done
        created = await api.create_sale(sku, 5, starts_at=_at(2.5))
        assert created["starts_at"] == to_rfc3339(parse_rfc3339(created["starts_at"]))
        token = await api.token(3)  # tokens can be had before the start
        status, body, headers = await api.buy(sku, 3, token)  # (fills this process's memory)
        assert (status, body["code"]) == (403, "SALE_NOT_STARTED"), body
        assert body["starts_at"] == created["starts_at"] and "server_time" in body
        assert 1 <= int(headers["Retry-After"]) <= 3
        tokens = {u: await api.token(u) for u in range(10, 60)}
        before = sum(p.stats.commands for p in proxied.proxies)
        answers = await asyncio.gather(*(api.buy(sku, u, t) for u, t in tokens.items()))
        assert {(s, b["code"]) for s, b, _ in answers} == {(403, "SALE_NOT_STARTED")}
        assert sum(p.stats.commands for p in proxied.proxies) == before, "early buyers cost Redis calls"
        await _until_ms(parse_rfc3339(created["starts_at"]))
        status, body, _ = await api.buy(sku, 3, token)  # the same key, good at the start
        assert (status, body["code"]) == (200, "OK"), body


async def test_after_the_end_nothing_is_sold(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        created = await api.create_sale(sku, 5, ends_at=_at(1.0))
        assert (await api.buy_with_token(sku, 1))[0] == 200
        await _until_ms(parse_rfc3339(created["ends_at"]))
        token = await api.token(2)
        status, body, _ = await api.buy(sku, 2, token)
        assert (status, body["code"]) == (410, "SALE_ENDED"), body
        assert (await api.sale(sku))["sold"] == 1


async def test_the_script_holds_the_window_when_a_process_is_wrong_about_it(backend: Backend,
                                                                             sku: str) -> None:
    """A process whose memory (or clock) says the sale is open cannot admit outside it."""
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 5, starts_at=_at(30))
        gw = api.gateway
        sale = await gw.sales.get(sku)
        assert sale is not None
        gw.sales._entries[sku].sale = replace(sale, starts_at=0)  # a stale memory
        outcome = await api.buy(sku, 1, "key-stale-0001")
        assert (outcome[0], outcome[1]["code"]) == (403, "SALE_NOT_STARTED"), outcome[1]
        assert (await api.sale(sku))["sold"] == 0


@pytest.mark.parametrize("body, field", [
    ({"stock": 5, "starts_at": _at(60), "ends_at": _at(30)}, "ends_at"),
    ({"stock": 5, "ends_at": _at(-5)}, "ends_at"),
    ({"stock": 5, "starts_at": "2026-12-01 12:00"}, "starts_at"),
    ({"stock": 5, "starts_at": "2026-12-01T12:00:00"}, "starts_at"),
    ({"stock": 5, "ends_at": 1796126400}, "ends_at"),
    ({"stock": 5, "payment_ttl": -1}, "payment_ttl"),
    ({"stock": 5, "waiting_room": {"admit_rate": 0}}, "admit_rate"),
    ({"stock": 5, "waiting_room": {"admit_rate": -3}}, "admit_rate"),
    ({"stock": 5, "waiting_room": 5}, "waiting_room"),
])
async def test_bad_lifecycle_settings_are_400_naming_the_field(api: Api, sku: str, body: dict,
                                                               field: str) -> None:
    resp = await api.client.put(f"/admin/sales/{sku}", json=body, headers=api.admin)
    answer = await resp.json()
    assert resp.status == 400 and answer["code"] == "BAD_REQUEST" and field in answer["message"], answer


# -- releases at the gateway ----------------------------------------------------------------------

async def test_a_release_puts_the_units_back_once(api: Api, sku: str) -> None:
    await api.create_sale(sku, 1, shards=4, payment_ttl=60)
    status, bought, _ = await api.buy_with_token(sku, 1)
    assert status == 200 and (await api.buy_with_token(sku, 2))[1]["code"] == "SOLD_OUT"
    path = f"/admin/orders/{bought['order_no']}/release"
    resp = await api.client.post(path, json={"reason": "expired"}, headers=api.admin)
    released = await resp.json()
    assert resp.status == 200 and (released["status"], released["release_reason"]) == ("released", "expired")
    view = await api.sale(sku)
    assert (view["remaining"], view["sold"], view["released"], view["sold_out"]) == (1, 0, 1, False)
    resp = await api.client.get(f"/api/orders/{bought['order_no']}", headers={"X-User-Id": "1"})
    assert (await resp.json())["status"] == "released"
    # A repeat moves nothing and answers the same.
    again = await api.client.post(path, json={"reason": "cancelled"}, headers=api.admin)
    assert again.status == 200 and await again.json() == released
    assert (await api.sale(sku))["released"] == 1
    # The next buyers get the unit: the same one, sold again; the first buyer may buy again.
    status, resold, _ = await api.buy_with_token(sku, 3)
    assert (status, resold["units"]) == (200, bought["units"])
    assert (await api.buy_with_token(sku, 1))[1]["code"] == "SOLD_OUT"


async def test_release_needs_the_admin_token_a_reason_and_a_known_order(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        await api.create_sale(sku, 2)
        _, bought, _ = await api.buy_with_token(sku, 1)
        path = f"/admin/orders/{bought['order_no']}/release"
        assert (await api.client.post(path, json={"reason": "expired"})).status == 401
        resp = await api.client.post(path, json={"reason": "lost"}, headers=api.admin)
        assert resp.status == 400
        resp = await api.client.post(f"/admin/orders/0-{uuid.uuid4().hex}/release",
                                     json={"reason": "expired"}, headers=api.admin)
        assert (resp.status, (await resp.json())["code"]) == (404, "ORDER_NOT_FOUND")
    async with serve(backend.settings(admin_token=None)) as api:
        resp = await api.client.post(path, json={"reason": "expired"})
        assert resp.status == 403


# -- the whole life, with the orders service --------------------------------------------------------

async def _pay(session: ClientSession, orders_url: str, order_no: str, amount: int) -> tuple[int, dict]:
    body = orjson.dumps({"notify_id": f"n-{uuid.uuid4().hex[:8]}", "order_no": order_no,
                         "amount": amount, "status": "SUCCESS"})
    headers = {"Content-Type": "application/json",
               signing.HEADER: signing.sign(PAYMENT_SECRET, body, int(time.time()))}
    async with session.post(f"{orders_url}/payments/notify", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def _order_state(session: ClientSession, orders_url: str, order_no: str) -> str:
    async with session.get(f"{orders_url}/orders/{order_no}",
                           headers={"Authorization": f"Bearer {ORDERS_TOKEN}"}) as resp:
        return (await resp.json()).get("state", "") if resp.status == 200 else ""


async def test_unpaid_orders_expire_cancelled_ones_come_back_and_units_sell_again(
        backend: Backend, database_url: str, sku: str) -> None:
    port = free_port()
    async with orders_service(database_url, gateway_url=f"http://127.0.0.1:{port}") as orders:
        base = orders.url("/").rstrip("/")
        settings = backend.settings(relay=True, upstream_url=orders.orders_url,
                                    upstream_token=ORDERS_TOKEN, key_mode="client")
        async with serve(settings, port=port) as api, ClientSession() as session:
            await api.create_sale(sku, 3, shards=2, price=700, payment_ttl=6)
            first = [(await api.buy(sku, u, f"key-first-{u:06d}"))[1] for u in (1, 2, 3)]
            assert [b["code"] for b in first] == ["OK"] * 3
            assert (await api.buy(sku, 4, "key-first-000004"))[1]["code"] == "SOLD_OUT"
            payer, canceller, abandoner = first

            async def state(order: dict, wanted: str) -> bool:
                return await _order_state(session, base, order["order_no"]) == wanted

            async def gateway_status(order: dict) -> str:
                resp = await api.client.get(f"/api/orders/{order['order_no']}",
                                            headers={"X-User-Id": str(order["user_id"])})
                return (await resp.json())["status"]

            for order in first:
                await eventually(lambda o=order: _is(gateway_status(o), "delivered"), "delivered")
            assert (await _pay(session, base, payer["order_no"], 700))[0] == 200
            async with session.post(f"{base}/orders/{canceller['order_no']}/cancel",
                                    headers={"Authorization": f"Bearer {ORDERS_TOKEN}"}) as resp:
                assert resp.status == 200

            await eventually(lambda: _is(gateway_status(canceller), "released"), "cancel released")
            await eventually(lambda: state(abandoner, "expired"), "the unpaid order expired")
            await eventually(lambda: _is(gateway_status(abandoner), "released"), "expiry released")
            assert await gateway_status(payer) == "delivered"  # a paid order is never released
            # A late payment for the expired order is refused and listed for a refund.
            status, late = await _pay(session, base, abandoner["order_no"], 700)
            assert (status, late["code"]) == (409, "ORDER_CLOSED")
            view = await api.sale(sku)
            assert (view["sold"], view["remaining"], view["released"]) == (1, 2, 2)
            # The two units come back to buyers: the same unit numbers, new orders.
            again = [(await api.buy(sku, u, f"key-again-{u:06d}"))[1] for u in (5, 6, 7)]
            assert sorted(b["code"] for b in again) == ["OK", "OK", "SOLD_OUT"]
            resold = sorted(u for b in again if b["code"] == "OK" for u in b["units"])
            assert resold == sorted(canceller["units"] + abandoner["units"])
            for order in (b for b in again if b["code"] == "OK"):
                await eventually(lambda o=order: state(o, "pending"), "the resold units are stored")


async def _is(value: object, wanted: str) -> bool:
    return await value == wanted  # type: ignore[misc]


async def test_an_order_released_before_delivery_is_never_delivered(backend: Backend, sqlite_url: str,
                                                                    sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:  # no relay yet
        await api.create_sale(sku, 2, shards=1)
        _, bought, _ = await api.buy(sku, 1, "key-never-000001")
        resp = await api.client.post(f"/admin/orders/{bought['order_no']}/release",
                                     json={"reason": "cancelled"}, headers=api.admin)
        assert resp.status == 200
        _, other, _ = await api.buy(sku, 2, "key-never-000002")
        async with orders_service(sqlite_url) as orders:
            settings = api.gateway.settings.replace(relay=True, upstream_url=orders.orders_url,
                                                    upstream_token=ORDERS_TOKEN)
            async with serve(settings) as relaying, ClientSession() as session:
                base = orders.url("/").rstrip("/")
                await eventually(lambda: _is(_order_state(session, base, other["order_no"]), "pending"),
                                 "the other order is delivered")
                assert await _order_state(session, base, bought["order_no"]) == ""
                assert relaying.gateway.relay is not None
