"""The micro-batcher (gateway.batcher) against real Redis: standalone and Cluster.

Batching is observed through the ``on_batch`` callback (one observation per pipeline
sent), never through timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devtools.redis_cluster import LocalCluster, LocalNode
from devtools.redis_server import LocalRedis
from gateway.config import Settings
from gateway.models import Sale
from gateway.store.connection import REDIS_FAILURES, connect
from gateway.store.keys import KeySpace
from gateway.store.scripts import Script
from gateway.store.scripts.purchase import SCRIPT as PURCHASE
from gateway.store.scripts.purchase import Code as Purchase
from gateway.store.scripts.purchase import admits, needs_replicas
from gateway.store.store import Store
from gateway.store.transport import Batcher, ClusterBatcher, StandaloneBatcher, batcher_for, make_batcher
from gateway.store.transport.replication import ReplicasRefused, online_replicas

# Adds ARGV[1] to the counter KEYS[1]; answers the key, the argument and the new value.
COUNTER_SOURCE = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
return {KEYS[1], ARGV[1], value}
"""
# Answers a mix of reply types, to compare batched and direct replies.
ECHO_SOURCE = """
return {KEYS[1], tonumber(ARGV[1]), ARGV[2], false, {ARGV[1], 'x'}}
"""


def script(source: str) -> Script:
    # A unique comment keeps each test's SHA its own: a SCRIPT FLUSH in one test must
    # not be hidden by a load made in another.
    source = f"-- {uuid.uuid4().hex}\n{source}"
    return Script("test", source, hashlib.sha1(source.encode()).hexdigest())


class Observed(list[int]):
    """The on_batch callback: the size of every pipeline sent, in order."""

    def __call__(self, size: int) -> None:
        self.append(size)


def tagged(prefix: str, tag: int | str, name: str = "k") -> str:
    return f"{{{prefix}:{tag}}}:{name}"


# -- fixtures ---------------------------------------------------------------------------

def _settings(mode: str, url: str) -> Settings:
    return Settings(redis_url=url, redis_mode=mode, redis_timeout=1.0)


@pytest_asyncio.fixture(params=["standalone", "cluster"])
async def client(request) -> AsyncIterator[Any]:
    if request.param == "cluster":
        server = request.getfixturevalue("local_cluster")
        settings = _settings("cluster", server.url)
    else:
        server = request.getfixturevalue("standalone_redis")
        settings = _settings("standalone", server.url)
    redis_client = connect(settings)
    if isinstance(redis_client, RedisCluster):
        await redis_client.initialize()
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"tb{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def batched(client: Any) -> AsyncIterator[tuple[Batcher, Observed]]:
    observed = Observed()
    batcher = make_batcher(client, Settings(), on_batch=observed, must_replicate=admits)
    assert batcher is not None
    yield batcher, observed
    await batcher.aclose()


def primaries_of(client: Any) -> int:
    if isinstance(client, RedisCluster):
        return len(client.get_primaries())
    return 1


def spread_keys(client: Any, prefix: str, count: int) -> list[str]:
    """``count`` keys on distinct tags; on Cluster, covering every primary."""
    keys = [tagged(prefix, i) for i in range(count)]
    if isinstance(client, RedisCluster):
        owners = {client.nodes_manager.get_node_from_slot(key_slot(k.encode())).name for k in keys}
        assert len(owners) == len(client.get_primaries())
    return keys


# -- batching ----------------------------------------------------------------------------

async def test_concurrent_calls_share_one_pipeline_per_node(client, batched, prefix) -> None:
    batcher, observed = batched
    counter = script(COUNTER_SOURCE)
    await counter(client, [tagged(prefix, "warm")], [0])  # loaded, so no NOSCRIPT round
    keys = spread_keys(client, prefix, 200)
    replies = await asyncio.gather(*(counter(batcher, [k], [i]) for i, k in enumerate(keys)))
    assert replies == [[k, str(i), i] for i, k in enumerate(keys)]
    assert sum(observed) == 200
    assert len(observed) == primaries_of(client)


