"""The answers a flash crowd gets most, from process memory: before the start (see
test_lifecycle) and after a sell-out. Correct first: a buyer's key still gets its own
outcome, a key answered from memory buys when units come back, no unit is sold twice."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.api import Api, serve
from tests.support.faults import Proxied


async def _fast_path_on(api: Api, sku: str, user: int) -> None:
    gw = api.gateway
    for _ in range(500):
        sale = await gw.sales.get(sku)
        if sale is not None and gw.sold_out.answers(sale, user):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the process never learned that the sale is sold out")


def _script_calls(proxied: Proxied) -> int:
    return sum(p.stats.by_command[name] for p in proxied.proxies for name in ("EVALSHA", "EVAL"))


@pytest.mark.parametrize("duplicates", ["conflict", "replay"])
async def test_after_a_sell_out_only_buyers_reach_redis(proxied: Proxied, sku: str,
                                                        duplicates: str) -> None:
    settings = proxied.backend.settings(key_mode="client", duplicate_response=duplicates)
    async with serve(settings) as api:
        await api.create_sale(sku, 2, shards=2)
        bought = {u: (await api.buy(sku, u, f"key-buyer-{u:06d}"))[1] for u in (1, 2)}
        assert [b["code"] for b in bought.values()] == ["OK", "OK"]
        status, body, _ = await api.buy(sku, 3, "key-late-000003")  # recorded: it met the script
        assert (status, body["code"]) == (410, "SOLD_OUT")
        await _fast_path_on(api, sku, 4)

        # Every purchase that reaches Redis starts with a script call; the sold-out
        # watcher's reads (HGETALL, every 0.2 s) may fall in the window and are not counted.
        before = _script_calls(proxied)
        crowd = await asyncio.gather(*(api.buy(sku, u, f"key-crowd-{u:06d}") for u in range(10, 60)))
        assert {(s, b["code"]) for s, b, _ in crowd} == {(410, "SOLD_OUT")}
        assert _script_calls(proxied) == before, "the crowd cost Redis calls"
        assert await api.fast_path_answers() == 50

        # A buyer's key goes to Redis and gets its own outcome back.
        status, again, headers = await api.buy(sku, 1, "key-buyer-000001")
        if duplicates == "conflict":
            assert (status, again["code"], again["original"]["body"]) == (409, "IDEMPOTENT_CONFLICT",
                                                                           bought[1])
        else:
            assert (status, again, headers["Idempotent-Replayed"]) == (200, bought[1], "true")
        # So does a user who met the script after the sell-out: its 410 is recorded.
        status, again, _ = await api.buy(sku, 3, "key-late-000003")
        assert status in (409, 410) and (again.get("original") or {}).get("status", 410) == 410


async def test_a_key_answered_from_memory_buys_when_units_come_back(proxied: Proxied, sku: str) -> None:
    async with serve(proxied.backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 1, shards=4)
        status, first, _ = await api.buy(sku, 1, "key-first-000001")
        assert status == 200
        assert (await api.buy(sku, 2, "key-second-00002"))[0] == 410
        await _fast_path_on(api, sku, 5)
        status, body, _ = await api.buy(sku, 5, "key-memory-00005")  # from memory, not recorded
        assert (status, body["code"]) == (410, "SOLD_OUT") and await api.fast_path_answers() == 1
        resp = await api.client.post(f"/admin/orders/{first['order_no']}/release",
                                     json={"reason": "cancelled"}, headers=api.admin)
        assert resp.status == 200
        # Every process learns it within its watch interval; the same key then buys.
        for _ in range(200):
            status, body, _ = await api.buy(sku, 5, "key-memory-00005")
            if status == 200:
                break
            await asyncio.sleep(0.01)
        assert (status, body["units"]) == (200, first["units"]), body
        view = await api.sale(sku)
        assert (view["sold"], view["remaining"], view["released"]) == (1, 0, 1)
        # The unit is sold once: the next buyer is refused.
        assert (await api.buy(sku, 6, "key-sixth-000006"))[1]["code"] == "SOLD_OUT"
