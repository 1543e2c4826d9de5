"""Fault-injecting TCP proxies in front of Redis nodes, for tests and load tools.

A :class:`FaultProxy` listens on a local port and forwards every connection to one
Redis node, byte for byte and in order, unless told to misbehave: hold the replies
(past a client's socket timeout, so the client gives up on a command that did run),
hold the requests, swallow everything (a blackhole), stop forwarding for a while
(pause), reset every connection, or refuse new ones. It runs in the caller's event
loop::

    async with FaultProxy("127.0.0.1", redis_port) as proxy:
        client = redis.asyncio.Redis(port=proxy.port, socket_timeout=0.2)
        proxy.delay_reply_to("INCR", 0.5)      # only the next INCR's reply is late
        await client.incr("k")                 # times out; did the INCR run? (yes)

The proxy reads the Redis protocol (RESP2 and RESP3) in both directions to know
where each reply starts, which is what lets one reply be late without reordering
the others, and the reply to one command be singled out. A connection whose
replies stop pairing with its requests (SUBSCRIBE, MONITOR, CLIENT REPLY, a
replica's link) is still forwarded, only the per-reply faults no longer see it.

Synchronous tests and load tools, or a gateway running as a subprocess, use
:class:`ProxyFleet`: proxies on an event loop in a background thread, controlled
through thread-safe :class:`ProxyHandle` objects. Clients need no callback: they
connect to the proxies' ports.

For a Redis Cluster, :class:`ProxiedCluster` puts a proxy in front of every node of
a :class:`devtools.redis_cluster.LocalCluster` and makes each node *announce* its
proxy's port (``cluster-announce-port``) so that CLUSTER SLOTS, CLUSTER NODES,
MOVED and ASK send clients to the proxies; the cluster bus keeps the real ports.
Replicas then replicate through their primary's proxy too (Redis gives a replica
no other address); the proxy recognises such links and spares them from faults
unless asked otherwise (``spare_replication=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

import redis
import redis.cluster
from redis.crc import key_slot

from devtools.redis_cluster import LocalCluster, LocalNode

__all__ = [
    "FaultProxy",
    "Predicate",
    "ProxiedCluster",
    "ProxyFleet",
    "ProxyHandle",
    "ProxyStats",
    "RespError",
    "RespScanner",
    "command_is",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Predicate = Callable[[Sequence[bytes]], bool]
"""Tells from a command's arguments (``[b"INCR", b"key"]``) whether a fault applies."""
Direction = Literal["request", "reply"]

READ_SIZE = 64 * 1024
# A pump's queue holds at most this many chunks (each at most READ_SIZE); when it is
# full the pump stops reading and TCP pushes back on the sender, so a paused proxy
# does not buffer without bound.
QUEUE_CHUNKS = 256
MAX_LINE = 64 * 1024  # Redis' own limit for an inline command or a header line
CONNECT_TIMEOUT = 5.0
BUS_PORT_OFFSET = 10000
_POLL_INTERVAL = 0.1

# After these, replies no longer pair one to one with requests.
_REPLICATION = frozenset({b"SYNC", b"PSYNC", b"REPLCONF"})
_UNPAIRED = _REPLICATION | {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR"}


def command_is(*names: str) -> Predicate:
    """A predicate matching commands by name, case-insensitively: ``command_is("INCR")``."""
    wanted = frozenset(name.upper().encode() for name in names)
    return lambda args: bool(args) and args[0].upper() in wanted


# ------------------------------------------------------------------ RESP scanning


class RespError(ValueError):
    """The bytes are not the Redis protocol (the proxy then stops looking at them)."""


_SIMPLE = frozenset(b"+-:_,#(")  # one line: status, error, integer, null, double, bool, bignum
_BLOB = frozenset(b"$=!")  # length line, then payload: bulk, verbatim, blob error
_AGGREGATE = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2}  # array, set, push, map
_ATTRIBUTE = ord("|")  # RESP3: n key/value pairs, then the value they describe
_ARRAY = ord("*")
_PUSH = ord(">")