async def test_batch_size_is_capped(standalone_redis) -> None:
    client = connect(_settings("standalone", standalone_redis.url))
    observed = Observed()
    batcher = StandaloneBatcher(client, max_batch=64, on_batch=observed)
    counter = script(COUNTER_SOURCE)
    await client.script_load(counter.source)
    try:
        key = f"tb{uuid.uuid4().hex[:8]}:capped"
        replies = await asyncio.gather(*(counter(batcher, [key], [1]) for _ in range(200)))
        assert sorted(r[2] for r in replies) == list(range(1, 201))
        assert observed == [64, 64, 64, 8]
    finally:
        await batcher.aclose()
        await client.aclose()


async def test_calls_made_while_the_lane_is_busy_go_out_together() -> None:
    with LocalRedis() as server:
        client = connect(_settings("standalone", server.url))
        observed = Observed()
        batcher = StandaloneBatcher(client, window=1, on_batch=observed)
        counter = script(COUNTER_SOURCE)
        await client.script_load(counter.source)
        try:
            await counter(batcher, ["k"], [0])  # the connection is open
            server.pause()  # nothing is answered until resume(): the lane stays busy
            try:
                first = asyncio.ensure_future(counter(batcher, ["k"], [1]))
                for _ in range(2):
                    await asyncio.sleep(0)  # queued, then written: the window is full
                rest = [asyncio.ensure_future(counter(batcher, ["k"], [1])) for _ in range(50)]
                for _ in range(2):
                    await asyncio.sleep(0)  # queued; the flush finds no room
            finally:
                server.resume()
            replies = await asyncio.gather(first, *rest)
            assert sorted(r[2] for r in replies) == list(range(1, 52))
            assert observed == [1, 1, 50]
        finally:
            await batcher.aclose()
            await client.aclose()


async def test_sequential_calls_go_out_one_by_one(client, batched, prefix) -> None:
    batcher, observed = batched
    counter = script(COUNTER_SOURCE)
    await counter(client, [tagged(prefix, 0)], [0])
    for i in range(3):
        assert (await counter(batcher, [tagged(prefix, 0)], [1]))[2] == i + 1
    assert observed == [1, 1, 1]


async def test_replies_match_direct_calls(client, batched, prefix) -> None:
    batcher, _ = batched
    echo = script(ECHO_SOURCE)
    await client.script_load(echo.source)
    cases = [([tagged(prefix, i)], [i, f"text-{i}"]) for i in range(50)]
    direct = [await echo(client, keys, args) for keys, args in cases]
    via_batcher = await asyncio.gather(*(echo(batcher, keys, args) for keys, args in cases))
    assert via_batcher == direct


async def test_one_failing_call_fails_alone(client, batched, prefix) -> None:
    batcher, observed = batched
    counter = script(COUNTER_SOURCE)
    await client.script_load(counter.source)
    keys = [tagged(prefix, i) for i in range(20)]
    await client.rpush(keys[7], "not a counter")  # INCRBY on a list: WRONGTYPE
    replies = await asyncio.gather(*(counter(batcher, [k], [1]) for k in keys),
                                   return_exceptions=True)
    assert isinstance(replies[7], ResponseError) and "WRONGTYPE" in str(replies[7])
    assert all(r == [k, "1", 1] for i, (k, r) in enumerate(zip(keys, replies)) if i != 7)
    assert sum(observed) == 20  # all in the batch; the error did not split it


async def test_noscript_after_script_flush(client, batched, prefix) -> None:
    batcher, observed = batched
    counter = script(COUNTER_SOURCE)
    await client.script_load(counter.source)
    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            await client.execute_command("SCRIPT FLUSH", target_nodes=node)
    else:
        await client.script_flush()
    keys = spread_keys(client, prefix, 30)
    loads = 0
    script_load = batcher.script_load

    async def counting_load(source: str) -> str:
        nonlocal loads
        loads += 1
        return await script_load(source)

    batcher.script_load = counting_load  # type: ignore[method-assign]
    replies = await asyncio.gather(*(counter(batcher, [k], [2]) for k in keys))
    assert replies == [[k, "2", 2] for k in keys]
    assert all(await client.script_exists(counter.sha))
    assert loads == 30  # every caller met NOSCRIPT and asked for a load ...
    assert sum(observed) == 60  # ... and all were sent again


