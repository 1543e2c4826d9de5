"""The request deadline (``SECKILL_REQUEST_TIMEOUT``): every request ends within it.

The middleware keeps one timer for all requests in flight (``Deadlines``) instead of an
``asyncio.timeout`` per request. These tests check what it must keep: a request past its
deadline is cut and answered 503 (with ``outcome_unknown`` only while a purchase script
call is unanswered: tests/test_redis_faults.py); it is never cut before
``timeout - early``; a request cancelled by anyone else stays cancelled; a request that
ends in time leaves nothing behind (no entry, no pending cancellation on its task). No
test here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.http.middleware import GUARD, Deadlines
from tests.support.api import serve

TIMEOUT = 0.2


async def test_a_request_past_its_deadline_is_a_503(standalone):
    """Cut at the deadline. Not a purchase, so nothing can have been admitted: the 503
    does not say ``outcome_unknown``."""
    app = create_app(standalone.settings(request_timeout=TIMEOUT))
    loop = asyncio.get_running_loop()
    ended: list[float] = []

    async def stuck(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(loop.time())
        raise AssertionError("not reached")

    app.router.add_get("/stuck", stuck)
    async with TestClient(TestServer(app)) as client:
        started = loop.time()
        resp = await client.get("/stuck")
        body = await resp.json()
        assert (resp.status, body["code"], body.get("outcome_unknown")) == (503, "UNAVAILABLE", None)
        assert resp.headers["Retry-After"] == "1"
        deadlines = app[GUARD].deadlines
        # Cut at the deadline, up to `early` before it (1 ms for the loop's clock), never
        # sooner.
        assert ended and ended[0] - started >= TIMEOUT - deadlines.early - 0.001
        assert not deadlines._running and not deadlines._expired
        metrics = await (await client.get("/metrics")).text()
        assert 'seckill_requests_total{code="UNAVAILABLE",route="/stuck"} 1.0' in metrics


async def test_many_requests_past_their_deadline_are_all_cut(standalone):
    app = create_app(standalone.settings(request_timeout=TIMEOUT))

    async def stuck(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def quick(request: web.Request) -> web.Response:
        await asyncio.sleep(0)
        return web.json_response({"code": "OK"})

    app.router.add_get("/stuck", stuck)
    app.router.add_get("/quick", quick)
    async with TestClient(TestServer(app)) as client:
        async def get(path: str) -> int:
            async with client.get(path) as resp:
                await resp.read()
                return resp.status

        # Stuck requests started over more than one deadline, quick ones between them.
        first = [asyncio.create_task(get("/stuck")) for _ in range(20)]
        await asyncio.sleep(TIMEOUT / 2)
        mixed = [asyncio.create_task(get(p)) for p in ("/stuck", "/quick") * 10]
        statuses = await asyncio.gather(*first, *mixed)
        assert statuses == [503] * 20 + [503, 200] * 10
        deadlines = app[GUARD].deadlines
        assert not deadlines._running and not deadlines._expired
        # The connections' tasks carry no cancellation left over: later requests on
        # them answer normally.
        assert [await get("/quick") for _ in range(5)] == [200] * 5


async def test_a_request_cancelled_by_someone_else_stays_cancelled():
    deadlines = Deadlines(timeout=60.0)

    async def request() -> None:
        task = asyncio.current_task()
        assert task is not None
        deadlines.enter(task)
        try:
            await asyncio.sleep(3600)
        finally:
            assert deadlines.leave(task) is False  # not ours

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancellation was swallowed")
    assert task.cancelled() and not deadlines._running


async def test_a_request_that_ends_in_time_leaves_nothing_behind():
    deadlines = Deadlines(timeout=60.0)
    task = asyncio.current_task()
    assert task is not None
    for _ in range(3):
        deadlines.enter(task)
        await asyncio.sleep(0)
        assert deadlines.leave(task) is False
    assert task.cancelling() == 0 and not deadlines._running and not deadlines._expired


async def test_the_deadline_timer_follows_the_oldest_request():
    """Requests started at different times are each cut at their own deadline, not the
    first one's: the timer is set again for the next oldest."""
    deadlines = Deadlines(timeout=0.15, early=0.01)
    loop = asyncio.get_running_loop()
    cut: dict[int, float] = {}

    async def request(n: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        started = loop.time()
        deadlines.enter(task)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            assert deadlines.leave(task) and task.uncancel() == 0
            cut[n] = loop.time() - started

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(request(n)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    assert sorted(cut) == [0, 1, 2, 3]
    assert all(elapsed >= 0.15 - 0.01 - 0.001 for elapsed in cut.values()), cut
    assert not deadlines._running and not deadlines._expired and deadlines._timer is None


async def test_the_purchase_path_still_meets_its_deadline(backend, sku):
    """Redis stalled: purchases end with 503 ``outcome_unknown`` (or the shed 503), as
    before the timer changed."""
    server = backend.server
    async with serve(backend.settings(redis_timeout=5.0, request_timeout=0.5)) as api:
        await api.create_sale(sku, 10)
        tokens = [await api.token(u) for u in range(5)]
        await api.buy(sku, 99, await api.token(99))  # the sale is in memory: the stall meets the script
        nodes = getattr(server, "nodes", None)
        pause = (lambda: [server.pause(n) for n in nodes]) if nodes else server.pause
        resume = (lambda: [server.resume(n) for n in nodes]) if nodes else server.resume
        pause()
        try:
            results = await asyncio.gather(*(api.buy(sku, u, t) for u, t in enumerate(tokens)))
        finally:
            resume()
        assert {(s, b["code"], b.get("outcome_unknown")) for s, b, _ in results} == \
            {(503, "UNAVAILABLE", True)}
