"""Connecting to Redis, standalone or Cluster, and what counts as "Redis failed"."""

from __future__ import annotations

import asyncio
import os
from typing import Callable, Union

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from .batcher import Batcher, batcher_for
from .config import Settings

RedisClient = Union[Redis, RedisCluster]

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
    timeout = settings.redis_timeout
    common = dict(
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    if settings.redis_mode == "cluster":
        return RedisCluster.from_url(
            settings.redis_url,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
            **common,
        )
    return Redis.from_url(
        settings.redis_url,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 1),
        max_connections=512,
        **common,
    )


def make_batcher(client: RedisClient, settings: Settings,
                 on_batch: Callable[[int], None] | None = None) -> Batcher | None:
    """The batcher for the hot-path script calls made on ``client`` (see gateway.batcher),
    or None where it cannot open the client's kind of connection (TLS, Unix socket):
    the calls then go through the client. ``on_batch`` sees the size of every pipeline
    sent, e.g. ``Metrics.batch_size.observe``. ``settings.replica_acks`` (-1: decided
    by the batcher when it connects) and ``replica_ack_timeout_ms``: the WAIT after
    each pipeline."""
    acks = settings.replica_acks
    return batcher_for(client, on_batch=on_batch, replica_acks=None if acks < 0 else acks,
                       ack_timeout_ms=settings.replica_ack_timeout_ms)
