"""devtools.faultproxy against real Redis, and what redis-py 8.1 does with a late reply.

The resend tests are the point: they pin down when redis-py sends a command again
that already ran on the server (an INCR counted twice), so the gateway's
idempotency can be designed against the real behaviour, and a redis-py upgrade
that changes it fails here first.

Note: redis-py 8.1's ``incr()`` sends ``INCRBY key 1``, and a new connection
starts with ``HELLO 3`` (RESP3 is the default), so faults single out INCRBY.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
import redis.exceptions
import redis.retry
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from devtools.faultproxy import (
    FaultProxy,
    ProxiedCluster,
    ProxyFleet,
    RespError,
    RespScanner,
    command_is,
)
from devtools.processes import free_port
from devtools.redis_cluster import LocalCluster, LocalNode
from devtools.redis_server import LocalRedis

TIMEOUT = 0.2  # the clients' socket timeout
LATE = 0.5  # a late reply: past TIMEOUT
INCR = command_is("INCR", "INCRBY")
NETWORK_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def new_key() -> str:
    return f"faultproxy:{uuid.uuid4().hex[:12]}"


def resp(*args: str) -> bytes:
    """A command in the Redis protocol, as a client sends it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def proxied_client(proxy: FaultProxy, retries: int, **options: Any) -> redis.asyncio.Redis:
    """A client through ``proxy`` that resends a command ``retries`` times at most."""
    options.setdefault("socket_timeout", TIMEOUT)
    return redis.asyncio.Redis(port=proxy.port, retry=Retry(NoBackoff(), retries), **options)


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    """Poll ``check()`` until true (a deadline, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def proxy(standalone_redis: LocalRedis) -> AsyncIterator[FaultProxy]:
    node = standalone_redis.node
    assert node is not None
    async with FaultProxy(node.host, node.port) as proxy:
        yield proxy
    assert proxy.stats.internal_errors == 0


@pytest.fixture
def direct(standalone_redis: LocalRedis) -> Iterator[redis.Redis]:
    """A client straight to the server, to see what really ran there."""
    assert standalone_redis.node is not None
    with standalone_redis.node.client() as client:
        yield client


# ---------------------------------------------------------------- a clean pipe


async def test_commands_and_pipelines_pass_through(proxy: FaultProxy, direct: redis.Redis) -> None:
    key = new_key()
    async with redis.asyncio.Redis(port=proxy.port, decode_responses=True) as client:
        assert await client.set(key, "v")
        assert await client.get(key) == "v"
        pipe = client.pipeline(transaction=True)
        for _ in range(100):
            pipe.incr(key + ":n")
        assert await pipe.execute() == list(range(1, 101))
    assert direct.get(key) == "v"
    stats = proxy.stats
    assert stats.connections >= 1
    assert stats.bytes_to_server > 0 and stats.bytes_to_client > 0


async def test_half_close_is_forwarded(proxy: FaultProxy) -> None:
    """A client that sends, shuts down its side and reads still gets every reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PING\r\n" + resp("ECHO", "half"))
    writer.write_eof()
    assert await reader.read() == b"+PONG\r\n$4\r\nhalf\r\n"  # then EOF from Redis
    writer.close()
    await wait_until(lambda: proxy.stats.open_connections == 0)


# ---------------------------------------------------------------- late replies