async def test_concurrent_script_loads_share_one(client, batched, monkeypatch) -> None:
    batcher, _ = batched
    echo = script(ECHO_SOURCE)
    target = batcher.cluster if isinstance(batcher, ClusterBatcher) else batcher.client
    sent = []
    real = target.script_load

    async def spy(source: str) -> str:
        sent.append(source)
        return await real(source)

    monkeypatch.setattr(target, "script_load", spy)
    shas = await asyncio.gather(*(batcher.script_load(echo.source) for _ in range(20)))
    assert shas == [echo.sha] * 20
    assert sent == [echo.source]


async def test_cancelled_callers_do_not_break_the_batch(client, batched, prefix) -> None:
    batcher, _ = batched
    counter = script(COUNTER_SOURCE)
    await client.script_load(counter.source)
    key = tagged(prefix, 0)
    await counter(batcher, [key], [0])  # the connection is open: a flush writes at once
    tasks = [asyncio.create_task(counter(batcher, [key], [1])) for _ in range(10)]
    await asyncio.sleep(0)  # every task has queued its call; none is written yet
    tasks[0].cancel()  # cancelled before the flush: never sent
    await asyncio.sleep(0)  # the flush has run: the pipeline is written
    tasks[1].cancel()  # cancelled while in flight: it runs, its caller stops waiting
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r[2] for r in results[2:]] == list(range(2, 10))  # call 1 took the value 1
    assert int(await client.get(key)) == 9  # the in-flight one ran, the queued one did not
    assert (await counter(batcher, [key], [1]))[2] == 10


# -- the purchase path ---------------------------------------------------------------------

async def test_store_purchases_go_through_the_batcher(client, batched) -> None:
    batcher, observed = batched
    store = Store(client, KeySpace(f"tb{uuid.uuid4().hex[:8]}"), batcher=batcher)
    sale = Sale("sku-b", stock=1000, shards=16)
    sale = await store.create_sale(sale)  # type: ignore[assignment]  # (its shards are created through the batcher too)
    assert sale is not None
    await client.script_load(PURCHASE.source)
    observed.clear()
    users = range(1000, 1100)
    replies = await asyncio.gather(*(
        store.purchase(sale, user, f"key-{user}", 1, user % sale.shards) for user in users))
    assert [r.code for r in replies] == [Purchase.OK] * 100
    units = [u for r in replies for u in r.units]
    assert len(set(units)) == 100 and all(1 <= u <= 1000 for u in units)
    assert sum(observed) == 100 and len(observed) <= primaries_of(client)
    again = await asyncio.gather(*(
        store.purchase(sale, user, f"key-{user}", 1, user % sale.shards) for user in users))
    assert [r.code for r in again] == [Purchase.DUPLICATE] * 100
    assert [r.order_no for r in again] == [r.order_no for r in replies]


async def test_make_batcher_picks_the_kind(standalone_redis, local_cluster) -> None:
    standalone = connect(_settings("standalone", standalone_redis.url))
    cluster = connect(_settings("cluster", local_cluster.url))
    try:
        assert type(make_batcher(standalone, Settings())) is StandaloneBatcher
        assert type(make_batcher(cluster, Settings())) is ClusterBatcher
    finally:
        await standalone.aclose()
        await cluster.aclose()


async def test_a_stuck_server_times_out_and_the_next_call_reconnects() -> None:
    with LocalRedis() as server:
        client = connect(_settings("standalone", server.url).replace(redis_timeout=0.5))
        batcher = StandaloneBatcher(client)
        counter = script(COUNTER_SOURCE)
        await client.script_load(counter.source)
        try:
            assert (await counter(batcher, ["k"], [1]))[2] == 1
            server.pause()  # SIGSTOP: the connection stays open, nothing answers
            try:
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(counter(batcher, ["k"], [1]), 30)  # a hang guard
            finally:
                server.resume()
            # The stuck connection was dropped; the call that timed out may have run.
            assert (await counter(batcher, ["k"], [0]))[2] in (1, 2)
        finally:
            await batcher.aclose()
            await client.aclose()


