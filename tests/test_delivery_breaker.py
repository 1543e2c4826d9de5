"""A wrong upstream must not empty a sale: the relay pauses instead of giving every
admitted order's units back (a wrong URL refusing everything, or credentials it does
not accept), and resumes once the endpoint accepts an order again."""

from __future__ import annotations

import asyncio

from gateway.delivery.breaker import Breaker
from tests.support.api import Backend, new_sku, serve
from tests.support.delivery import ORDERS_TOKEN, admit, eventually, orders_service, running_relay, statuses, upstream


async def _counts(gw, order_nos) -> dict[str, int]:
    found: dict[str, int] = {}
    for status in (await statuses(gw, order_nos)).values():
        found[status] = found.get(status, 0) + 1
    return found


async def test_a_wrong_endpoint_pauses_delivery_and_gives_nothing_back(standalone: Backend,
                                                                       sqlite_url: str) -> None:
    settings = standalone.settings(key_mode="client")
    sku = new_sku()
    async with orders_service(sqlite_url) as orders, serve(settings) as api, \
            upstream(orders.orders_url, reject_with=404) as up:
        await api.create_sale(sku, 40, shards=2)
        admitted = await admit(api.gateway, sku, range(40))
        async with running_relay(settings, up.url, pause_after=3, probe_every=0.3,
                                 concurrency=1) as relay:
            await eventually(lambda: _true(relay.breaker.paused), "delivery paused")
            await asyncio.sleep(1.0)  # a few probes, all refused: still paused
            counts = await _counts(api.gateway, admitted)
            assert counts.get("rejected", 0) <= 2, counts  # at most K-1 before the pause
            assert relay.state()["state"] == "paused"
            assert "404" in relay.state()["reason"]
            assert b"seckill_relay_paused 1.0" in relay.metrics.render()
            view = await api.sale(sku)
            assert view["remaining"] == counts.get("rejected", 0)  # nothing more went back
            # The endpoint is fixed: a probe is accepted and delivery resumes by itself.
            up.reject_with = 0
            await eventually(lambda: _true(not relay.breaker.paused), "delivery resumed")
            await eventually(lambda: _all(api.gateway, admitted, {"delivered", "rejected"}),
                             "everything settled")
        counts = await _counts(api.gateway, admitted)
        assert counts.get("rejected", 0) <= 2 and sum(counts.values()) == 40, counts


async def test_refused_credentials_pause_at_once_and_an_admin_resumes(standalone: Backend,
                                                                      sqlite_url: str) -> None:
    settings = standalone.settings(key_mode="client", relay=True, admin_token="test-admin-token")
    sku = new_sku()
    async with orders_service(sqlite_url) as orders:
        wrong = settings.replace(upstream_url=orders.orders_url, upstream_token="not-the-token")
        async with serve(wrong) as api:
            gw = api.gateway
            await api.create_sale(sku, 5, shards=1)
            admitted = await admit(gw, sku, range(5))
            assert gw.relay is not None
            await eventually(lambda: _true(gw.relay.breaker.paused), "delivery paused")  # type: ignore[union-attr]
            health = await (await api.client.get("/healthz")).json()
            assert health["delivery"]["state"] == "paused" and "401" in health["delivery"]["reason"]
            assert (await _counts(gw, admitted)) == {"admitted": 5}  # nothing given back
            assert (await api.sale(sku))["remaining"] == 0
            resp = await api.client.post("/admin/delivery/resume", headers=api.admin)
            assert resp.status == 200  # (it pauses again at the next 401: the token is wrong)
    # With the right token the same orders are delivered: the bearer reaches the endpoint.
    async with orders_service(sqlite_url) as orders, \
            upstream(orders.orders_url) as up, serve(settings.replace(relay=False)) as api:
        async with running_relay(settings, up.url, claim_idle_ms=300):  # (the first relay's entries)
            await eventually(lambda: _all(api.gateway, admitted, {"delivered"}), "delivered")
        assert set(up.authorization) == {f"Bearer {ORDERS_TOKEN}"}


async def test_a_genuine_refusal_among_successes_gives_its_units_back(standalone: Backend,
                                                                      sqlite_url: str) -> None:
    settings = standalone.settings(key_mode="client")
    sku = new_sku()
    async with orders_service(sqlite_url) as orders, serve(settings) as api:
        await api.create_sale(sku, 20, shards=1)
        admitted = await admit(api.gateway, sku, range(20))
        refused = sorted(admitted)[:2]
        async with upstream(orders.orders_url, reject_orders=set(refused)) as up, \
                running_relay(settings, up.url, pause_after=3) as relay:
            await eventually(lambda: _all(api.gateway, admitted, {"delivered", "rejected"}),
                             "everything settled")
            assert not relay.breaker.paused
        assert {no: s for no, s in (await statuses(api.gateway, refused)).items()} == \
            dict.fromkeys(refused, "rejected")
        assert (await api.sale(sku))["remaining"] == 2


def test_the_breaker_counts_refusals_in_a_row_for_distinct_orders() -> None:
    async def run() -> None:
        breaker = Breaker(threshold=3, probe_every=60)
        assert breaker.refused(404, "a", False) and breaker.refused(404, "a", False)  # same order
        assert breaker.refused(404, "b", False)
        breaker.delivered()  # a success resets the count
        assert breaker.refused(404, "c", False) and breaker.refused(422, "d", False)
        assert breaker.refused(422, "e", False)  # another status: counted apart
        assert not breaker.refused(422, "f", False) and breaker.paused
        assert not breaker.refused(422, "g", False)  # paused: nothing more given back
        breaker.resume()
        assert not breaker.paused and breaker.refused(422, "h", False)
        assert not breaker.refused(401, "i", True) and breaker.paused  # credentials: at once

    asyncio.run(run())


async def _true(value: bool) -> bool:
    return value


async def _all(gw, order_nos, wanted: set[str]) -> bool:
    return set((await statuses(gw, order_nos)).values()) <= wanted