class RespScanner:
    """Finds where each top-level RESP frame ends in a byte stream fed in pieces.

    It only counts: lines, blob lengths and how many elements each open aggregate
    still expects, so a frame split over any number of reads costs no re-parsing.
    With ``requests=True`` it also returns each command's arguments (the
    elements of a request array, or the words of an inline command).
    """

    def __init__(self, *, requests: bool) -> None:
        self._requests = requests
        self._line = bytearray()  # an incomplete line from the previous feed
        self._blob_left = 0  # payload bytes (with their CRLF) still to come
        self._stack: list[int] = []  # elements each open aggregate still expects
        self._capture = False  # the current blob is a command argument
        self._arg = bytearray()
        self._args: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, list[bytes]]]:
        """``(end offset in data, arguments)`` for every frame completed by ``data``.

        Raises :class:`RespError` if ``data`` does not continue a RESP stream.
        """
        frames: list[tuple[int, list[bytes]]] = []
        i, n = 0, len(data)
        while i < n:
            if self._blob_left:
                take = min(self._blob_left, n - i)
                if self._capture:
                    self._arg += data[i : i + take]
                i += take
                self._blob_left -= take
                if not self._blob_left and self._blob_done():
                    frames.append((i, self._take_args()))
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > MAX_LINE:
                    raise RespError("line too long")
                break
            if self._line:
                self._line += data[i : j + 1]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[i : j + 1]
            i = j + 1
            if self._line_done(line):
                frames.append((i, self._take_args()))
        return frames

    def _line_done(self, line: bytes) -> bool:
        """Account for one line; True if it completed a top-level frame."""
        kind = line[0]
        if self._requests and not self._stack and kind != _ARRAY:
            self._args = line.split()  # an inline command, e.g. "PING\r\n"
            return True
        try:
            count = int(line[1:]) if kind not in _SIMPLE else 0
        except ValueError:
            raise RespError(f"bad header {line[:40]!r}") from None
        if kind in _SIMPLE:
            return self._element_done()
        if kind in _BLOB:
            if count < 0:  # null bulk
                return self._element_done()
            self._blob_left = count + 2
            self._capture = self._requests and len(self._stack) == 1
            return False
        if kind in _AGGREGATE or kind == _ATTRIBUTE:
            if count < 0:  # null array
                return self._element_done()
            expected = count * _AGGREGATE.get(kind, 2) + (kind == _ATTRIBUTE)
            if not expected:
                return self._element_done()
            self._stack.append(expected)
            return False
        raise RespError(f"unknown type {line[:40]!r}")

    def _blob_done(self) -> bool:
        if self._capture:
            self._args.append(bytes(self._arg[:-2]))
            self._arg.clear()
            self._capture = False
        return self._element_done()

    def _element_done(self) -> bool:
        while self._stack:
            self._stack[-1] -= 1
            if self._stack[-1]:
                return False
            self._stack.pop()
        return True

    def _take_args(self) -> list[bytes]:
        args, self._args = self._args, []
        return args


# ------------------------------------------------------------------ faults, stats


@dataclass
class ProxyStats:
    """Counters of one proxy since it started (a snapshot: it does not change)."""

    connections: int = 0  # accepted from clients
    open_connections: int = 0  # being proxied now
    refused: int = 0  # closed at once because of refuse()
    upstream_failures: int = 0  # the node did not accept the proxy's connection
    aborted: int = 0  # reset by reset_all(), clear() after a blackhole, or stop()
    replication_links: int = 0  # connections recognised as a replica's link
    bytes_to_server: int = 0
    bytes_to_client: int = 0
    bytes_dropped: int = 0  # swallowed by blackhole()
    replies_delayed: int = 0  # replies held by a one-shot fault
    commands: int = 0  # commands from clients (replicas' links not counted)
    by_command: Counter[str] = field(default_factory=Counter)  # the same, by name (upper case)
    internal_errors: int = 0  # bugs in the proxy (logged); a test should see 0
    faults: Counter[str] = field(default_factory=Counter)  # fault method -> calls

    def copy(self) -> ProxyStats:
        """A snapshot that later traffic does not change."""
        return ProxyStats(**{**self.__dict__, "faults": Counter(self.faults),
                             "by_command": Counter(self.by_command)})


