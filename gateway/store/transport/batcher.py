"""Micro-batching of script calls: many concurrent EVALSHAs, one pipeline per node.

The purchase path is bound by the client's per-call cost, not by Redis: redis-py packs
every argument in Python, checks a connection out of its pool, arms timeouts and reads
each reply through a coroutine of its own. A :class:`Batcher` instead queues the script
calls per destination node (a *lane*, one connection: ``transport.link``) and writes
each lane's queue as one pipeline:

- once per event-loop tick, so the calls made by all the requests handled in one tick
  share a write (a batch that reaches ``max_batch`` calls goes out at once);
- with at most ``window`` pipelines unanswered per lane: calls made while a lane waits
  go out together when an answer comes. Under load the batches grow, not the writes.

It is a client-like facade (``evalsha``, ``script_load``), so a script owner calls it
as it would call a redis-py client. Every caller gets its own reply or its own error
(redis-py's exception classes); one failing call never fails the others of its batch,
and a caller that is cancelled only stops waiting (a call not yet written is dropped).
Pipelines may end with a WAIT for replicas (``transport.replication``).

:class:`StandaloneBatcher` sends to the server of a ``redis.asyncio.Redis`` client;
``transport.cluster`` routes by slot on a Cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, RedisClusterException, RedisError

from gateway.store.transport.link import Call, Link, NodeOptions, own_copy
from gateway.store.transport.replication import (
    ACK_BUDGET_MS,
    ACK_TIMEOUT_MS,
    Ack,
    ReplicasRefused,
    Shortfall,
    online_replicas,
)

log = logging.getLogger("gateway.batcher")

MAX_BATCH = 256
WINDOW = 2

# What fails a whole connection (or a slot-map refresh). The same list as
# store.connection.REDIS_FAILURES, kept here so that the transport does not import it.
PIPELINE_FAILURES: tuple[type[BaseException], ...] = (
    RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

BatchObserver = Callable[[int], None]
ReplicateWhen = Callable[[str, Any], bool]


LaneKey = tuple[str, bool]  # (node "host:port", its calls are sent after ASKING)


def never(sha: str, reply: Any) -> bool:
    """The default: no reply waits for replicas."""
    return False




@dataclass(slots=True, eq=False)
class Lane:
    """The calls bound for one node (one connection), and its pipelines in flight."""

    key: LaneKey
    pending: list[Call] = field(default_factory=list)
    in_flight: int = 0
    link: Link | None = None
    connecting: bool = False
    replicas: int | None = None  # online replicas of the node (None: not known yet)
    refusing: bool = False       # strict policy: its acknowledgements fell short


class Batcher:
    """Queues EVALSHA calls per lane and writes each lane's queue as a pipeline.

    ``replica_acks``: replicas that must have a purchase before its 200 is handed over
    (0: none, no WAIT; None: decided when the batcher first connects, see
    :meth:`_prepare`), at most as many as the node has; ``ack_timeout_ms``: how long one
    WAIT may wait for them, ``ack_budget_ms`` how long WAITs may go on; ``strict``:
    refuse calls that need replicas (``replicated(sha)``; None: every call) rather than answer them
    unprotected (see ``transport.replication``). ``on_unprotected(n)`` hears of replies
    that needed a replica and were answered without one."""

    def __init__(self, options: NodeOptions, *, max_batch: int = MAX_BATCH,
                 window: int = WINDOW, on_batch: BatchObserver | None = None,
                 replica_acks: int | None = 0, ack_timeout_ms: int = ACK_TIMEOUT_MS,
                 ack_budget_ms: int = ACK_BUDGET_MS, strict: bool = False,
                 must_replicate: ReplicateWhen = never,
                 replicated: Callable[[str], bool] | None = None,
                 on_unprotected: BatchObserver | None = None,
                 probe_every: float = 1.0) -> None:
        if max_batch < 1 or window < 1:
            raise ValueError("max_batch and window must be at least 1")
        if replica_acks is not None and replica_acks < 0:
            raise ValueError("replica_acks must be at least 0 (or None: decide on connecting)")
        if ack_timeout_ms < 1:
            raise ValueError("ack_timeout_ms must be at least 1 (WAIT 0 waits forever)")
        self.options = options
        self.max_batch = max_batch
        self.window = window
        self.on_batch = on_batch
        self.replica_acks = replica_acks
        self.ack_timeout_ms = ack_timeout_ms
        self.ack_budget_ms = max(ack_budget_ms, ack_timeout_ms)
        self.strict = strict
        self.must_replicate = must_replicate
        self.replicated = replicated
        self.on_unprotected = on_unprotected
        self.probe_every = probe_every
        self._probing: asyncio.Task[None] | None = None
        self._lanes: dict[LaneKey, Lane] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading: dict[str, asyncio.Future[str]] = {}
        self._ready = False  # what _lane_of needs is there
        self._preparing: asyncio.Future[None] | None = None
        self._closed = False

    # -- the client-like facade -----------------------------------------------------------

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        call = Call(hiredis.pack_command(("EVALSHA", sha, numkeys, *keys_and_args)),
                    asyncio.get_running_loop().create_future(), sha=sha)
        if not self._ready:
            await self._prepare_once()
        self._enqueue(self._lane_of(keys_and_args[0] if numkeys else None), call)
        return await call.future

    async def script_load(self, script: str) -> str:
        """Load a script through the wrapped client. The callers of a batch that met
        NOSCRIPT (after a failover or a SCRIPT FLUSH) all ask at once; they share one load."""
        loading = self._loading.get(script)
        if loading is None:
            loading = asyncio.ensure_future(self._script_load(script))
            self._loading[script] = loading
            loading.add_done_callback(lambda done: self._loaded(script, done))
        return await asyncio.shield(loading)

    async def drain(self) -> None:
        """Write what is queued and wait for every reply due (and any background work)."""
        while True:
            self._flush()
            links = [lane.link for lane in self._lanes.values() if lane.link is not None]
            waits = [link.idle() for link in links if link.waiting]
            if not waits and not self._tasks and not any(
                    lane.pending for lane in self._lanes.values()):
                return
            await asyncio.gather(*waits, *self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Drain, then close the connections (the wrapped client is the caller's)."""
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
        await self.drain()
        self._closed = True
        for lane in self._lanes.values():
            if lane.link is not None:
                lane.link.abort(ConnectionError("batcher closed"))
        self._lanes.clear()

    async def warm(self) -> None:
        """Connect to every node now (and learn their replicas), so that the first
        purchases of a sale do not also pay for the connections."""
        await self._prepare_once()
        for key in self._node_lanes():
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = Lane(key)
            if lane.link is None and not lane.connecting:
                lane.connecting = True
                await self._connect(lane)

    def _node_lanes(self) -> list[LaneKey]:
        """The lanes of every node calls can go to."""
        raise NotImplementedError

    # -- what a kind of deployment decides ------------------------------------------------

    async def _prepare_once(self) -> None:
        """:meth:`_prepare`, once for all the callers that arrive meanwhile (again after
        a failure). They resume together, so their calls still share the first flush."""
        if self._preparing is None or self._preparing.done():
            self._preparing = asyncio.ensure_future(self._prepare())
            self._preparing.add_done_callback(
                lambda done: done.cancelled() or done.exception())  # retrieved
        await asyncio.shield(self._preparing)

    @property
    def ack_slack(self) -> float:
        """Seconds WAITs may hold a connection's replies (0 without replica acks)."""
        return (self.ack_budget_ms + self.ack_timeout_ms) / 1000 if self.replica_acks else 0.0

    def degraded(self) -> list[dict[str, Any]]:
        """Nodes whose purchases cannot be acknowledged by as many replicas as configured
        (answered unprotected, or refused under the strict policy)."""
        wanted = self.replica_acks or 0
        return [{"node": lane.key[0], "replicas": lane.replicas, "wanted": wanted,
                 "refusing": lane.refusing or self.strict}
                for lane in self._lanes.values()
                if not lane.key[1] and wanted and (lane.refusing or (
                    lane.replicas is not None and lane.replicas < wanted))]

    async def _prepare(self) -> None:
        """Whatever routing needs before the first call (the cluster's slot map)."""
        if self.replica_acks is None:
            self.replica_acks = 0
        self._ready = True

    def _lane_of(self, key: Any) -> LaneKey:
        """The lane for a call whose first key is ``key`` (None: a call without keys)."""
        raise NotImplementedError

    async def _script_load(self, source: str) -> str:
        raise NotImplementedError

    def _on_reply(self, lane: Lane, call: Call, reply: Any) -> None:
        self._answer(call, reply)

    def _answer(self, call: Call, reply: Any) -> None:
        """Hand the reply over, or hold it for the WAIT closing its pipeline."""
        if call.ack is not None and not isinstance(reply, BaseException) \
                and self.must_replicate(call.sha, reply):
            call.ack.held.append((call, reply))
            return
        if call.unprotected and not isinstance(reply, BaseException) \
                and self.must_replicate(call.sha, reply):
            self._count_unprotected(1)
        call.resolve(reply)

    def _on_node_failure(self, lane: Lane) -> None:
        """A connection to the lane's node failed or was lost."""

    # -- queueing -------------------------------------------------------------------------

    def _enqueue(self, key: LaneKey, call: Call) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(key)
        lane.pending.append(call)
        if len(lane.pending) >= self.max_batch:
            self._send_from(lane)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for lane in list(self._lanes.values()):
            if lane.pending:
                self._send_from(lane)

    def _send_from(self, lane: Lane) -> None:
        """Write pipelines from the lane's queue while its window has room."""
        if lane.link is None:
            if lane.pending and not lane.connecting:
                lane.connecting = True
                self._spawn(self._connect(lane))
            return
        while lane.pending and lane.in_flight < self.window:
            calls = [call for call in lane.pending[:self.max_batch] if not call.future.done()]
            del lane.pending[:self.max_batch]
            if not calls:
                continue
            if self.on_batch is not None:
                try:
                    self.on_batch(len(calls))
                except Exception:  # pragma: no cover - a metrics bug must not fail purchases
                    log.exception("batch observer failed")
            ack = self._ack_for(lane, calls)
            if not calls:
                continue
            lane.in_flight += 1
            lane.link.write(calls, asking=lane.key[1], ack=ack)

    def _ack_for(self, lane: Lane, calls: list[Call]) -> Ack | None:
        """The WAIT that closes this pipeline, if any; under the strict policy, refuses
        (and takes out of ``calls``) what needs replicas the node does not have."""
        wanted = self.replica_acks or 0
        if not wanted:
            return None
        needs = self.replicated or (lambda sha: True)
        if not any(needs(call.sha) for call in calls):
            return None  # nothing here waits for replicas (shard creation, key binding ...)
        short = lane.refusing or (lane.replicas is not None and lane.replicas < wanted)
        if short and self.strict:
            refused = [call for call in calls if needs(call.sha)]
            for call in refused:
                calls.remove(call)
                call.resolve(ReplicasRefused(
                    f"{lane.key[0]} has {lane.replicas} of the {wanted} replicas a purchase "
                    "needs (strict policy): nothing was admitted"))
            return None
        if lane.replicas is not None:
            wanted = min(wanted, lane.replicas)
        if wanted == 0:
            for call in calls:
                call.unprotected = True
            return None
        return Ack(wanted, self.ack_timeout_ms,
                   asyncio.get_running_loop().time() + self.ack_budget_ms / 1000)

    def _shortfall(self, lane: Lane, ack: Ack) -> Shortfall:
        """A WAIT counted fewer replicas than wanted."""
        if lane.replicas == 0 and not self.strict:
            self._count_unprotected(len(ack.held))
            return Shortfall.ACCEPT  # the node's replica is gone: nothing to wait for
        link = lane.link
        if asyncio.get_running_loop().time() < ack.deadline and link is not None and not link.closed:
            lane.in_flight += 1
            ack.waits += 1
            link.write([], asking=False, ack=ack)
            return Shortfall.WAIT_AGAIN
        if self.strict:
            lane.refusing = True
        return Shortfall.GIVE_UP

    def _count_unprotected(self, count: int) -> None:
        if count and self.on_unprotected is not None:
            try:
                self.on_unprotected(count)
            except Exception:  # pragma: no cover - a metrics bug must not fail purchases
                log.exception("unprotected observer failed")

    async def _connect(self, lane: Lane) -> None:
        host, _, port = lane.key[0].rpartition(":")
        try:
            link = await Link.open(self, lane, host, int(port), self.options)
            if self.replica_acks and lane.replicas is None:
                # How many replicas can acknowledge, before the first pipeline waits for them.
                await self._probe(lane, link)
        except BaseException as exc:  # every waiting caller must hear back
            pending, lane.pending = lane.pending, []
            for call in pending:
                call.resolve(own_copy(exc))
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, PIPELINE_FAILURES):
                log.exception("opening a connection to %s failed", lane.key[0])
            self._on_node_failure(lane)
            return
        finally:
            lane.connecting = False
        if self._closed or self._lanes.get(lane.key) is not lane:  # closed meanwhile
            link.abort(ConnectionError("batcher closed"))
            pending, lane.pending = lane.pending, []
            for call in pending:
                call.resolve(ConnectionError("batcher closed"))
            return
        lane.link, lane.in_flight = link, 0
        if self.replica_acks and self._probing is None:
            # Not among the tasks drain() waits for: it runs until aclose().
            self._probing = asyncio.get_running_loop().create_task(self._probe_forever())
        self._send_from(lane)

    async def _probe(self, lane: Lane, link: Link) -> None:
        try:
            lane.replicas = online_replicas(await link.command("INFO", "replication"))
        except PIPELINE_FAILURES:
            return
        if lane.refusing and lane.replicas >= (self.replica_acks or 0):
            lane.refusing = False
            log.info("replica acknowledgements back", extra={"node": lane.key[0]})

    async def _probe_forever(self) -> None:
        """Keep each node's count of replicas current (one INFO per node per interval,
        on the lane's own connection)."""
        while not self._closed:
            await asyncio.sleep(self.probe_every)
            for lane in list(self._lanes.values()):
                if lane.link is not None and not lane.link.closed and not lane.key[1]:
                    await self._probe(lane, lane.link)

    def _on_answered(self, lane: Lane) -> None:
        """The last reply of one of the lane's pipelines came: its window has room."""
        lane.in_flight -= 1
        if lane.pending:
            self._send_from(lane)

    def _on_lost(self, link: Link) -> None:
        lane = link.lane
        if lane.link is link and not self._closed:
            lane.link, lane.in_flight = None, 0
            self._on_node_failure(lane)
            if lane.pending:  # calls queued meanwhile go on a new connection
                self._send_from(lane)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task held until done (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _loaded(self, source: str, done: asyncio.Future[str]) -> None:
        self._loading.pop(source, None)
        if not done.cancelled():
            done.exception()  # retrieved, even when every caller was cancelled


class StandaloneBatcher(Batcher):
    """Batches onto the server of one ``redis.asyncio.Redis`` client."""

    def __init__(self, client: Redis, options: NodeOptions | None = None, **kwargs: Any) -> None:
        pool = client.connection_pool
        options = options or NodeOptions.of(pool.connection_kwargs, pool.connection_class)
        if options is None:
            raise ValueError("this kind of connection is not supported by the batcher")
        super().__init__(options, **kwargs)
        self.client = client
        address = f"{pool.connection_kwargs.get('host', 'localhost')}:" \
                  f"{pool.connection_kwargs.get('port', 6379)}"
        self._lane: LaneKey = (address, False)

    def _lane_of(self, key: Any) -> LaneKey:
        return self._lane

    def _node_lanes(self) -> list[LaneKey]:
        return [self._lane]

    async def _script_load(self, source: str) -> str:
        return await self.client.script_load(source)

