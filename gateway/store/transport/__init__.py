"""The transport of the hot path: script calls batched into one pipeline per node.

    link.py         one connection to one node (hiredis, replies in order)
    batcher.py      queues per node, one pipeline per loop tick; standalone Redis
    cluster.py      routing by slot, MOVED / ASK, slot-map refresh
    replication.py  the WAIT for replicas that closes a pipeline of purchases

Supported connections: TCP, with a password (and user name) and a database number. For
anything else (TLS, a Unix socket, a credential provider) :func:`batcher_for` gives no
batcher and the calls go through the client unbatched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import Settings
from gateway.store.transport.batcher import Batcher, ReplicateWhen, StandaloneBatcher, never
from gateway.store.transport.cluster import ClusterBatcher

__all__ = ["Batcher", "ClusterBatcher", "StandaloneBatcher", "batcher_for", "make_batcher"]


def batcher_for(client: Redis | RedisCluster, **kwargs: Any) -> Batcher | None:
    """The batcher for ``client``'s deployment, or None when its connections are of a
    kind the batcher does not open (the calls then go through the client unbatched)."""
    try:
        if isinstance(client, RedisCluster):
            return ClusterBatcher(client, **kwargs)
        return StandaloneBatcher(client, **kwargs)
    except ValueError:
        return None


def make_batcher(client: Redis | RedisCluster, settings: Settings, *,
                 on_batch: Callable[[int], None] | None = None,
                 must_replicate: ReplicateWhen = never,
                 replicated: Callable[[str], bool] | None = None,
                 on_unprotected: Callable[[int], None] | None = None) -> Batcher | None:
    """The batcher for ``client`` as the settings ask: ``SECKILL_REPLICA_ACKS`` (-1:
    decided by the batcher when it connects), ``SECKILL_REPLICA_ACK_TIMEOUT_MS`` for each
    WAIT after a pipeline, ``SECKILL_REPLICA_ACK_POLICY``; WAITs may go on for up to half
    the request deadline. ``must_replicate`` says which replies wait for replicas,
    ``replicated`` which scripts' calls need them (see ``transport.replication``)."""
    acks = settings.replica_acks
    budget_ms = min(1000, int(settings.request_timeout * 500))
    return batcher_for(client, on_batch=on_batch, replica_acks=None if acks < 0 else acks,
                       ack_timeout_ms=settings.replica_ack_timeout_ms, ack_budget_ms=budget_ms,
                       strict=settings.replica_ack_policy == "strict",
                       must_replicate=must_replicate, replicated=replicated,
                       on_unprotected=on_unprotected)
