"""Bursts on a busy machine: with one busy process per core, a crowd still gets only the
outcomes of a purchase (200, or 410 once the units are gone), never a 503 "the
gateway could not cope", on a 3+3 Redis Cluster with replica acknowledgements. The
gateway runs as a process of its own, as in production; the machine is made busy by
CPU hogs (the load generator shares the machine too)."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from devtools.processes import ChildProcess
from devtools.redis_cluster import LocalCluster
from tests.support.services import ADMIN, Service, gateway_env, gateway_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHARDS = 16


@pytest.fixture
def busy_machine(tmp_path: Path) -> Iterator[None]:
    """One busy process per core, for the duration of the test."""
    hogs = [ChildProcess(f"hog-{i}", [sys.executable, "-c", "while True: pass"],
                         tmp_path / f"hog-{i}.log").start() for i in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()


@pytest.fixture
def gateway(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[Service]:
    env = gateway_env(redis_url=local_cluster.url, redis_mode="cluster",
                      key_prefix=f"b{uuid.uuid4().hex[:8]}", upstream_url=None,
                      database_url=f"sqlite:///{tmp_path}/orders.db", shards=SHARDS)
    with gateway_service(tmp_path, env) as service:
        yield service


async def _sale(session: aiohttp.ClientSession, base: str, stock: int) -> str:
    sku = f"burst-{uuid.uuid4().hex[:8]}"
    async with session.put(f"{base}/admin/sales/{sku}", headers=ADMIN,
                           json={"stock": stock, "shards": SHARDS}) as resp:
        assert resp.status == 201, await resp.text()
    return sku


async def _crowd(session: aiohttp.ClientSession, base: str, sku: str,
                 users: list[int]) -> Counter[str]:
    async def buy(user: int) -> str:
        headers = {"X-User-Id": str(user), "X-Idempotency-Key": f"key-{sku}-{user:012d}"}
        try:
            async with session.post(f"{base}/api/seckill/{sku}", headers=headers) as resp:
                body = await resp.json()
                return f"{resp.status} {body.get('code')}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"no answer {type(exc).__name__}"

    return Counter(await asyncio.gather(*(buy(u) for u in users)))


async def test_a_burst_of_400_for_50_units_five_times(busy_machine: None, gateway: Service) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        rounds = []
        for round_no in range(5):
            sku = await _sale(session, gateway.base_url, 50)
            first = 10**9 * (round_no + 1)
            rounds.append(await _crowd(session, gateway.base_url, sku,
                                       list(range(first, first + 400))))
        assert all(r == Counter({"200 OK": 50, "410 SOLD_OUT": 350}) for r in rounds), rounds


async def test_a_skewed_crowd_for_as_many_units_all_win(busy_machine: None, gateway: Service) -> None:
    """240 buyers for 240 units, spread over the shards by a Zipf law (shard k gets a
    share ∝ 1/(k+1)): units move to where the buyers are, and every buyer wins."""
    rng = random.Random(11)
    weights = [1 / (k + 1) for k in range(SHARDS)]
    shards = rng.choices(range(SHARDS), weights=weights, k=240)
    users = [shard + SHARDS * i for i, shard in enumerate(shards)]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        sku = await _sale(session, gateway.base_url, 240)
        outcome = await _crowd(session, gateway.base_url, sku, users)
    assert outcome == Counter({"200 OK": 240}), (outcome, Counter(shards).most_common(3))
