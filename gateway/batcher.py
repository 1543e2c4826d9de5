"""Micro-batching of script calls: many concurrent EVALSHAs, one pipeline per node.

The purchase path is bound by the client's per-call cost, not by Redis: redis-py packs
every argument in Python, checks a connection out of its pool, arms timeouts and reads
each reply through a coroutine of its own. A :class:`Batcher` instead queues the script
calls per destination node (a *lane*) and writes each lane's queue as one pipeline:

- once per event-loop tick, so the calls made by all the requests handled in one tick
  share a write (a batch that reaches ``max_batch`` calls goes out at once);
- with at most ``window`` pipelines unanswered per lane: calls made while a lane waits
  go out together when an answer comes. Under load the batches grow, not the writes.

Each lane has one connection of its own (:class:`_Link`): commands are packed by
hiredis when they are queued, written as they go, and the replies (Redis answers in
order) are parsed by hiredis and handed to their callers as they arrive.

It is a client-like facade: ``gateway.scripts.Script.__call__`` uses it unchanged
through :meth:`Batcher.evalsha` and :meth:`Batcher.script_load`. Every caller gets its
own reply or its own error (the exception classes are redis-py's: ``NoScriptError``,
``ResponseError`` ...); one failing call never fails the others of its batch, and a
caller that is cancelled only stops waiting (a call not yet written is dropped).

- :class:`StandaloneBatcher` sends to the server of a ``redis.asyncio.Redis`` client.
- :class:`ClusterBatcher` routes by slot (redis-py refuses EVALSHA in a cluster
  pipeline) to the slot's primary, from the ``RedisCluster`` client's slot map; it
  follows MOVED and ASK a bounded number of times and refreshes the slot map after a
  MOVED, a CLUSTERDOWN or a failed node.

When a connection fails (refused, lost, no answer within the socket timeout) the calls
waiting on it get a ``redis.exceptions.ConnectionError`` or ``TimeoutError`` (a
``RedisError``: the HTTP layer answers 503) and the connection is dropped. A call is
never resent after it was written, since its script may have run: a purchase run twice
would answer its own 409 duplicate instead of its 200.

Replica acknowledgements (``replica_acks`` > 0). Redis replicates asynchronously: a
purchase a primary acknowledged can be lost with it when it fails before its replica
got the write, and the replica promoted in its place never saw a purchase that was
answered 200. So each pipeline then ends with ``WAIT <replica_acks> <ack_timeout_ms>``
(on the same connection: WAIT covers every write made before it on its connection). A
reply that must survive a failover (:func:`must_replicate`: the purchase script's OK,
or the stored 200 of a used key) is handed to its caller only once WAIT has counted
enough replicas; when it counts fewer (or the connection is lost first), the caller
gets a ``TimeoutError`` instead: a 503, "retry with the same key". The script did run:
the retry returns the stored outcome if it survived, or buys again if it was lost, so
no 200 is ever given for a purchase a failover can lose. Replies that are not such a
purchase (other outcomes, other scripts, errors) are handed over as they come.

Supported connections: TCP, with a password (and user name) and a database number. For
anything else (TLS, a Unix socket, a credential provider) :func:`batcher_for` gives no
batcher and the calls go through the client unbatched.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Mapping

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import (AskError, ClusterDownError, ConnectionError, InvalidResponse,
                              MovedError, RedisClusterException, RedisError, TimeoutError)

from .codes import Purchase

log = logging.getLogger("gateway.batcher")

MAX_BATCH = 256
WINDOW = 2
MAX_REDIRECTS = 3
ACK_TIMEOUT_MS = 200

# What fails a whole connection (or a slot-map refresh). The same list as
# redis_conn.REDIS_FAILURES, kept here so that this module does not import redis_conn.
PIPELINE_FAILURES: tuple[type[BaseException], ...] = (
    RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

BatchObserver = Callable[[int], None]

_ASKING = hiredis.pack_command(("ASKING",))


@functools.lru_cache(maxsize=8)
def _wait_command(replicas: int, timeout_ms: int) -> bytes:
    return hiredis.pack_command(("WAIT", replicas, timeout_ms))


def must_replicate(reply: Any) -> bool:
    """Whether a script reply answers a 200 that a failover must not lose: the purchase
    script's OK (``{0, order_no, ...}``) or the stored 200 of a key used before
    (``{1, 200, ...}``). Other scripts' replies do not start with an integer 0 or 1
    (the first element of a purchase reply is an integer, never a string)."""
    if type(reply) is not list or not reply or type(reply[0]) is not int:
        return False
    if reply[0] == Purchase.OK:
        return True
    return reply[0] == Purchase.DUPLICATE and len(reply) > 1 and reply[1] in ("200", b"200", 200)


@dataclass(slots=True, eq=False)
class _Ack:
    """The WAIT that closes a pipeline, and the replies of the pipeline held until it
    answers (see :func:`must_replicate`)."""

    wanted: int
    timeout_ms: int
    held: list[tuple["_Call", Any]] = field(default_factory=list)

    def settle(self, reply: Any) -> None:
        """WAIT answered (the number of replicas that have every write made so far on
        the connection), or failed (an error, the connection lost)."""
        held, self.held = self.held, []
        if not held:
            return
        # Always a TimeoutError, even for a lost connection: these purchases were made,
        # so their outcome is unknown to the caller, not "nothing was admitted".
        if isinstance(reply, BaseException):
            error: BaseException | None = TimeoutError(f"replication not confirmed: {reply}")
        elif isinstance(reply, int) and reply >= self.wanted:
            error = None
        else:
            error = TimeoutError(f"replication not confirmed: {reply} of {self.wanted} replicas "
                                 f"acknowledged within {self.timeout_ms} ms")
        for call, result in held:
            call.resolve(result if error is None else _own_copy(error))


@dataclass(slots=True, eq=False)
class _Call:
    """One caller's command, waiting for its reply."""

    packed: bytes  # the command in the Redis protocol
    future: asyncio.Future[Any]
    redirects: int = 0
    ack: _Ack | None = None  # the WAIT after it in its pipeline, if any

    def resolve(self, result: Any) -> None:
        if self.future.done():  # the caller was cancelled; the others go on
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


