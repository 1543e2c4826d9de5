"""Connecting to Redis, standalone or Cluster, and what counts as "Redis failed"."""

from __future__ import annotations

import asyncio
from typing import Callable, Union

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
    sent, e.g. ``Metrics.batch_size.observe``. (``settings``: for tuning knobs to come.)"""
    return batcher_for(client, on_batch=on_batch)