async def test_password_and_database_are_honoured() -> None:
    with LocalRedis() as server:
        node = server.node
        assert node is not None
        async with Redis(host=node.host, port=node.port) as admin:
            await admin.config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@{node.host}:{node.port}/3"
        client = connect(_settings("standalone", url))
        batcher = StandaloneBatcher(client)
        wrong = connect(_settings("standalone", url.replace("s3cret", "nope")))
        wrong_batcher = StandaloneBatcher(wrong)
        counter = script(COUNTER_SOURCE)
        try:
            assert await counter(batcher, ["k"], [7]) == ["k", "7", 7]  # NOSCRIPT, load, retry
            assert await client.get("k") == "7"  # in the client's database
            async with Redis(host=node.host, port=node.port, password="s3cret") as db0:
                assert await db0.exists("k") == 0
            with pytest.raises(REDIS_FAILURES):
                await counter(wrong_batcher, ["k"], [1])
        finally:
            for b in (batcher, wrong_batcher):
                await b.aclose()
            for c in (client, wrong):
                await c.aclose()


def test_unsupported_connections_are_not_batched() -> None:
    tls = Redis(host="127.0.0.1", port=1, ssl=True)
    unix = Redis(unix_socket_path="/nonexistent.sock")
    assert batcher_for(tls) is None and batcher_for(unix) is None
    assert make_batcher(tls, Settings()) is None
    assert type(batcher_for(Redis(host="127.0.0.1", port=1))) is StandaloneBatcher


# -- cluster topology and faults (a private cluster: these tests change it) ---------------

@pytest.fixture(scope="module")
def fault_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1, node_timeout_ms=1000) as cluster:
        yield cluster


