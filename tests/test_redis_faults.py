"""Redis going away or forgetting its scripts: the gateway fails closed (503, nothing
admitted) and recovers by itself."""

from __future__ import annotations

import asyncio

from tests.support.api import Api, serve


async def _flush_scripts(api: Api) -> None:
    client = api.gateway.store.client
    if hasattr(client, "get_primaries"):
        for node in client.get_nodes():  # replicas too: one may be promoted later
            await client.execute_command("SCRIPT", "FLUSH", target_nodes=node)
    else:
        await client.script_flush()


async def test_script_flush_mid_test(api: Api, sku: str):
    await api.create_sale(sku, 10)
    assert (await api.buy_with_token(sku, 1))[0] == 200
    await _flush_scripts(api)
    status, body, _ = await api.buy_with_token(sku, 2)
    assert status == 200, body
    token = await api.token(3)
    await _flush_scripts(api)
    assert (await api.buy(sku, 3, token))[0] == 200
    status, body, _ = await api.buy(sku, 3, token)
    assert (status, body["code"], body["original"]["status"]) == (409, "IDEMPOTENT_CONFLICT", 200)
    assert (await api.sale(sku))["sold"] == 3


async def test_redis_down_gives_503_and_admits_nothing(backend, sku: str):
    settings = backend.settings(redis_timeout=0.3)
    async with serve(settings) as api:
        await api.create_sale(sku, 10)
        tokens = [await api.token(user) for user in range(1, 21)]
        down, back = _outage(backend)
        await down()
        try:
            results = await asyncio.gather(*(api.buy(sku, u, t) for u, t in enumerate(tokens, 1)))
            for status, body, headers in results:
                assert (status, body["code"]) == (503, "UNAVAILABLE"), body
                assert int(headers["Retry-After"]) >= 1
            resp = await api.client.get("/healthz")
            assert resp.status == 503 and (await resp.json())["code"] == "UNAVAILABLE"
            resp = await api.client.get("/api/token", headers={"X-User-Id": "1"})
            assert resp.status == 200  # tokens need no Redis once the secret is known
        finally:
            await back()
        if backend.mode == "standalone":
            # The restarted server lost everything (it keeps nothing on disk): start over.
            await api.create_sale(sku, 10)
        for attempt in range(50):
            status, body, _ = await api.buy(sku, 1, tokens[0])
            if status != 503:
                break
            await asyncio.sleep(0.2)
        assert status == 200, body
        sale = await api.sale(sku)
        assert sale["sold"] == 1  # nothing was admitted while Redis was away


def _outage(backend):
    """How to make this backend unreachable and bring it back."""
    server = backend.server
    loop = asyncio.get_running_loop()
    if backend.mode == "standalone":
        return (lambda: loop.run_in_executor(None, server.kill),
                lambda: loop.run_in_executor(None, server.restart))

    async def pause():
        for node in server.nodes:
            server.pause(node)

    async def resume():
        for node in server.nodes:
            server.resume(node)
        await loop.run_in_executor(None, server.wait_until_healthy, 30)

    return pause, resume


async def test_a_timeout_says_the_outcome_is_unknown_and_the_same_key_tells_it(standalone_redis, sku):
    """Redis too slow (paused): the script may still run after the gateway stopped
    waiting, so the 503 does not claim "nothing admitted"; the same key, sent again,
    gets the real outcome and never a second purchase."""
    from tests.support.api import Backend

    backend = Backend("standalone", standalone_redis.url, standalone_redis)
    async with serve(backend.settings(redis_timeout=0.3, request_timeout=0.6)) as api:
        await api.create_sale(sku, 5)
        token = await api.token(1)
        await api.sale(sku)
        await api.buy(sku, 2, await api.token(2))  # the sale is in memory: the stall meets the script
        standalone_redis.pause()
        try:
            status, body, headers = await api.buy(sku, 1, token)
        finally:
            standalone_redis.resume()
        assert (status, body["code"], body.get("outcome_unknown")) == (503, "UNAVAILABLE", True)
        assert "Retry-After" in headers
        for _ in range(50):
            status, again, _ = await api.buy(sku, 1, token)
            if status != 503:
                break
            await asyncio.sleep(0.1)
        assert (status, again["code"]) == (200, "OK") or \
            (status, again["code"], again["original"]["status"]) == (409, "IDEMPOTENT_CONFLICT", 200), again
        assert (await api.sale(sku))["sold"] == 2


async def test_a_purchase_stalled_before_its_script_says_nothing_was_admitted(standalone_redis, sku):
    """``outcome_unknown`` only while a purchase script call is unanswered: a purchase
    that stalls reading the sale (this process has never served it) admitted nothing,
    and its 503 says so (no ``outcome_unknown``); the same key then buys, once."""
    from tests.support.api import Backend

    backend = Backend("standalone", standalone_redis.url, standalone_redis)
    settings = backend.settings(redis_timeout=0.3, request_timeout=0.6)
    async with serve(settings) as admin, serve(settings) as cold:
        await admin.create_sale(sku, 5)
        token = await admin.token(1)
        standalone_redis.pause()
        try:
            status, body, headers = await cold.buy(sku, 1, token)
        finally:
            standalone_redis.resume()
        assert (status, body["code"], body.get("outcome_unknown")) == (503, "UNAVAILABLE", None), body
        assert "Retry-After" in headers
        assert (await admin.sale(sku))["sold"] == 0
        for _ in range(50):
            status, body, _ = await cold.buy(sku, 1, token)
            if status != 503:
                break
            await asyncio.sleep(0.1)
        assert (status, body["code"]) == (200, "OK"), body
        assert (await admin.sale(sku))["sold"] == 1