def _own_copy(exc: BaseException) -> BaseException:
    """A separate exception object per caller, so that raising it in many tasks does
    not chain their tracebacks onto one shared object."""
    try:
        clone = copy.copy(exc)
    except Exception:  # pragma: no cover - exotic exception classes
        return exc
    clone.__cause__ = exc
    return clone


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """How to open a connection to a node: what the wrapped client was given."""

    username: str | None = None
    password: str | None = None
    db: int = 0
    encoding: str | None = "utf-8"  # None: replies stay bytes (decode_responses=False)
    encoding_errors: str = "strict"
    connect_timeout: float | None = None
    timeout: float | None = None  # no reply within this many seconds: the connection is dropped

    @classmethod
    def of(cls, kwargs: Mapping[str, Any], connection_class: type | None = None
           ) -> "NodeOptions | None":
        """From a redis-py connection's class and keyword arguments; None when a batcher
        cannot open such a connection (TLS, Unix socket, credential provider ...)."""
        if (connection_class or kwargs.get("connection_class", Connection)) is not Connection \
                or kwargs.get("path") or kwargs.get("credential_provider") is not None:
            return None
        return cls(
            username=kwargs.get("username"), password=kwargs.get("password"),
            db=int(kwargs.get("db") or 0),
            encoding=kwargs.get("encoding", "utf-8") if kwargs.get("decode_responses") else None,
            encoding_errors=kwargs.get("encoding_errors", "strict"),
            connect_timeout=kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout"),
            timeout=kwargs.get("socket_timeout"))