async def test_late_reply_times_out_although_the_command_ran(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    key = new_key()
    async with proxied_client(proxy, retries=0) as client:
        await client.ping()  # connected before the fault: the INCR itself is late
        proxy.delay_replies(LATE)
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.incr(key)
    assert direct.get(key) == "1"  # the client does not know, but it ran


async def test_retry_resends_a_command_whose_reply_was_late(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """The reproduction: Retry(…, 1) makes one INCR count twice, and returns 2.

    The first INCRBY runs, its reply is late, the socket times out; redis-py
    drops the connection, reconnects and sends the INCRBY again, which runs too.
    """
    key = new_key()
    proxy.delay_reply_to(INCR, LATE)
    async with proxied_client(proxy, retries=1) as client:
        assert await client.incr(key) == 2
    assert direct.get(key) == "2"
    assert proxy.stats.replies_delayed == 1


async def test_default_client_resends_too(proxy: FaultProxy, direct: redis.Redis) -> None:
    """Without ``retry``, redis.asyncio.Redis retries 10 times (exponential backoff
    with jitter, on ConnectionError and TimeoutError): three late replies, four INCRs."""
    key = new_key()
    proxy.delay_reply_to(INCR, LATE, times=3)
    async with redis.asyncio.Redis(port=proxy.port, socket_timeout=TIMEOUT) as client:
        assert await client.incr(key) == 4
    assert direct.get(key) == "4"


async def test_without_retries_a_late_reply_is_not_resent(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    key = new_key()
    proxy.delay_reply_to(INCR, LATE)
    async with proxied_client(proxy, retries=0) as client:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.incr(key)
    assert direct.get(key) == "1"


async def test_a_sync_retry_object_gives_the_async_client_no_retries(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """redis.retry.Retry (the synchronous one) on redis.asyncio.Redis retries nothing:
    its call_with_retry returns the coroutine unawaited, so the error comes out
    after the retry loop. gateway/redis_conn.py passes one to its standalone client."""
    key = new_key()
    proxy.delay_reply_to(INCR, LATE)
    client = redis.asyncio.Redis(
        port=proxy.port,
        socket_timeout=TIMEOUT,
        retry=redis.retry.Retry(NoBackoff(), 3),  # type: ignore[arg-type]
    )
    async with client:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.incr(key)
    assert direct.get(key) == "1"


async def test_a_lasting_slowdown_stops_resends_at_the_handshake(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """With every reply late, each resend first reconnects, and the new connection's
    HELLO times out before the command is sent again: the INCR runs once."""
    key = new_key()
    async with proxied_client(proxy, retries=3) as client:
        await client.ping()
        proxy.delay_replies(LATE)
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.incr(key)
    assert direct.get(key) == "1"
    assert proxy.stats.connections > 1  # it did reconnect to retry


async def test_a_reset_after_the_command_ran_is_resent(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """A dropped connection is resent like a timeout (ConnectionError): twice again."""
    key = new_key()
    proxy.delay_reply_to(INCR, 30.0)
    client = redis.asyncio.Redis(port=proxy.port, socket_timeout=60, retry=Retry(NoBackoff(), 1))
    async with client:
        incr = asyncio.ensure_future(client.incr(key))
        await wait_until(lambda: direct.get(key) == "1")  # it ran; its reply is held
        proxy.reset_all()
        assert await incr == 2
    assert direct.get(key) == "2"


async def test_a_late_reply_holds_the_ones_after_it(proxy: FaultProxy) -> None:
    key = new_key()
    async with redis.asyncio.Redis(port=proxy.port, socket_timeout=5) as client:
        await client.ping()
        proxy.delay_next_replies(1, LATE)
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.incr(key)
        assert await pipe.execute() == list(range(1, 101))
    assert proxy.stats.replies_delayed == 1


async def test_clear_releases_held_replies_at_once(proxy: FaultProxy) -> None:
    async with redis.asyncio.Redis(port=proxy.port, socket_timeout=60) as client:
        await client.ping()
        proxy.delay_replies(3600)
        ping = asyncio.ensure_future(client.ping())
        await wait_until(lambda: proxy.stats.bytes_to_server > 0 and not ping.done())
        proxy.clear()
        assert await ping


# ---------------------------------------------------------------- lost connections


async def test_blackhole_times_out_and_clear_resets_what_it_swallowed(proxy: FaultProxy) -> None:
    async with proxied_client(proxy, retries=0) as client:
        await client.ping()
        proxy.blackhole()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        async with proxied_client(proxy, retries=0) as newcomer:
            with pytest.raises(redis.exceptions.TimeoutError):
                await newcomer.ping()  # connected, but its HELLO went nowhere
        assert proxy.stats.bytes_dropped > 0
        proxy.clear()
        await wait_until(lambda: proxy.stats.open_connections == 0)
        assert await client.ping()


async def test_reset_all_gives_a_connection_error(proxy: FaultProxy) -> None:
    async with proxied_client(proxy, retries=0) as client:
        await client.ping()
        proxy.reset_all()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert await client.ping()  # a reset is an event, not a state
    assert proxy.stats.aborted == 1


async def test_refuse_resets_new_connections_until_cleared(proxy: FaultProxy) -> None:
    async with proxied_client(proxy, retries=0) as client:
        proxy.refuse()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        proxy.clear()
        assert await client.ping()
    assert proxy.stats.refused == 1


async def test_a_node_that_is_down_resets_the_client() -> None:
    async with FaultProxy("127.0.0.1", free_port()) as proxy:
        async with proxied_client(proxy, retries=0) as client:
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.ping()
        assert proxy.stats.upstream_failures == 1


async def test_the_server_closing_reaches_the_client(proxy: FaultProxy, direct: redis.Redis) -> None:
    name = f"victim-{uuid.uuid4().hex[:8]}"
    async with proxied_client(proxy, retries=0, client_name=name) as client:
        await client.ping()
        (victim,) = [c for c in direct.client_list() if c["name"] == name]
        assert direct.client_kill_filter(_id=victim["id"]) == 1
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    await wait_until(lambda: proxy.stats.open_connections == 0)


# ---------------------------------------------------------------- pause


async def test_pause_and_resume_keep_the_order_of_a_pipeline(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """1000 INCRs in two halves, the proxy paused between them: replies 1..1000."""
    key = new_key()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(resp("INCR", key) * 500)
        replies = [await reader.readline()]  # the first half is under way
        proxy.pause()
        writer.write(resp("INCR", key) * 500)
        await writer.drain()
        await asyncio.sleep(0.1)
        assert int(direct.get(key) or 0) <= 500  # the second half is held
        proxy.resume()
        while len(replies) < 1000:
            replies.append(await reader.readline())
    finally:
        writer.close()
    assert replies == [b":%d\r\n" % n for n in range(1, 1001)]


async def test_stop_resets_open_connections_and_leaves_no_task(
    standalone_redis: LocalRedis,
) -> None:
    node = standalone_redis.node
    assert node is not None
    proxy = FaultProxy(node.host, node.port)
    await proxy.start()
    async with proxied_client(proxy, retries=0, socket_timeout=30) as client:
        await client.ping()
        proxy.pause()
        ping = asyncio.ensure_future(client.ping())
        await wait_until(lambda: proxy.stats.bytes_to_server > 0)
        await proxy.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await ping
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("faultproxy")]
    assert leftovers == []


# ---------------------------------------------------------------- threads


def test_a_fleet_serves_synchronous_callers(standalone_redis: LocalRedis) -> None:
    """The fleet's loop runs in its own thread: a synchronous client and test work
    as a subprocess would. The synchronous client resends like the async one."""
    node = standalone_redis.node
    assert node is not None
    key = new_key()
    with ProxyFleet() as fleet, node.client() as direct:
        proxy = fleet.add(node.host, node.port)
        proxy.delay_reply_to(INCR, LATE)
        client = redis.Redis(
            port=proxy.port, socket_timeout=TIMEOUT, retry=redis.retry.Retry(NoBackoff(), 1)
        )
        with client:
            assert client.incr(key) == 2
        assert direct.get(key) == "2"
        assert proxy.stats.replies_delayed == 1
        with pytest.raises(RuntimeError, match="own thread"):
            fleet.call(lambda: fleet.call(lambda: None))


# ---------------------------------------------------------------- RESP scanning


def test_scanner_finds_frames_however_the_bytes_are_cut() -> None:
    stream = (
        b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*-1\r\n*0\r\n"
        b"*2\r\n$3\r\nfoo\r\n*2\r\n:1\r\n_\r\n"  # nested
        b"%2\r\n+a\r\n:1\r\n+b\r\n#t\r\n"  # RESP3 map
        b"|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n"  # an attribute, then its value: one frame
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$0\r\n\r\n"  # push
        b"=8\r\ntxt:abcd\r\n,1.5\r\n(123\r\n!3\r\nERR\r\n~1\r\n:1\r\n-ERR x\r\n"
    )
    whole = [end for end, _ in RespScanner(requests=False).feed(stream)]
    assert len(whole) == 16 and whole[-1] == len(stream)
    scanner = RespScanner(requests=False)
    bytewise = [i + 1 for i in range(len(stream)) if scanner.feed(stream[i : i + 1])]
    assert bytewise == whole


def test_scanner_returns_the_arguments_of_commands() -> None:
    stream = resp("SET", "k", "a\r\nb") + b"PING\r\n" + resp("INCR", "k")
    scanner = RespScanner(requests=True)
    frames = [frame for i in range(len(stream)) for frame in scanner.feed(stream[i : i + 1])]
    assert [args for _, args in frames] == [[b"SET", b"k", b"a\r\nb"], [b"PING"], [b"INCR", b"k"]]
    assert INCR([b"incrby", b"k", b"1"]) and not INCR([b"GET", b"k"])


def test_scanner_rejects_what_is_not_resp() -> None:
    with pytest.raises(RespError):
        RespScanner(requests=False).feed(b"HTTP/1.1 200 OK\r\n")


# ---------------------------------------------------------------- cluster


def key_on(node: LocalNode, cluster: LocalCluster) -> str:
    """A fresh key that ``node`` (a primary) serves."""
    while True:
        key = new_key()
        if cluster.primary_for_slot(key_slot(key.encode())) is node:
            return key


@pytest.fixture
def proxied(local_cluster: LocalCluster) -> Iterator[ProxiedCluster]:
    with ProxiedCluster(local_cluster) as proxied:
        yield proxied
        assert all(p.stats.internal_errors == 0 for p in proxied.proxies)


@contextlib.asynccontextmanager
async def cluster_client(url: str, **options: Any) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(url, decode_responses=True, **options)
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_cluster_clients_only_reach_the_proxies(proxied: ProxiedCluster) -> None:
    cluster = proxied.cluster
    primaries = cluster.primary_nodes()
    proxy_ports = {p.port for p in proxied.proxies}
    keys = {node.index: key_on(node, cluster) for node in primaries}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for node in primaries:  # one client per primary, connected before the fault
            client = await stack.enter_async_context(
                cluster_client(proxied.url, socket_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0))
            )
            assert {n.port for n in client.get_nodes()} <= proxy_ports
            await client.set(keys[node.index], "v")
            clients[node.index] = client
        for node in primaries:
            assert proxied.proxy_for(node).stats.bytes_to_server > 0
        for proxy in proxied.proxies:
            proxy.blackhole()
        for node in primaries:  # had any command gone straight to a node, it would answer
            with pytest.raises(redis.exceptions.TimeoutError):
                await clients[node.index].get(keys[node.index])


@pytest.mark.cluster
async def test_replicas_replicate_through_a_blackholed_proxy(proxied: ProxiedCluster) -> None:
    """Replicas reach their primary at the announced port, i.e. through its proxy;
    the proxy recognises the link (PSYNC) and spares it from faults."""
    cluster = proxied.cluster
    primary = cluster.primary_nodes()[0]
    proxy = proxied.proxy_for(primary)
    assert proxy.stats.replication_links >= 1
    proxy.blackhole()
    with primary.client() as client:
        client.set(key_on(primary, cluster), "replicated")
    await asyncio.to_thread(cluster.wait_for_replication)


CLUSTER_RESENDS = [
    # (client options, late INCRBY replies, INCRBYs run on the server or None if raised)
    pytest.param({"retry": Retry(NoBackoff(), 0)}, 1, None, id="retry-0"),
    pytest.param({"retry": Retry(NoBackoff(), 1)}, 1, 2, id="retry-1"),
    pytest.param(  # deprecated since redis-py 6.0, still honoured when ``retry`` is not given
        {"cluster_error_retry_attempts": 2}, 5, None, id="cluster_error_retry_attempts-2",
        marks=pytest.mark.filterwarnings("ignore:Call to '__init__':DeprecationWarning"),
    ),
    pytest.param({}, 3, 4, id="defaults"),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("options", "late", "result"), CLUSTER_RESENDS)
async def test_cluster_client_resends_a_command_whose_reply_was_late(
    proxied: ProxiedCluster, options: dict[str, Any], late: int, result: int | None
) -> None:
    """RedisCluster resends on TimeoutError and ConnectionError (exactly those types),
    ``retry.get_retries()`` times, else ``cluster_error_retry_attempts`` (10 by
    default) times, after re-reading the topology; each resend runs again."""
    cluster = proxied.cluster
    key = new_key()
    primary = cluster.primary_for_slot(key_slot(key.encode()))
    async with cluster_client(proxied.url, socket_timeout=TIMEOUT, **options) as client:
        proxied.proxy_for(primary).delay_reply_to(INCR, LATE, times=late)
        if result is None:
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.incr(key)
        else:
            assert await client.incr(key) == result
    runs = result if result is not None else 1 + options.get(
        "cluster_error_retry_attempts", 0
    )
    with primary.client() as direct:
        assert direct.get(key) == str(runs)


@pytest.mark.cluster
async def test_cluster_lasting_slowdown_is_not_resent(proxied: ProxiedCluster) -> None:
    cluster = proxied.cluster
    key = new_key()
    primary = cluster.primary_for_slot(key_slot(key.encode()))
    async with cluster_client(
        proxied.url, socket_timeout=TIMEOUT, retry=Retry(NoBackoff(), 3)
    ) as client:
        await client.get(key)  # connected before the fault: the INCR itself is late
        proxied.proxy_for(primary).delay_replies(LATE)
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.incr(key)
    with primary.client() as direct:
        assert direct.get(key) == "1"


@pytest.mark.cluster
def test_leaving_restores_the_real_ports(local_cluster: LocalCluster) -> None:
    with ProxiedCluster(local_cluster) as proxied:
        announced = {node.index: proxied.proxy_for(node).port for node in local_cluster.nodes}
        assert {n["port"] for n in local_cluster.topology().values()} == set(announced.values())
    assert {n["port"] for n in local_cluster.topology().values()} == {
        node.port for node in local_cluster.nodes
    }
    assert all(node.announce_port == 0 for node in local_cluster.nodes)
    assert local_cluster.health_problem() is None
    with local_cluster.cluster_client(socket_timeout=2) as client:
        key = new_key()
        assert client.incr(key) == 1


@pytest.mark.cluster
@pytest.mark.slow
async def test_failover_and_restart_keep_announcing_the_proxies() -> None:
    """A promoted replica announces its own proxy (the setting is per node); a node
    restarted by LocalCluster.restart gets it back from LocalNode.announce_port."""
    with LocalCluster(primaries=3, replicas_per_primary=1, node_timeout_ms=1000) as cluster:
        with ProxiedCluster(cluster) as proxied:
            key = new_key()
            slot = key_slot(key.encode())
            old = cluster.primary_for_slot(slot)
            (replica,) = cluster.replicas_of(old)
            async with cluster_client(proxied.url, socket_timeout=1) as client:
                await client.set(key, "before")
                await asyncio.to_thread(cluster.wait_for_replication)
                cluster.kill(old)
                await asyncio.to_thread(cluster.wait_until_healthy)
                assert cluster.primary_for_slot(slot) is replica
                await asyncio.to_thread(proxied.wait_until_announced)
                assert await client.get(key) == "before"  # through the new primary's proxy
            with replica.client() as direct:
                (entry,) = [e for e in direct.execute_command("CLUSTER", "SLOTS")
                            if e[0] <= slot <= e[1]]
                assert entry[2][1] == proxied.proxy_for(replica).port

            cluster.restart(old)
            await asyncio.to_thread(cluster.wait_until_healthy)
            await asyncio.to_thread(proxied.wait_until_announced)
            with old.client() as direct:
                myself = [line for line in direct.execute_command("CLUSTER", "NODES").splitlines()
                          if "myself" in line]
                assert f":{proxied.proxy_for(old).port}@" in myself[0]
