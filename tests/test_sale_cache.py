"""The per-process sale cache (gateway.admission.sales) with a store whose reads the
test lets finish one by one: concurrent misses share one read, a failed read fails
every waiter and is not remembered, and a forget() during a read is not undone by it."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.admission import sales
from gateway.admission.sales import SaleCache
from gateway.models import Sale
from gateway.store.store import Store


class GatedStore:
    """``get_sale`` counts its calls and returns ``answers`` in turn (an exception is
    raised), each only once the test opens ``gate``."""

    def __init__(self, *answers: Sale | None | BaseException) -> None:
        self.answers = list(answers)
        self.reads = 0
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()  # a read is waiting at the gate

    async def get_sale(self, sku: str) -> Sale | None:
        self.reads += 1
        answer = self.answers.pop(0)
        self.waiting.set()
        await self.gate.wait()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def next_read(self) -> None:
        """Let the reads at the gate finish; the next ones wait again."""
        self.gate.set()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()


def cache_of(store: GatedStore) -> SaleCache:
    return SaleCache(cast(Store, store))


SALE = Sale("sku-1", 10, generation="g1")
NEWER = Sale("sku-1", 20, generation="g2")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_misses_of_a_sku_share_one_read() -> None:
    store = GatedStore(SALE, Sale("sku-2", 1))
    cache = cache_of(store)
    waiters = [asyncio.ensure_future(cache.get("sku-1")) for _ in range(1000)]
    other = asyncio.ensure_future(cache.get("sku-2"))
    await store.waiting.wait()
    await _settle()
    assert store.reads == 2  # one per SKU, however many ask
    store.next_read()
    assert await asyncio.gather(*waiters) == [SALE] * 1000
    assert (await other).sku == "sku-2"
    assert await cache.get("sku-1") == SALE and store.reads == 2  # remembered
    assert cache.cached("sku-1") == SALE


async def test_a_failed_read_reaches_every_waiter_and_the_next_get_reads_again() -> None:
    store = GatedStore(RedisConnectionError("down"), SALE)
    cache = cache_of(store)
    waiters = [asyncio.ensure_future(cache.get("sku-1")) for _ in range(50)]
    await store.waiting.wait()
    store.next_read()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert cache.cached("sku-1") is None and store.reads == 1  # the error is not remembered
    retry = asyncio.ensure_future(cache.get("sku-1"))
    await store.waiting.wait()
    store.next_read()
    assert await retry == SALE and store.reads == 2


async def test_a_waiter_cancelled_does_not_cancel_the_read_of_the_others() -> None:
    store = GatedStore(SALE)
    cache = cache_of(store)
    first, second = (asyncio.ensure_future(cache.get("sku-1")) for _ in range(2))
    await store.waiting.wait()
    first.cancel()  # e.g. its request's deadline
    await _settle()
    store.next_read()
    assert await second == SALE
    assert first.cancelled() and cache.cached("sku-1") == SALE and store.reads == 1


async def test_forget_during_a_read_leaves_no_stale_entry() -> None:
    """The sale was deleted and made again while a read of the old one was under way: the
    old read's answer is not remembered, and a get after the forget reads the new one."""
    store = GatedStore(SALE, NEWER)
    cache = cache_of(store)
    stale = asyncio.ensure_future(cache.get("sku-1"))
    await store.waiting.wait()
    cache.forget("sku-1")
    fresh = asyncio.ensure_future(cache.get("sku-1"))  # does not join the old read
    await _settle()
    assert store.reads == 2
    store.next_read()
    assert await stale == SALE  # what its caller asked before the forget
    assert await fresh == NEWER
    assert cache.cached("sku-1") == NEWER
    assert await cache.get("sku-1") == NEWER and store.reads == 2


async def test_forget_after_a_read_only_ended_is_not_undone() -> None:
    store = GatedStore(SALE, NEWER)
    cache = cache_of(store)
    stale = asyncio.ensure_future(cache.get("sku-1"))
    await store.waiting.wait()
    cache.forget("sku-1")
    store.next_read()
    assert await stale == SALE
    assert cache.cached("sku-1") is None  # the read did not put the forgotten sale back
    fresh = asyncio.ensure_future(cache.get("sku-1"))
    await store.waiting.wait()
    store.next_read()
    assert await fresh == NEWER


async def test_a_missing_sale_is_remembered_briefly_and_a_found_one_longer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(sales.time, "monotonic", lambda: clock[0])
    store = GatedStore(None, SALE, NEWER)
    store.gate.set()  # reads answer at once
    cache = cache_of(store)
    assert await cache.get("sku-1") is None
    clock[0] += sales.MISSING_TTL / 2
    assert await cache.get("sku-1") is None and store.reads == 1  # negative entry kept
    clock[0] += sales.MISSING_TTL
    assert await cache.get("sku-1") == SALE and store.reads == 2
    clock[0] += sales.FOUND_TTL / 2
    assert await cache.get("sku-1") == SALE and store.reads == 2
    clock[0] += sales.FOUND_TTL
    assert await cache.get("sku-1") == NEWER and store.reads == 3


