"""Replica acknowledgements: the WAIT that closes a pipeline of purchases.

Redis replicates asynchronously: a purchase a primary acknowledged can be lost with it
when it fails before its replica got the write, and the replica promoted in its place
never saw a purchase that was answered 200. So each pipeline of purchases ends with
``WAIT <n> <ack_timeout_ms>`` on the same connection (WAIT covers every write made
before it on its connection). A reply that must survive a failover (the batcher is given
a predicate that says which: the purchase script's owner knows) is handed to its caller
only once WAIT has counted enough replicas.

How many: ``min(configured, the replicas the node has)``, re-read from the node every
second (``INFO replication``, on the lane's own connection). A primary with no replica
(one promoted after its old primary was lost for good, or a standalone server) cannot
have a purchase copied anywhere, and nothing can fail over to a replica that does not
exist: its purchases are answered without WAIT, counted, logged and shown by
``/healthz`` as degraded. An operator who would rather refuse than sell unprotected sets
the ``strict`` policy: calls that need replicas are then refused before they are sent
while the node has fewer replicas than configured (a 503 that means nothing was
admitted), and again until its acknowledgements come back after one fell short.

When WAIT counts fewer replicas than wanted (a replica busy on a loaded machine), the
batcher WAITs again rather than fail, within ``budget_ms`` of the first; only past it
does the caller get a ``TimeoutError`` (a 503 with ``outcome_unknown``, "retry with the
same key": the script did run; the retry returns the stored outcome if it survived, or
buys again if it was lost). Other replies are handed over as they come.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import hiredis
from redis.exceptions import ConnectionError, TimeoutError

from gateway.store.transport.link import own_copy

if TYPE_CHECKING:
    from gateway.store.transport.link import Call

ACK_TIMEOUT_MS = 200
ACK_BUDGET_MS = 1000
POLICIES = ("adaptive", "strict")

_ONLINE_REPLICA = re.compile(r"^slave\d+:.*\bstate=online\b", re.M)


@functools.lru_cache(maxsize=32)
def wait_command(replicas: int, timeout_ms: int) -> bytes:
    # (hiredis's stub declares a one-element tuple: any number of parts is what it takes)
    packed: bytes = hiredis.pack_command(("WAIT", replicas, timeout_ms))  # type: ignore[arg-type]
    return packed


def online_replicas(info: Any) -> int:
    """Replicas attached and in sync, from a node's ``INFO replication`` text."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    return len(_ONLINE_REPLICA.findall(text))


@dataclass(frozen=True, slots=True)
class ReplicaPolicy:
    """``acks``: replicas wanted per purchase (None: decided on connecting, 1 on a
    cluster with replicas); ``strict``: refuse rather than answer unprotected."""

    acks: int | None = 0
    ack_timeout_ms: int = ACK_TIMEOUT_MS
    budget_ms: int = ACK_BUDGET_MS
    strict: bool = False


class Shortfall(enum.Enum):
    """What to do when a WAIT counted fewer replicas than wanted."""

    WAIT_AGAIN = "wait_again"        # another WAIT was written; keep holding
    ACCEPT = "accept"                # the node has no replica left: hand over, unprotected
    GIVE_UP = "give_up"              # past the budget: the callers get a TimeoutError


@dataclass(slots=True, eq=False)
class Ack:
    """The WAIT that closes a pipeline, and the replies of the pipeline held until it
    answers enough replicas (see the batcher's ``must_replicate``)."""

    wanted: int
    timeout_ms: int
    deadline: float                  # loop time past which it does not WAIT again
    held: list[tuple[Call, Any]] = field(default_factory=list)
    waits: int = 0                   # WAITs written for it so far

    @property
    def command(self) -> bytes:
        return wait_command(self.wanted, self.timeout_ms)

    def settle(self, reply: Any, shortfall: Any) -> None:
        """WAIT answered (the number of replicas that have every write made so far on
        the connection), or failed (an error, the connection lost). ``shortfall(ack)``
        decides what happens when it counted too few (a ``Shortfall``)."""
        if not self.held:
            return
        if isinstance(reply, int) and reply >= self.wanted:
            error: BaseException | None = None
        elif isinstance(reply, BaseException):
            # A TimeoutError, even for a lost connection: these purchases were made, so
            # their outcome is unknown to the caller, not "nothing was admitted".
            error = TimeoutError(f"replication not confirmed: {reply}")
        else:
            decision = shortfall(self)
            if decision is Shortfall.WAIT_AGAIN:
                return
            error = None if decision is Shortfall.ACCEPT else TimeoutError(
                f"replication not confirmed: {reply} of {self.wanted} replicas acknowledged "
                f"after {self.waits} WAIT(s) of {self.timeout_ms} ms")
        held, self.held = self.held, []
        for call, result in held:
            call.resolve(result if error is None else own_copy(error))


class ReplicasRefused(ConnectionError):
    """A call refused before it was sent (strict policy, too few replicas): a redis
    ConnectionError, so the HTTP layer answers 503, nothing admitted."""