class _Link(asyncio.Protocol):
    """One connection to one node. Replies come back in the order the commands were
    written; each goes to the batcher (``_on_reply``) for its caller."""

    def __init__(self, batcher: "Batcher", lane: "_Lane", options: NodeOptions) -> None:
        self.batcher = batcher
        self.lane = lane
        self.options = options
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # (call, is the last of its pipeline); None: the reply of an ASKING; an _Ack:
        # the reply of the WAIT that closes a pipeline
        self.waiting: deque[tuple[_Call | _Ack | None, bool]] = deque()
        self.written = 0  # replies due since the connection opened
        self.received = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle: asyncio.Future[None] | None = None
        errors = {"encoding": options.encoding, "errors": options.encoding_errors} \
            if options.encoding else {}
        self.reader = hiredis.Reader(protocolError=InvalidResponse,
                                     replyError=BaseParser.parse_error, **errors)

    @classmethod
    async def open(cls, batcher: "Batcher", lane: "_Lane", host: str, port: int,
                   options: NodeOptions) -> "_Link":
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(options.connect_timeout):
                _, link = await loop.create_connection(
                    lambda: cls(batcher, lane, options), host, port)
        except (OSError, asyncio.TimeoutError) as exc:
            kind = TimeoutError if isinstance(exc, asyncio.TimeoutError) else ConnectionError
            raise kind(f"Error connecting to {host}:{port}: {exc!r}") from exc
        try:
            if options.password is not None:
                credentials = (options.username, options.password) if options.username \
                    else (options.password,)
                await link.command("AUTH", *credentials)
            if options.db:
                await link.command("SELECT", options.db)
        except BaseException:
            link.abort(ConnectionError(f"{host}:{port}: connection setup failed"))
            raise
        return link

    async def command(self, *args: Any) -> Any:
        """One command outside of any lane (the connection's setup)."""
        call = _Call(hiredis.pack_command(args), asyncio.get_running_loop().create_future())
        self.write([call], asking=False, last=False)
        return await call.future

    def write(self, calls: list[_Call], asking: bool, last: bool = True,
              ack: _Ack | None = None) -> None:
        """Write one pipeline; ``ack``: close it with a WAIT (``last`` must be true)."""
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        for call in calls:
            if asking:
                self.waiting.append((None, False))
            call.ack = ack
            self.waiting.append((call, False))
        self.written += len(calls) * (2 if asking else 1)
        payload = b"".join(_ASKING + c.packed for c in calls) if asking \
            else b"".join([c.packed for c in calls])
        if ack is not None:
            self.waiting.append((ack, True))
            self.written += 1
            payload += _wait_command(ack.wanted, ack.timeout_ms)
        elif last:
            self.waiting[-1] = (calls[-1], True)
        self.transport.write(payload)
        if self._watchdog is None and self.options.timeout:
            self._arm()

    def _arm(self) -> None:
        """One timer per connection, not one per pipeline: a timer per write would keep
        thousands alive at a time, old enough to be promoted and to feed full GC runs."""
        # A WAIT may hold the connection's replies for up to its own timeout.
        self._watchdog = asyncio.get_running_loop().call_later(
            self.options.timeout + self.batcher.ack_slack,  # type: ignore[operator]
            self._watch, self.received, self.written)

    def _watch(self, received: int, written: int) -> None:
        """No reply at all, for a whole timeout, to what was waiting when armed: the node
        is gone or stuck (what redis-py's socket timeout detects, per connection)."""
        self._watchdog = None
        if self.closed or not self.waiting:
            return
        if self.received == received < written:
            self.abort(TimeoutError(f"Timeout reading from {self.lane.key[0]}"))
        else:
            self._arm()

    async def idle(self) -> None:
        """Until every reply due has come (or the connection is gone)."""
        if self.waiting and not self.closed:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    def abort(self, error: BaseException) -> None:
        """Drop the connection; every call waiting on it gets ``error``."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.transport is not None:
            self.transport.abort()
        waiting, self.waiting = self.waiting, deque()
        for call, _ in waiting:
            if type(call) is _Call:
                call.resolve(_own_copy(error))
            elif call is not None:
                call.settle(error)  # replies held for a WAIT that will not come
        self._set_idle()
        self.batcher._on_lost(self)

    def _set_idle(self) -> None:
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self._idle = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:
                self.abort(exc)
                return
            if reply is False:
                return
            self.received += 1
            call, last = self.waiting.popleft()
            if type(call) is _Call:
                self.batcher._on_reply(self.lane, call, reply)
            elif call is not None:
                call.settle(reply)
            if last:
                self.batcher._on_answered(self.lane)
        self._set_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(ConnectionError(f"Connection to {self.lane.key[0]} lost: {exc!r}"))


LaneKey = tuple[str, bool]  # (node "host:port", its calls are sent after ASKING)


@dataclass(slots=True, eq=False)
class _Lane:
    """The calls bound for one node (one connection), and its pipelines in flight."""

    key: LaneKey
    pending: list[_Call] = field(default_factory=list)
    in_flight: int = 0
    link: _Link | None = None
    connecting: bool = False


class Batcher:
    """Queues EVALSHA calls per lane and writes each lane's queue as a pipeline.

    ``replica_acks``: replicas that must have a purchase before its 200 is handed over
    (0: none, no WAIT; None: decided when the batcher first connects, see
    :meth:`_prepare`); ``ack_timeout_ms``: how long a WAIT may wait for them."""

    def __init__(self, options: NodeOptions, *, max_batch: int = MAX_BATCH,
                 window: int = WINDOW, on_batch: BatchObserver | None = None,
                 replica_acks: int | None = 0, ack_timeout_ms: int = ACK_TIMEOUT_MS,
                 must_replicate: Callable[[Any], bool] = must_replicate) -> None:
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
        self.must_replicate = must_replicate
        self._lanes: dict[LaneKey, _Lane] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading: dict[str, asyncio.Future[str]] = {}
        self._ready = False  # what _lane_of needs is there
        self._preparing: asyncio.Future[None] | None = None
        self._closed = False

    # -- the client-like facade -----------------------------------------------------------

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        call = _Call(hiredis.pack_command(("EVALSHA", sha, numkeys, *keys_and_args)),
                     asyncio.get_running_loop().create_future())
        if not self._ready:
            await self._prepare_once()
        self._enqueue(self._lane_of(keys_and_args[0] if numkeys else None), call)
        return await call.future

    async def script_load(self, source: str) -> str:
        """Load a script through the wrapped client. The callers of a batch that met
        NOSCRIPT (after a failover or a SCRIPT FLUSH) all ask at once; they share one load."""
        loading = self._loading.get(source)
        if loading is None:
            loading = asyncio.ensure_future(self._script_load(source))
            self._loading[source] = loading
            loading.add_done_callback(lambda done: self._loaded(source, done))
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
        await self.drain()
        self._closed = True
        for lane in self._lanes.values():
            if lane.link is not None:
                lane.link.abort(ConnectionError("batcher closed"))
        self._lanes.clear()

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
        """Seconds a WAIT may hold a connection's replies (0 without replica acks)."""
        return self.ack_timeout_ms / 1000 if self.replica_acks else 0.0

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

    def _on_reply(self, lane: _Lane, call: _Call, reply: Any) -> None:
        self._answer(call, reply)

    def _answer(self, call: _Call, reply: Any) -> None:
        """Hand the reply over, or hold it for the WAIT closing its pipeline."""
        if call.ack is not None and not isinstance(reply, BaseException) \
                and self.must_replicate(reply):
            call.ack.held.append((call, reply))
        else:
            call.resolve(reply)

    def _on_node_failure(self, lane: _Lane) -> None:
        """A connection to the lane's node failed or was lost."""

    # -- queueing -------------------------------------------------------------------------

    def _enqueue(self, key: LaneKey, call: _Call) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
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

    def _send_from(self, lane: _Lane) -> None:
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
            lane.in_flight += 1
            ack = _Ack(self.replica_acks, self.ack_timeout_ms) if self.replica_acks else None
            lane.link.write(calls, asking=lane.key[1], ack=ack)

    async def _connect(self, lane: _Lane) -> None:
        host, _, port = lane.key[0].rpartition(":")
        try:
            link = await _Link.open(self, lane, host, int(port), self.options)
        except BaseException as exc:  # every waiting caller must hear back
            pending, lane.pending = lane.pending, []
            for call in pending:
                call.resolve(_own_copy(exc))
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
        self._send_from(lane)

    def _on_answered(self, lane: _Lane) -> None:
        """The last reply of one of the lane's pipelines came: its window has room."""
        lane.in_flight -= 1
        if lane.pending:
            self._send_from(lane)

    def _on_lost(self, link: _Link) -> None:
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

    async def _script_load(self, source: str) -> str:
        return await self.client.script_load(source)


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

    def _lane_of(self, key: Any) -> LaneKey:
        if key is None:
            return self.cluster.get_default_node().name, False
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return self.cluster.nodes_manager.get_node_from_slot(slot).name, False

    def _on_reply(self, lane: _Lane, call: _Call, reply: Any) -> None:
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

    def _on_node_failure(self, lane: _Lane) -> None:
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


def batcher_for(client: Redis | RedisCluster, **kwargs: Any) -> Batcher | None:
    """The batcher for ``client``'s deployment, or None when its connections are of a
    kind the batcher does not open (the calls then go through the client unbatched)."""
    try:
        if isinstance(client, RedisCluster):
            return ClusterBatcher(client, **kwargs)
        return StandaloneBatcher(client, **kwargs)
    except ValueError:
        return None
