"""Batching on a Redis Cluster: each call goes to the primary of its first key's slot."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ConnectionError, MovedError

from gateway.store.transport.batcher import PIPELINE_FAILURES, Batcher, Lane, LaneKey
from gateway.store.transport.link import Call, NodeOptions

log = logging.getLogger("gateway.batcher")

MAX_REDIRECTS = 3


class ClusterBatcher(Batcher):
    """Routes each call by the slot of its first key to the slot's primary. The slot
    map is the ``RedisCluster`` client's ``nodes_manager``; it is refreshed in the
    background after a MOVED, a CLUSTERDOWN or a failed node.

    A lane is ``(node name, asking)``: calls redirected by ASK go in lanes of their own,
    each preceded by ASKING in the pipeline."""

    def __init__(self, cluster: RedisCluster, options: NodeOptions | None = None, *,
                 max_redirects: int = MAX_REDIRECTS, **kwargs: Any) -> None:
        options = options or NodeOptions.of(cluster.nodes_manager.connection_kwargs)
        if options is None:
            raise ValueError("this kind of connection is not supported by the batcher")
        super().__init__(options, **kwargs)
        self.cluster = cluster
        self.max_redirects = max_redirects
        self._refreshing: asyncio.Task[None] | None = None

    async def _script_load(self, source: str) -> str:
        return await self.cluster.script_load(source)  # on every primary

    async def _prepare(self) -> None:
        await self.cluster.initialize()
        if self.replica_acks is None:
            # A cluster with replicas fails over to them: its purchases must be on one
            # before they are answered. One without replicas cannot confirm any (and
            # loses whatever a failed primary held anyway). CLUSTER NODES, not the slot
            # map: CLUSTER SLOTS leaves out replicas that have not synced yet.
            nodes = await self.cluster.cluster_nodes()
            has_replicas = any({"slave", "replica"} & set(str(info.get("flags", "")).split(","))
                               for info in nodes.values())
            self.replica_acks = 1 if has_replicas else 0
            log.info("replica acknowledgements per purchase: %d", self.replica_acks)
        self._ready = True

    def _node_lanes(self) -> list[LaneKey]:
        return [(node.name, False) for node in self.cluster.get_primaries()]

    def _lane_of(self, key: Any) -> LaneKey:
        if key is None:
            return self.cluster.get_default_node().name, False
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return self.cluster.nodes_manager.get_node_from_slot(slot).name, False

    def _on_reply(self, lane: Lane, call: Call, reply: Any) -> None:
        if isinstance(reply, AskError) and call.redirects < self.max_redirects:
            # MovedError is an AskError too. MOVED: the slot map is stale; ASK: only this
            # call goes elsewhere, once, after ASKING. Neither ran the script.
            call.redirects += 1
            moved = isinstance(reply, MovedError)
            if moved:
                self._refresh_soon()
            self._enqueue((f"{reply.host}:{reply.port}", not moved), call)
            return
        if isinstance(reply, ClusterDownError):
            self._refresh_soon()
        self._answer(call, reply)

    def _on_node_failure(self, lane: Lane) -> None:
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        """Re-read the slot map in the background, once for all who ask meanwhile."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._spawn(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self.cluster.nodes_manager.initialize()
        except PIPELINE_FAILURES as exc:
            log.warning("cluster slot map refresh failed: %s", type(exc).__name__)
            return
        known = self.cluster.nodes_manager.nodes_cache
        for key, lane in list(self._lanes.items()):
            if key[0] not in known and not lane.pending and lane.link is not None:
                del self._lanes[key]  # a node that left the cluster
                lane.link.abort(ConnectionError(f"{key[0]} left the cluster"))