@dataclass
class _ReplyRule:
    """Hold the replies to the next ``remaining`` commands that ``match`` (None: any)."""

    match: Predicate | None
    seconds: float
    remaining: int


class _Faults:
    """The faults in force on one proxy, read by every connection through it."""

    def __init__(self) -> None:
        self.reply_delay = 0.0
        self.request_delay = 0.0
        self.paused = False
        self.blackholed = False
        self.refusing = False
        # Bytes queued before the latest reset() go out without their delay.
        self.generation = 0
        self.next_replies: deque[_ReplyRule] = deque()
        self.command_rules: list[_ReplyRule] = []
        self._changed = asyncio.Event()

    def reset(self) -> None:
        """Back to a clean pipe, including what is already queued; wakes the waiters."""
        self.reply_delay = self.request_delay = 0.0
        self.paused = self.blackholed = self.refusing = False
        self.generation += 1
        self.next_replies.clear()
        self.command_rules.clear()
        self.notify()

    def notify(self) -> None:
        """Wake every connection waiting on a delay or a pause to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float | None) -> None:
        """Return after ``timeout`` seconds (None: no limit) or at the next change."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()

    def next_reply_delay(self) -> float:
        """The hold of a reply under :meth:`FaultProxy.delay_next_replies`, used up."""
        while self.next_replies and not self.next_replies[0].remaining:
            self.next_replies.popleft()
        if not self.next_replies:
            return 0.0
        rule = self.next_replies[0]
        rule.remaining -= 1
        return rule.seconds

    def command_delay(self, args: Sequence[bytes]) -> float:
        """The hold of the reply to the command ``args`` (used up if a rule matches)."""
        for rule in self.command_rules:
            if rule.remaining and rule.match is not None and rule.match(args):
                rule.remaining -= 1
                return rule.seconds
        return 0.0


@dataclass(slots=True)
class _Chunk:
    """Bytes read from one side, waiting for their release time; b"" is an EOF."""

    data: bytes
    release_at: float
    generation: int


# ------------------------------------------------------------------ connections


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST (SO_LINGER 0), dropping anything unsent."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Pump:
    """One direction of a connection: a reader task queues the bytes with their
    release time, a writer task sends them strictly in order once released."""

    def __init__(
        self,
        link: _Link,
        direction: Direction,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
    ) -> None:
        self.direction = direction
        self.sink = sink
        self._link = link
        self._source = source
        self._queue: asyncio.Queue[_Chunk] = asyncio.Queue(QUEUE_CHUNKS)

    async def read_loop(self) -> None:
        link = self._link
        while True:
            data = await self._source.read(READ_SIZE)
            now = time.monotonic()
            generation = link.faults.generation
            if not data:
                await self._queue.put(_Chunk(b"", now, generation))
                return
            for delay, part in link.split(self.direction, data):
                await self._queue.put(_Chunk(part, now + delay, generation))

    async def write_loop(self) -> None:
        link = self._link
        stats = link.stats
        while True:
            chunk = await self._queue.get()
            await link.hold(chunk)
            if link.faults.blackholed and not link.spared:
                link.damaged = True
                stats.bytes_dropped += len(chunk.data)
                if not chunk.data:
                    return  # the EOF is swallowed too: the other side never learns
                continue
            if not chunk.data:
                if self.sink.can_write_eof():
                    self.sink.write_eof()
                return
            self.sink.write(chunk.data)
            await self.sink.drain()
            if self.direction == "request":
                stats.bytes_to_server += len(chunk.data)
            else:
                stats.bytes_to_client += len(chunk.data)


