"""Connecting to Redis, standalone or Cluster, and what counts as "Redis failed"."""

from __future__ import annotations

import asyncio
from typing import Union

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

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