@pytest_asyncio.fixture
async def fault_client(fault_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = connect(_settings("cluster", fault_cluster.url))
    await client.initialize()
    yield client
    await client.aclose()


def _node_client(node: LocalNode) -> Redis:
    return Redis(host=node.host, port=node.port, decode_responses=True)


async def _move_slot(cluster: LocalCluster, slot: int, source: LocalNode,
                     target: LocalNode) -> None:
    """Move an empty slot the way a resharding does, and wait until every node agrees."""
    async with _node_client(source) as src, _node_client(target) as dst:
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    for node in cluster.primary_nodes():
        if node not in (source, target):
            async with _node_client(node) as other:
                await other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    await asyncio.to_thread(cluster.wait_until_healthy, 30)


async def test_moved_slot_is_rerouted(fault_cluster, fault_client, prefix) -> None:
    observed = Observed()
    batcher = ClusterBatcher(fault_client, on_batch=observed)
    counter = script(COUNTER_SOURCE)
    await fault_client.script_load(counter.source)
    key = tagged(prefix, "moved")
    slot = key_slot(key.encode())
    owner = fault_cluster.primary_for_slot(slot)
    heir = next(n for n in fault_cluster.primary_nodes() if n is not owner)
    try:
        assert (await counter(batcher, [key], [1]))[2] == 1  # the slot map is cached now
        await fault_client.delete(key)  # a slot moves by SETSLOT NODE only when empty
        await _move_slot(fault_cluster, slot, owner, heir)
        observed.clear()
        assert (await counter(batcher, [key], [5]))[2] == 5
        assert observed == [1, 1]  # MOVED from the old owner, then sent to the new one
        await batcher.drain()  # the slot map refresh it started
        observed.clear()
        assert (await counter(batcher, [key], [1]))[2] == 6
        assert observed == [1]
    finally:
        await fault_client.delete(key)
        await _move_slot(fault_cluster, slot, heir, owner)
        await batcher.aclose()


async def test_ask_during_migration_is_followed(fault_cluster, fault_client, prefix) -> None:
    batcher = ClusterBatcher(fault_client)
    counter = script(COUNTER_SOURCE)
    await fault_client.script_load(counter.source)
    key = tagged(prefix, "ask")
    slot = key_slot(key.encode())
    source = fault_cluster.primary_for_slot(slot)
    target = next(n for n in fault_cluster.primary_nodes() if n is not source)
    async with _node_client(source) as src, _node_client(target) as dst:
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        try:
            # The key is not on the source, so the source answers ASK for it.
            assert (await counter(batcher, [key], [3]))[2] == 3
            asking = dst.pipeline(transaction=False)
            asking.execute_command("ASKING")
            asking.getdel(key)
            assert (await asking.execute())[1] == "3"  # it ran on the target
        finally:
            for c in (src, dst):
                await c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            await batcher.aclose()


async def test_killed_primary_fails_its_callers_then_recovers(fault_cluster, fault_client,
                                                              prefix) -> None:
    batcher = ClusterBatcher(fault_client)
    counter = script(COUNTER_SOURCE)
    await fault_client.script_load(counter.source)
    keys = spread_keys(fault_client, prefix, 30)
    victim = fault_cluster.primary_nodes()[0]
    on_victim = [k for k in keys if fault_cluster.primary_for_key(k) is victim]
    elsewhere = [k for k in keys if k not in on_victim]
    assert on_victim and elsewhere
    try:
        assert len(await asyncio.gather(*(counter(batcher, [k], [1]) for k in keys))) == 30
        fault_cluster.wait_for_replication()
        fault_cluster.kill(victim)

        # Callers on the dead node get a Redis failure (the HTTP layer's 503), promptly;
        # the others are served. wait_for only guards against a hang.
        replies = await asyncio.wait_for(asyncio.gather(
            *(counter(batcher, [k], [1]) for k in keys), return_exceptions=True), 30)
        for key, reply in zip(keys, replies):
            if key in on_victim:
                assert isinstance(reply, REDIS_FAILURES), reply
            else:
                assert reply == [key, "1", 2]

        await asyncio.to_thread(fault_cluster.wait_until_healthy, 30)
        for _ in range(50):  # the batcher learns the new primary on its own
            replies = await asyncio.gather(*(counter(batcher, [k], [0]) for k in keys),
                                           return_exceptions=True)
            if not any(isinstance(r, BaseException) for r in replies):
                break
            await asyncio.sleep(0.1)
        assert not any(isinstance(r, BaseException) for r in replies), replies
        assert all(r[0] == k for k, r in zip(keys, replies))
    finally:
        await batcher.aclose()


# -- replica acknowledgements: WAIT after each pipeline -----------------------------------

def test_must_replicate_holds_only_answers_that_are_200s() -> None:
    sha = PURCHASE.sha
    assert admits(sha, [0, "3-ab", "5", 100])  # OK: admitted
    assert admits(sha, [1, "OK", "3-ab", "5", "", 0])  # the stored 200 of a key
    assert admits(sha, [1, b"OK", b"3-ab", b"5", b"", 1])
    for other in ([1, "SOLD_OUT", "", "", "", 0], [2], [3, "3-ab"], [4, "SOLD_OUT"],
                  [5, 1], [6], [7, "16"], [8, 1]):
        assert not admits(sha, other), other
    for not_a_purchase in (["k", "0", 0], [True, "x"], ["0"], [], 0, "OK", None, b"0"):
        assert not admits(sha, not_a_purchase), not_a_purchase
    # Another script's reply is never held, whatever it looks like.
    assert not admits("0" * 40, [0, "3-ab", "5", 100])


async def test_without_a_replica_purchases_are_answered_unprotected(standalone_redis, prefix) -> None:
    """A primary with no replica cannot have a purchase copied anywhere, and nothing can
    fail over to a replica it does not have: its purchases are answered without WAIT
    (adaptive policy), each counted, and the node is named as degraded."""
    client = connect(_settings("standalone", standalone_redis.url))
    counted: list[int] = []
    acked = StandaloneBatcher(client, replica_acks=1, ack_timeout_ms=50, must_replicate=admits,
                              replicated=needs_replicas, on_unprotected=counted.append)
    store = Store(client, KeySpace(prefix), batcher=acked)
    sale = Sale("sku-w", stock=10, shards=1)
    try:
        sale = await store.create_sale(sale)  # type: ignore[assignment]
        assert sale is not None
        await client.script_load(PURCHASE.source)
        first = await store.purchase(sale, 7, "key-0000007", 1, 0)
        assert first.code is Purchase.OK
        again = await store.purchase(sale, 7, "key-0000007", 1, 0)  # the stored 200: counted too
        assert (again.code, again.outcome) == (Purchase.DUPLICATE, "OK")
        other = await store.purchase(sale, 7, "key-other-7", 1, 0)  # not a 200: not counted
        assert other.code is Purchase.ALREADY_PURCHASED
        assert sum(counted) == 2
        assert [(d["replicas"], d["wanted"]) for d in acked.degraded()] == [(0, 1)]
    finally:
        await acked.aclose()
        await client.aclose()


async def test_strict_policy_refuses_before_running(standalone_redis, prefix) -> None:
    """Strict: a node with fewer replicas than wanted gets no purchase at all (a 503 that
    means nothing was admitted); other scripts' calls pass."""
    client = connect(_settings("standalone", standalone_redis.url))
    strict = StandaloneBatcher(client, replica_acks=1, ack_timeout_ms=50, strict=True,
                               must_replicate=admits, replicated=needs_replicas)
    store = Store(client, KeySpace(prefix), batcher=strict)
    sale = Sale("sku-s", stock=10, shards=1)
    try:
        sale = await store.create_sale(sale)  # type: ignore[assignment]  # (its shards are created through the batcher)
        assert sale is not None
        await client.script_load(PURCHASE.source)
        await strict.warm()
        with pytest.raises(ReplicasRefused):
            await store.purchase(sale, 7, "key-0000007", 1, 0)
        assert (await store.shard_states(sale))[0].remaining == 10  # nothing ran
        assert not await client.exists(store.keys.shard(sale.sku, 0).idempotency(7, "key-0000007"))
        counter = script(COUNTER_SOURCE)
        assert await counter(strict, [tagged(prefix, 0)], [2]) == [tagged(prefix, 0), "2", 2]
    finally:
        await strict.aclose()
        await client.aclose()


async def test_a_replica_that_does_not_acknowledge_times_out_after_the_budget(prefix) -> None:
    """A replica that is attached but silent (paused): WAIT is written again until the
    budget is spent, then the caller hears "outcome unknown"; the script did run, and the
    same key, once the replica is back, gets its 200."""
    with LocalRedis() as primary:
        assert primary.node is not None
        with LocalRedis(extra_args=("--replicaof", primary.node.host, str(primary.node.port))) \
                as replica:
            client = connect(_settings("standalone", primary.url))
            acked = StandaloneBatcher(client, replica_acks=1, ack_timeout_ms=50, ack_budget_ms=300,
                                      must_replicate=admits, replicated=needs_replicas)
            store = Store(client, KeySpace(prefix), batcher=acked)
            sale = Sale("sku-r", stock=10, shards=1)
            try:
                for _ in range(200):  # until the replica is in sync
                    if online_replicas(await client.execute_command("INFO", "replication")) == 1:
                        break
                    await asyncio.sleep(0.05)
                sale = await store.create_sale(sale)  # type: ignore[assignment]
                assert sale is not None
                await client.script_load(PURCHASE.source)
                assert (await store.purchase(sale, 1, "key-0000001", 1, 0)).code is Purchase.OK
                replica.pause()
                try:
                    with pytest.raises(RedisTimeoutError, match=r"after [2-9]\d* WAIT"):
                        await store.purchase(sale, 7, "key-0000007", 1, 0)
                finally:
                    replica.resume()
                reply = await store.purchase(sale, 7, "key-0000007", 1, 0)
                assert (reply.code, reply.outcome) == (Purchase.DUPLICATE, "OK")
            finally:
                await acked.aclose()
                await client.aclose()


async def _wait_calls(nodes: list[LocalNode]) -> int:
    total = 0
    for node in nodes:
        async with _node_client(node) as c:
            total += int((await c.info("commandstats")).get("cmdstat_wait", {}).get("calls", 0))
    return total


async def test_with_replicas_admitted_purchases_are_answered_after_wait(local_cluster,
                                                                       prefix) -> None:
    client = connect(_settings("cluster", local_cluster.url))
    await client.initialize()
    batcher = make_batcher(client, Settings(redis_mode="cluster"), must_replicate=admits)  # acks: decided on connecting
    assert batcher is not None and batcher.replica_acks is None
    store = Store(client, KeySpace(prefix), batcher=batcher)
    sale = Sale("sku-r", stock=1000, shards=16)
    try:
        sale = await store.create_sale(sale)  # type: ignore[assignment]
        assert sale is not None
        waits = await _wait_calls(local_cluster.primary_nodes())
        replies = await asyncio.gather(*(store.purchase(sale, u, f"key-{u:07d}", 1, u % 16)
                                         for u in range(100)))
        assert [r.code for r in replies] == [Purchase.OK] * 100
        assert batcher.replica_acks == 1  # the cluster has replicas
        assert await _wait_calls(local_cluster.primary_nodes()) > waits
        again = await store.purchase(sale, 5, "key-0000005", 1, 5)
        assert (again.code, again.outcome, again.order_no) == (Purchase.DUPLICATE, "OK",
                                                               replies[5].order_no)
    finally:
        await batcher.aclose()
        await client.aclose()


async def test_standalone_default_is_no_acks(standalone_redis) -> None:
    client = connect(_settings("standalone", standalone_redis.url))
    batcher = make_batcher(client, Settings(), must_replicate=admits)
    try:
        counter = script(COUNTER_SOURCE)
        await counter(batcher, ["acks-default"], [0])
        assert batcher.replica_acks == 0
        assert make_batcher(client, Settings(replica_acks=2)).replica_acks == 2
    finally:
        await batcher.aclose()
        await client.aclose()


async def test_a_primary_whose_replica_stalls_gives_no_200(fault_cluster, prefix) -> None:
    """The replica of one primary is stalled (SIGSTOP): that primary's purchases run but
    are not confirmed, so their callers get a timeout; purchases on other primaries are
    answered. Once the replica is back, a resend of a refused key gets its stored 200."""
    keys = KeySpace(prefix)
    # A client of its own, through a node that is up (an earlier test kills one).
    alive = next(n for n in fault_cluster.nodes if n.alive)
    client = connect(_settings("cluster", alive.url))
    await client.initialize()
    batcher = ClusterBatcher(client, replica_acks=1, ack_timeout_ms=100, must_replicate=admits)
    store = Store(client, keys, batcher=batcher)
    sale = Sale("sku-c", stock=1000, shards=16)
    stalled = next(p for p in fault_cluster.primary_nodes() if fault_cluster.replicas_of(p))
    replica = fault_cluster.replicas_of(stalled)[0]
    owner = {s: fault_cluster.primary_for_key(keys.tag(s)) for s in range(16)}
    on_stalled = [s for s in range(16) if owner[s] is stalled]
    healthy = [s for s in range(16)
               if owner[s] is not stalled and fault_cluster.replicas_of(owner[s])]
    assert on_stalled and healthy
    try:
        sale = await store.create_sale(sale)  # type: ignore[assignment]
        assert sale is not None
        await client.script_load(PURCHASE.source)
        fault_cluster.pause(replica)  # back well within the node timeout
        try:
            replies = await asyncio.gather(*(store.purchase(sale, s, f"key-{s:07d}", 1, s)
                                             for s in range(16)), return_exceptions=True)
        finally:
            fault_cluster.resume(replica)
        for s in on_stalled:
            assert isinstance(replies[s], RedisTimeoutError), replies[s]
        for s in healthy:
            assert not isinstance(replies[s], BaseException) and replies[s].code is Purchase.OK
        await asyncio.to_thread(fault_cluster.wait_for_replication, 30)
        for s in on_stalled:
            again = await store.purchase(sale, s, f"key-{s:07d}", 1, s)
            assert (again.code, again.outcome) == (Purchase.DUPLICATE, "OK"), again
    finally:
        await batcher.aclose()
        await client.aclose()
