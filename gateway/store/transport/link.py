"""One connection to one Redis node, speaking the protocol with hiredis.

Commands are packed by hiredis when they are queued and written as they go; Redis
answers in order, so each reply (parsed by hiredis) goes to the caller that is first
in line. A connection that fails (refused, lost, no answer within the socket timeout)
gives every call waiting on it a ``ConnectionError`` or ``TimeoutError`` and is
dropped. A call is never resent after it was written, since its script may have run.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, InvalidResponse, TimeoutError

if TYPE_CHECKING:
    from gateway.store.transport.batcher import Batcher, Lane
    from gateway.store.transport.replication import Ack

_ASKING = hiredis.pack_command(("ASKING",))


@dataclass(slots=True, eq=False)
class Call:
    """One caller's command, waiting for its reply."""

    packed: bytes  # the command in the Redis protocol
    future: asyncio.Future[Any]
    sha: str = ""  # the script it runs (EVALSHA), for the replication predicate
    unprotected: bool = False  # sent where no replica can acknowledge it (see replication)
    redirects: int = 0
    ack: Ack | None = None  # the WAIT after it in its pipeline, if any

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


class OutcomeUnknown(TimeoutError):
    """A script call was written and its connection was lost before its reply: it may
    have run. (A redis TimeoutError: the HTTP layer answers 503 with outcome_unknown,
    "retry with the same key"; a call never written gets a ConnectionError: nothing ran.)"""


def own_copy(exc: BaseException) -> BaseException:
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
           ) -> NodeOptions | None:
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


class Link(asyncio.Protocol):
    """One connection to one node. Replies come back in the order the commands were
    written; each goes to the batcher (``_on_reply``) for its caller."""

    def __init__(self, batcher: Batcher, lane: Lane, options: NodeOptions) -> None:
        self.batcher = batcher
        self.lane = lane
        self.options = options
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # (call, is the last of its pipeline); None: the reply of an ASKING; an Ack:
        # the reply of the WAIT that closes a pipeline
        self.waiting: deque[tuple[Call | Ack | None, bool]] = deque()
        self.written = 0  # replies due since the connection opened
        self.received = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._idle: asyncio.Future[None] | None = None
        errors = {"encoding": options.encoding, "errors": options.encoding_errors} \
            if options.encoding else {}
        self.reader = hiredis.Reader(protocolError=InvalidResponse,
                                     replyError=BaseParser.parse_error, **errors)

    @classmethod
    async def open(cls, batcher: Batcher, lane: Lane, host: str, port: int,
                   options: NodeOptions) -> Link:
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
        call = Call(hiredis.pack_command(args), asyncio.get_running_loop().create_future())
        self.write([call], asking=False, last=False)
        return await call.future

    def write(self, calls: list[Call], asking: bool, last: bool = True,
              ack: Ack | None = None) -> None:
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
            payload += ack.command
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
            if isinstance(call, Call):
                if call.sha and not isinstance(error, TimeoutError):
                    call.resolve(OutcomeUnknown(f"{error} (after the call was sent: it may have run)"))
                else:
                    call.resolve(own_copy(error))
            elif call is not None:
                call.settle(error, None)  # replies held for a WAIT that will not come
        self._set_idle()
        self.batcher._on_lost(self)

    def _shortfall(self, ack: Ack) -> Any:
        return self.batcher._shortfall(self.lane, ack)

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
            if isinstance(call, Call):
                self.batcher._on_reply(self.lane, call, reply)
            elif call is not None:
                call.settle(reply, self._shortfall)
            if last:
                self.batcher._on_answered(self.lane)
        self._set_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(ConnectionError(f"Connection to {self.lane.key[0]} lost: {exc!r}"))

