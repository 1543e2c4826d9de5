"""Rate limits (429 with Retry-After), the in-flight cap and the request deadline."""

from __future__ import annotations

import asyncio

from tests.support.api import serve


async def test_per_user_rate_limit(backend, sku):
    async with serve(backend.settings(rate_limit_user=2.0)) as api:
        await api.create_sale(sku, 100)
        statuses = []
        for _ in range(6):
            resp = await api.client.get("/api/token", headers={"X-User-Id": "5"})
            statuses.append(resp.status)
            if resp.status == 429:
                body = await resp.json()
                assert body["code"] == "RATE_LIMITED" and int(resp.headers["Retry-After"]) >= 1
        assert statuses[:2] == [200, 200] and 429 in statuses
        # Another user is not affected.
        resp = await api.client.get("/api/token", headers={"X-User-Id": "6"})
        assert resp.status == 200


async def test_per_address_rate_limit(backend, sku):
    async with serve(backend.settings(rate_limit_ip=3.0)) as api:
        statuses = [(await api.client.get("/api/token", headers={"X-User-Id": str(u)})).status
                    for u in range(10)]
        assert statuses[:3] == [200] * 3 and statuses.count(429) >= 5


async def test_rate_limited_purchase_admits_nothing(backend, sku):
    async with serve(backend.settings(rate_limit_user=1.0)) as api:
        await api.create_sale(sku, 10, per_user_limit=5)
        token = await api.token(9)           # takes the one token in the bucket
        status, body, headers = await api.buy(sku, 9, token)
        assert (status, body["code"]) == (429, "RATE_LIMITED") and "Retry-After" in headers
        assert (await api.sale(sku))["sold"] == 0


async def test_in_flight_cap_sheds_load_with_503(backend, sku):
    server = backend.server
    async with serve(backend.settings(max_in_flight=5, redis_timeout=0.5, request_timeout=1.5)) as api:
        await api.create_sale(sku, 100)
        tokens = [await api.token(u) for u in range(40)]
        nodes = getattr(server, "nodes", None)
        pause = (lambda: [server.pause(n) for n in nodes]) if nodes else server.pause
        resume = (lambda: [server.resume(n) for n in nodes]) if nodes else server.resume
        pause()
        try:
            results = await asyncio.gather(*(api.buy(sku, u, t) for u, t in enumerate(tokens)))
        finally:
            resume()
        codes = [(s, b["code"]) for s, b, _ in results]
        assert set(codes) == {(503, "UNAVAILABLE")}
        overloaded = [b for s, b, _ in results if "overloaded" in b["message"]]
        assert len(overloaded) >= 30  # shed at once, without waiting on Redis
        text = await (await api.client.get("/metrics")).text()
        assert 'seckill_shed_total{reason="in_flight"}' in text
