"""The sell-out under a crowd: a burst larger than the stock at a warm gateway. The
buyers whose shard is empty read the sale's sold-out state; one read each, all at once,
cost a connection each on redis-py's Cluster client and answered hundreds of 503s.
Those reads are now shared by the callers that arrived before the read was sent (a read
sent earlier could miss a unit given back: a false sold-out) and travel in the batcher's
pipeline, like the sold-out mark; so the burst gets only outcomes of a purchase (200, or
410), and new Redis connections in tens, not in thousands."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from gateway.admission.soldout import SoldOut
from tests.support.api import Backend, new_sku, serve
from tests.support.burst import ConnectionCount, burst, burst_session, open_files

BUYERS = 3000
STOCK = 1000
SHARDS = 16
# New connections grow with the shards' concurrent refills (one snapshot pipeline per
# shard being refilled, to every node: 16 x 3 on the Cluster), not with the crowd: before
# the reads were shared and batched, 824 (standalone) and 1,077 (Cluster) for this burst.
MAX_NEW_CONNECTIONS = 100
# Long deadlines: the gateway and its 3,000 clients share one event loop on a shared
# machine, and how busy it is must not decide the outcome (see test_cold_start.py).
DEADLINES = {"request_timeout": 30.0, "redis_timeout": 10.0}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_burst_larger_than_the_stock_gets_outcomes_not_503s(backend: Backend) -> None:
    sku = new_sku()
    first_user = 9_000_000
    async with serve(backend.settings(**DEADLINES)) as api:
        await api.create_sale(sku, STOCK, shards=SHARDS)
        issuer = await api.gateway.token_issuer()
        keys = {user: issuer.issue(user) for user in range(first_user, first_user + BUYERS)}
        status, body, _ = await api.buy(sku, 1, issuer.issue(1))  # warm: the sale is known
        assert status == 200, body
        count = ConnectionCount(backend.server)  # type: ignore[arg-type]
        try:
            with open_files(4 * BUYERS):
                async with burst_session() as session:
                    before = await count.read()
                    base = str(api.client.make_url("")).rstrip("/")
                    outcome = await burst(session, base, sku, keys, ())
                    after = await count.read()
        finally:
            count.close()
        sale = await api.sale(sku)
    print(f"\n{backend.mode}: {dict(outcome)}; new Redis connections: {after - before}")
    assert outcome == Counter({"buy 200 OK": STOCK - 1, "buy 410 SOLD_OUT": BUYERS - STOCK + 1}), outcome
    assert (sale["sold"], sale["remaining"]) == (STOCK, 0)
    assert after - before < MAX_NEW_CONNECTIONS, (after - before, outcome)


async def _turns(done, most: int = 20) -> None:  # type: ignore[no-untyped-def]
    """Let the loop run until ``done()`` (a few turns; no clock involved)."""
    for _ in range(most):
        if done():
            return
        await asyncio.sleep(0)


async def test_callers_share_a_read_only_if_they_came_before_it_was_sent(backend: Backend) -> None:
    """Callers of one loop turn share one read; a caller that comes once the read has
    started gets a read of its own, sent after it came."""
    sku = new_sku()
    async with serve(backend.settings()) as api:
        await api.create_sale(sku, 5, shards=4)
        sale = await api.gateway.sales.get(sku)
        assert sale is not None
        store = api.gateway.store
        sent: list[int] = []
        real = store.sold_out_state

        async def counted(s):  # type: ignore[no-untyped-def]
            sent.append(len(sent))
            return await real(s)

        sold_out = SoldOut(store)
        store.sold_out_state = counted  # type: ignore[method-assign]
        try:
            first = [asyncio.ensure_future(sold_out.read(sale)) for _ in range(200)]
            await _turns(lambda: bool(sent))  # the read starts: it is sent now
            assert len(sent) == 1
            late = asyncio.ensure_future(sold_out.read(sale))
            await _turns(lambda: len(sent) > 1)
            assert len(sent) == 2  # the late caller did not join the read already sent
            states = await asyncio.gather(*first, late)
            assert {s.sold_out for s in states} == {False}
            # A caller cancelled while it waits leaves the others their answer.
            again = [asyncio.ensure_future(sold_out.read(sale)) for _ in range(3)]
            again[0].cancel()
            results = await asyncio.gather(*again, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert all(not r.sold_out for r in results[1:])  # type: ignore[union-attr]
            assert len(sent) == 3
        finally:
            store.sold_out_state = real  # type: ignore[method-assign]
