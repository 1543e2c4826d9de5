"""Replica acknowledgements: the WAIT that closes a pipeline of purchases.

Redis replicates asynchronously: a purchase a primary acknowledged can be lost with it
when it fails before its replica got the write, and the replica promoted in its place
never saw a purchase that was answered 200. So when ``replica_acks`` > 0 each pipeline
ends with ``WAIT <replica_acks> <ack_timeout_ms>`` (on the same connection: WAIT covers
every write made before it on its connection). A reply that must survive a failover
(the batcher is given a predicate that says which: the purchase script's owner knows)
is handed to its caller only once WAIT has counted enough replicas; when it counts
fewer (or the connection is lost first), the caller gets a ``TimeoutError`` instead: a
503, "retry with the same key". The script did run: the retry returns the stored
outcome if it survived, or buys again if it was lost, so no 200 is ever given for a
purchase a failover can lose. Other replies are handed over as they come.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import hiredis
from redis.exceptions import TimeoutError

from gateway.store.transport.link import own_copy

if TYPE_CHECKING:
    from gateway.store.transport.link import Call

ACK_TIMEOUT_MS = 200


@functools.lru_cache(maxsize=8)
def wait_command(replicas: int, timeout_ms: int) -> bytes:
    # (hiredis's stub declares a one-element tuple: any number of parts is what it takes)
    packed: bytes = hiredis.pack_command(("WAIT", replicas, timeout_ms))  # type: ignore[arg-type]
    return packed


@dataclass(slots=True, eq=False)
class Ack:
    """The WAIT that closes a pipeline, and the replies of the pipeline held until it
    answers (see the batcher's ``must_replicate``)."""

    wanted: int
    timeout_ms: int
    held: list[tuple[Call, Any]] = field(default_factory=list)

    @property
    def command(self) -> bytes:
        return wait_command(self.wanted, self.timeout_ms)

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
            call.resolve(result if error is None else own_copy(error))


