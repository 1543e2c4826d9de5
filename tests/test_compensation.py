"""compensate.lua and mark_delivered.lua, and what a retry of the key then says."""

from __future__ import annotations

from gateway.store.scripts.compensate import Compensated
from gateway.store.scripts.mark_delivered import Delivered
from tests.support.api import serve


async def _bought(api, sku, user, token):
    status, body, _ = await api.buy(sku, user, token)
    assert status == 200, body
    order = await api.gateway.store.get_order(body["order_no"])
    assert order is not None and order.status == "admitted"
    return body, order


async def test_a_delivered_order_is_never_compensated(api, sku):
    await api.create_sale(sku, 3, shards=1)
    store = api.gateway.store
    body, order = await _bought(api, sku, 1, await api.token(1))
    assert await store.mark_delivered(order) is Delivered.MARKED
    assert await store.mark_delivered(order) is Delivered.UNCHANGED
    assert (await store.compensate(order, "late 4xx")).outcome is Compensated.ALREADY
    sale = await api.sale(sku)
    assert (sale["sold"], sale["remaining"]) == (1, 2)
    assert (await store.get_order(order.order_no)).status == "delivered"


async def test_compensation_returns_units_once_and_keeps_taken_ones(api, sku):
    await api.create_sale(sku, 4, shards=1, per_user_limit=2)
    store = api.gateway.store
    token = await api.token(1)
    status, body, _ = await api.buy(sku, 1, token, 2)
    order = await store.get_order(body["order_no"])
    taken_elsewhere = body["units"][0]
    assert (await store.compensate(order, "UNIT_TAKEN", [taken_elsewhere])).outcome is Compensated.DONE
    assert (await store.compensate(order, "UNIT_TAKEN", [taken_elsewhere])).outcome is Compensated.ALREADY
    sale = await api.sale(sku)
    # One unit back in the shard; the one sold to another order stays sold.
    assert (sale["sold"], sale["remaining"]) == (1, 3)
    assert (await store.get_order(order.order_no)).status == "rejected"
    assert await store.mark_delivered(order) is Delivered.UNCHANGED
    # The key tells the truth; the buyer's limit is free again.
    status, again, _ = await api.buy(sku, 1, token, 2)
    assert again["order_status"] == "rejected" and again["original"]["status"] == 200
    status, rebought, _ = await api.buy_with_token(sku, 1, 2)
    assert status == 200 and taken_elsewhere not in rebought["units"]


async def test_replay_mode_says_what_became_of_the_order(backend, sku):
    async with serve(backend.settings(duplicate_response="replay")) as api:
        await api.create_sale(sku, 2, shards=1)
        token = await api.token(4)
        body, order = await _bought(api, sku, 4, token)
        await api.gateway.store.compensate(order, "refused")
        status, again, headers = await api.buy(sku, 4, token)
        assert (status, again) == (200, body)
        assert headers["Idempotent-Replayed"] == "true" and headers["Order-Status"] == "rejected"
