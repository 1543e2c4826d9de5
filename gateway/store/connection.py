"""Connecting to Redis, standalone or Cluster, and what counts as "Redis failed"."""

from __future__ import annotations

import asyncio
import os

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import Settings

RedisClient = Redis | RedisCluster

# In redis-py, RedisClusterException and SlotNotCoveredError do not derive from
# RedisError: catching only RedisError turns a failover into 500s.
REDIS_FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)


_REDIS_PACKAGE = os.path.dirname(redis.__file__)


def is_redis_failure(exc: BaseException) -> bool:
    """Redis unreachable, slow, or its client library failing inside. redis-py's cluster
    client can raise plain AttributeError or RuntimeError (a transport closed under it)
    during a failover; those count when they passed through the redis package."""
    if isinstance(exc, REDIS_FAILURES):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE):
            return True
        tb = tb.tb_next
    return False


def connect(settings: Settings) -> RedisClient:
    """A client that resends a call once (cluster: twice, after re-reading the slot map)
    when its reply was lost to a timeout or a dropped connection. That is only safe
    because every script is: a resent call that had run answers what its first run did.
    (The asyncio client takes the asyncio ``Retry``: given the synchronous one, it never
    retried.)"""
    timeout = settings.redis_timeout
    # Connections per node: never fewer than the requests a process lets in at once
    # (redis-py's cluster client raises past its cap, 100 by default, instead of waiting).
    connections = max(100, settings.max_in_flight)
    if settings.redis_mode == "cluster":
        return RedisCluster.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, max_connections=connections,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=timeout,
        socket_connect_timeout=timeout, max_connections=connections, timeout=timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 1))
    return Redis(connection_pool=pool)


class RedisOutage:
    """For background loops that must ride out a Redis outage: ``with outage:`` runs a
    block and swallows a Redis failure in it (any other error passes through);
    ``outage.error`` is then the failure, None when the block ended well.

        outage = RedisOutage()
        while running:
            with outage:
                await step()
            if outage.error:
                log...; await asyncio.sleep(backoff)
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __enter__(self) -> RedisOutage:
        self.error = None
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, Exception) and is_redis_failure(exc):
            self.error = exc
            return True
        return False