class _Link:
    """One client connection and the proxy's connection to the node for it.

    Pairs replies with requests (one reply per command, in order) so that a
    one-shot fault can hold the reply to one command; a reply being held holds
    every byte after it, as it would on a slow network.
    """

    def __init__(
        self,
        faults: _Faults,
        stats: ProxyStats,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        *,
        parse_resp: bool,
        spare_replication: bool,
    ) -> None:
        self.faults = faults
        self.stats = stats
        self.replication = False
        self.damaged = False  # bytes were swallowed: the two streams are out of step
        self._spare_replication = spare_replication
        self._requests = _Pump(self, "request", client[0], server[1])
        self._replies = _Pump(self, "reply", server[0], client[1])
        self._request_scanner = RespScanner(requests=True) if parse_resp else None
        self._reply_scanner = RespScanner(requests=False) if parse_resp else None
        self._plans: deque[float] = deque()  # hold for the reply to each request sent
        self._in_reply = False  # the last split ended inside a reply
        self._reply_hold = 0.0  # hold of the reply in progress
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def spared(self) -> bool:
        """Faults do not apply to this connection (a replica's link, if so chosen)."""
        return self.replication and self._spare_replication

    async def run(self) -> None:
        """Forward until both directions ended (graceful close) or one failed (reset)."""
        self._tasks = [
            asyncio.create_task(coro, name=f"faultproxy-{pump.direction}-{kind}")
            for pump in (self._requests, self._replies)
            for kind, coro in (("read", pump.read_loop()), ("write", pump.write_loop()))
        ]
        graceful = False
        try:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            graceful = all(t.done() and not t.cancelled() and not t.exception() for t in self._tasks)
            for task in self._tasks:
                if task.done() and not task.cancelled():
                    error = task.exception()
                    if error is not None and not isinstance(error, (OSError, EOFError)):
                        self.stats.internal_errors += 1
                        log.error("fault proxy connection failed", exc_info=error)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for pump in (self._requests, self._replies):
                if graceful:
                    pump.sink.close()
                else:
                    _abort(pump.sink)

    def abort(self) -> None:
        """Reset both connections now; whatever is queued is lost."""
        self.stats.aborted += 1
        _abort(self._requests.sink)
        _abort(self._replies.sink)
        for task in self._tasks:
            task.cancel()

    async def hold(self, chunk: _Chunk) -> None:
        """Wait until ``chunk`` may go out: its delay is over and the proxy not paused."""
        faults = self.faults
        while True:
            if chunk.generation == faults.generation:
                left = chunk.release_at - time.monotonic()
                if left > 0:
                    await faults.wait_for_change(left)
                    continue
            if faults.paused and not self.spared:
                await faults.wait_for_change(None)
                continue
            return

    def split(self, direction: Direction, data: bytes) -> list[tuple[float, bytes]]:
        """Cut what was just read into ``(delay, bytes)`` parts, in order."""
        if direction == "request":
            self._scan_requests(data)
            return [(0.0 if self.spared else self.faults.request_delay, data)]
        return self._split_replies(data)

    def _scan_requests(self, data: bytes) -> None:
        """Note what each complete command's reply is to wait (before it is sent)."""
        if self._request_scanner is None:
            return
        try:
            frames = self._request_scanner.feed(data)
        except RespError:
            self._unpair()
            return
        for _, args in frames:
            if not args:
                continue  # an empty line: Redis does not answer it
            name = args[0].upper()
            if name in _REPLICATION and not self.replication:
                self.replication = True
                self.stats.replication_links += 1
            if name in _UNPAIRED or (name == b"CLIENT" and args[1:2] and args[1].upper() == b"REPLY"):
                self._unpair()
                return
            if not self.replication:
                self.stats.commands += 1
                self.stats.by_command[name.decode("ascii", "replace")] += 1
            self._plans.append(0.0 if self.spared else self.faults.command_delay(args))

    def _split_replies(self, data: bytes) -> list[tuple[float, bytes]]:
        base = 0.0 if self.spared else self.faults.reply_delay
        if self._reply_scanner is None:
            return [(base, data)]
        try:
            ends = [end for end, _ in self._reply_scanner.feed(data)]
        except RespError:
            self._unpair()
            return [(base, data)]
        complete = len(ends)
        if not ends or ends[-1] < len(data):
            ends.append(len(data))  # the start of a reply still arriving
        parts: list[tuple[float, int, int]] = []
        start = 0
        for index, end in enumerate(ends):
            if not self._in_reply:
                self._reply_hold = self._start_reply(data[start])
                self._in_reply = True
            delay = max(base, self._reply_hold)
            if parts and parts[-1][0] == delay:
                parts[-1] = (delay, parts[-1][1], end)
            else:
                parts.append((delay, start, end))
            if index < complete:
                self._in_reply = False
            start = end
        return [(delay, data[lo:hi]) for delay, lo, hi in parts]

    def _start_reply(self, kind: int) -> float:
        """The hold of the reply starting now (a RESP3 push is no reply)."""
        if kind == _PUSH or self.spared:
            return 0.0
        planned = self._plans.popleft() if self._plans else 0.0
        hold = max(planned, self.faults.next_reply_delay())
        if hold > 0:
            self.stats.replies_delayed += 1
        return hold

    def _unpair(self) -> None:
        """Stop pairing replies with requests: per-reply faults skip this connection."""
        self._request_scanner = self._reply_scanner = None
        self._plans.clear()
        self._in_reply = False
        self._reply_hold = 0.0


# ------------------------------------------------------------------ the proxy


class FaultProxy:
    """One TCP proxy in front of one Redis node (asyncio, runs in the caller's loop).

    Each fault applies to every connection through this proxy, open or new, until
    :meth:`clear` (or, for a pause, :meth:`resume`). The methods are not
    thread-safe: call them in the proxy's loop, or use :class:`ProxyFleet`.
    ``parse_resp=False`` forwards without reading the protocol (less CPU under
    load), at the price of the per-reply faults and of recognising replica links.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        parse_resp: bool = True,
        spare_replication: bool = True,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._parse_resp = parse_resp
        self._spare_replication = spare_replication
        self._faults = _Faults()
        self._stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.listen_host}:{self._listen_port} -> "
            f"{self.target_host}:{self.target_port})"
        )

    # -------------------------------------------------------------- life

    async def start(self) -> None:
        """Listen (on a free port if ``listen_port`` was 0, see :attr:`port`)."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )
        self._listen_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, reset every open connection and wait for all its tasks."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            # Last: from Python 3.12 on it also waits for the accepted connections.
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The listening port (known once started)."""
        return self._listen_port

    @property
    def url(self) -> str:
        """``redis://host:port/0`` of the proxy."""
        return f"redis://{self.listen_host}:{self._listen_port}/0"

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        snapshot = self._stats.copy()
        snapshot.open_connections = len(self._links)
        return snapshot

    # -------------------------------------------------------------- faults

    def delay_replies(self, seconds: float) -> None:
        """Hold server-to-client bytes ``seconds`` from their arrival (order kept)."""
        self._faults.reply_delay = _seconds(seconds)
        self._applied("delay_replies")

    def delay_requests(self, seconds: float) -> None:
        """Hold client-to-server bytes ``seconds`` from their arrival (order kept)."""
        self._faults.request_delay = _seconds(seconds)
        self._applied("delay_requests")

    def delay_next_replies(self, n: int, seconds: float) -> None:
        """Hold only the next ``n`` replies (on any connection) ``seconds`` each."""
        self._require_resp()
        self._faults.next_replies.append(_ReplyRule(None, _seconds(seconds), _count(n)))
        self._applied("delay_next_replies")

    def delay_reply_to(
        self, command: str | Predicate, seconds: float, times: int = 1
    ) -> None:
        """Hold the reply to each of the next ``times`` commands matching ``command``.

        ``command`` is a command name (``"INCR"``) or a predicate on the arguments.
        Only that reply is late, and the ones after it on its connection wait
        behind it. Inside MULTI the reply to a command is its ``+QUEUED``.
        """
        self._require_resp()
        match = command_is(command) if isinstance(command, str) else command
        self._faults.command_rules.append(_ReplyRule(match, _seconds(seconds), _count(times)))
        self._applied("delay_reply_to")

    def blackhole(self) -> None:
        """Accept connections but forward nothing either way, and never close them.

        Swallowed bytes leave a connection's streams out of step, so :meth:`clear`
        resets every connection that lost some.
        """
        self._faults.blackholed = True
        self._applied("blackhole")

    def pause(self) -> None:
        """Stop forwarding; what arrives meanwhile is kept for :meth:`resume`."""
        self._faults.paused = True
        self._applied("pause")

    def resume(self) -> None:
        """Forward again, what was kept first, in order."""
        self._faults.paused = False
        self._faults.notify()
        self._applied("resume")

    def refuse(self) -> None:
        """Reset new connections at once (open ones are untouched)."""
        self._faults.refusing = True
        self._applied("refuse")

    def reset_all(self) -> None:
        """Reset (TCP RST) every open connection, both to the client and to the node."""
        for link in list(self._links):
            link.abort()
        self._applied("reset_all")

    def clear(self) -> None:
        """Back to a clean pipe: no fault, nothing held (queued bytes go out now)."""
        self._faults.reset()
        for link in list(self._links):
            if link.damaged:
                link.abort()
        self._applied("clear")

    # -------------------------------------------------------------- internals

    def _applied(self, name: str) -> None:
        self._stats.faults[name] += 1

    def _require_resp(self) -> None:
        if not self._parse_resp:
            raise RuntimeError("per-reply faults need parse_resp=True")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(
            self._serve(reader, writer), name=f"faultproxy-serve-{self._listen_port}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.connections += 1
        if self._faults.refusing:
            self._stats.refused += 1
            _abort(writer)
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            self._stats.upstream_failures += 1
            _abort(writer)
            return
        except BaseException:
            _abort(writer)
            raise
        link = _Link(
            self._faults,
            self._stats,
            (reader, writer),
            upstream,
            parse_resp=self._parse_resp,
            spare_replication=self._spare_replication,
        )
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


def _seconds(value: float) -> float:
    if value < 0:
        raise ValueError(f"a delay cannot be negative: {value}")
    return float(value)


def _count(value: int) -> int:
    if value < 1:
        raise ValueError(f"a count must be at least 1: {value}")
    return value


# ------------------------------------------------------------------ threads


class ProxyFleet:
    """Fault proxies on an event loop in a background thread.

    For synchronous tests, load tools, and clients in other processes (they only
    need the ports). Every method may be called from any thread but the fleet's
    own; each returns once done in the loop, so a fault is in force on return.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proxies: list[FaultProxy] = []

    def start(self) -> ProxyFleet:
        """Start the loop's thread."""
        if self._thread is not None:
            raise RuntimeError("fleet already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="proxy-fleet", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop every proxy (resetting its connections) and the thread. Idempotent."""
        if self._loop is None or self._thread is None:
            return
        try:
            self.run(self._stop_all())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> ProxyFleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        **options: bool,
    ) -> ProxyHandle:
        """Start a :class:`FaultProxy` (``options``: its keyword arguments)."""
        proxy = FaultProxy(target_host, target_port, listen_host, listen_port, **options)
        self.run(proxy.start())
        self._proxies.append(proxy)
        return ProxyHandle(self, proxy)

    def remove(self, handle: ProxyHandle) -> None:
        """Stop one proxy."""
        self._proxies.remove(handle.proxy)
        self.run(handle.proxy.stop())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` in the fleet's loop and return its result."""
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("fleet not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("called from the fleet's own thread: it would wait forever")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """Call ``function(*args)`` in the fleet's loop and return its result."""

        async def call() -> T:
            return function(*args)

        return self.run(call())

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _stop_all(self) -> None:
        proxies, self._proxies = self._proxies, []
        await asyncio.gather(*(proxy.stop() for proxy in proxies))


class ProxyHandle:
    """A :class:`FaultProxy` in a :class:`ProxyFleet`: the same faults, thread-safe."""

    def __init__(self, fleet: ProxyFleet, proxy: FaultProxy) -> None:
        self._fleet = fleet
        self.proxy = proxy

    def __repr__(self) -> str:
        return f"ProxyHandle({self.proxy!r})"

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def stats(self) -> ProxyStats:
        return self._fleet.call(lambda: self.proxy.stats)

    def delay_replies(self, seconds: float) -> None:
        self._fleet.call(self.proxy.delay_replies, seconds)

    def delay_requests(self, seconds: float) -> None:
        self._fleet.call(self.proxy.delay_requests, seconds)

    def delay_next_replies(self, n: int, seconds: float) -> None:
        self._fleet.call(self.proxy.delay_next_replies, n, seconds)

    def delay_reply_to(self, command: str | Predicate, seconds: float, times: int = 1) -> None:
        self._fleet.call(self.proxy.delay_reply_to, command, seconds, times)

    def blackhole(self) -> None:
        self._fleet.call(self.proxy.blackhole)

    def pause(self) -> None:
        self._fleet.call(self.proxy.pause)

    def resume(self) -> None:
        self._fleet.call(self.proxy.resume)

    def refuse(self) -> None:
        self._fleet.call(self.proxy.refuse)

    def reset_all(self) -> None:
        self._fleet.call(self.proxy.reset_all)

    def clear(self) -> None:
        self._fleet.call(self.proxy.clear)


# ------------------------------------------------------------------ cluster


class ProxiedCluster:
    """A fault proxy in front of every node of a :class:`LocalCluster`, announced.

    On entry each node gets a proxy and announces the proxy's port to clients
    (``cluster-announce-port``; the bus port stays the real one, so the cluster
    bus bypasses the proxies), and this waits until every node's CLUSTER NODES
    and CLUSTER SLOTS show the proxies. On exit the nodes announce their own
    ports again and the proxies stop, so a shared cluster stays usable.

    The announced port is kept in :attr:`LocalNode.announce_port`, which
    :meth:`LocalCluster.restart` passes to the new process: a restart forgets
    CONFIG SET, not the proxy. A failover needs nothing: the setting is per node,
    so a promoted replica already announces its own proxy.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        fleet: ProxyFleet | None = None,
        *,
        timeout: float = 30.0,
        spare_replication: bool = True,
    ) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self._own_fleet = fleet is None
        self._fleet = fleet if fleet is not None else ProxyFleet()
        self._spare_replication = spare_replication
        self._proxies: dict[int, ProxyHandle] = {}  # by LocalNode.index

    def __enter__(self) -> ProxiedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ProxiedCluster:
        """Start the proxies and wait until every node announces its proxy."""
        if self._own_fleet:
            self._fleet.start()
        try:
            for node in self.cluster.nodes:
                self._proxies[node.index] = self._fleet.add(
                    node.host, node.port, spare_replication=self._spare_replication
                )
            for node in self.cluster.nodes:
                _announce(node, self._proxies[node.index].port)
            self.wait_until_announced()
            self.cluster.wait_until_healthy(self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Announce the real ports again, wait until all nodes agree, stop the proxies."""
        try:
            for proxy in self._proxies.values():
                proxy.clear()
            for node in self.cluster.nodes:
                _announce(node, 0)
            if self._proxies:
                self.wait_until_announced()
        finally:
            for proxy in self._proxies.values():
                self._fleet.remove(proxy)
            self._proxies.clear()
            if self._own_fleet:
                self._fleet.close()

    # ------------------------------------------------------------ addresses

    @property
    def proxies(self) -> list[ProxyHandle]:
        """Every node's proxy, in the order of ``cluster.nodes``."""
        return [self._proxies[node.index] for node in self.cluster.nodes]

    def proxy_for(self, node: LocalNode) -> ProxyHandle:
        """The proxy in front of ``node``."""
        return self._proxies[node.index]

    def proxy_for_slot(self, slot: int) -> ProxyHandle:
        """The proxy in front of the primary currently serving ``slot``."""
        return self.proxy_for(self.cluster.primary_for_slot(slot))

    def proxy_for_key(self, key: str | bytes) -> ProxyHandle:
        """The proxy in front of the primary currently serving ``key``."""
        return self.proxy_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    @property
    def url(self) -> str:
        """``redis://host:port/0`` of a primary's proxy: a startup node for clients."""
        node = self.cluster.primary_nodes()[0]
        return f"redis://{node.host}:{self.proxy_for(node).port}/0"

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        """Every node's proxy, ready for ``RedisCluster(startup_nodes=...)``."""
        return [
            redis.cluster.ClusterNode(node.host, self.proxy_for(node).port)  # type: ignore[no-untyped-call]
            for node in self.cluster.nodes
        ]

    def clear_all(self) -> None:
        """Clear the faults of every proxy."""
        for proxy in self._proxies.values():
            proxy.clear()

    # ------------------------------------------------------------ announcing

    def wait_until_announced(self, timeout: float | None = None) -> None:
        """Wait until every answering node shows every answering node at the port it
        announces, in CLUSTER NODES and CLUSTER SLOTS (what clients read)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            problem = self.announce_problem()
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"announced ports did not converge: {problem}")
            time.sleep(_POLL_INTERVAL)

    def announce_problem(self) -> str | None:
        """Why some node does not show the announced ports yet, or None."""
        alive = [node for node in self.cluster.nodes if node.alive]
        expected = {node.node_id: node.announce_port or node.port for node in alive}
        for node in alive:
            try:
                with node.client() as client:
                    seen = _ports_in_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
                    seen_in_slots = _ports_in_cluster_slots(
                        client.execute_command("CLUSTER", "SLOTS")
                    )
            except redis.RedisError as exc:
                return f"{node.address}: {exc!r}"
            for node_id, port in expected.items():
                if seen.get(node_id) != port:
                    return f"{node.address} sees {node_id[:8]} at {seen.get(node_id)}, not {port}"
            for node_id, port in seen_in_slots.items():
                if node_id in expected and port != expected[node_id]:
                    return f"{node.address}: CLUSTER SLOTS has {node_id[:8]} at {port}"
        return None


def _announce(node: LocalNode, port: int) -> None:
    """Make ``node`` announce ``port`` (0: its own) now and after a restart."""
    node.announce_port = port
    if not node.alive:
        return  # a stopped node picks it up when restarted
    with node.client() as client:
        client.config_set("cluster-announce-bus-port", node.port + BUS_PORT_OFFSET if port else 0)
        client.config_set("cluster-announce-port", port)


def _ports_in_cluster_nodes(text: str) -> dict[str, int]:
    ports = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            ports[parts[0]] = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1] or 0)
    return ports


def _ports_in_cluster_slots(reply: Sequence[Any]) -> dict[str, int]:
    ports = {}
    for entry in reply:
        for endpoint in entry[2:]:
            ports[str(endpoint[2])] = int(endpoint[1])
    return ports
