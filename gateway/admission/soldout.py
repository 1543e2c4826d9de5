"""The one owner of "sold out": no units left anywhere in a sale.

Decided only after a consistent read of every shard (``admission.moves``) and recorded
in Redis only if no unit came back since the decision began (``mark_sold_out.lua``
compares a counter of returns: a mark can never outlive units given back).

The fast path. Once a process knows a sale is sold out, it answers 410 from memory,
with no Redis call and nothing recorded (the contract allows it), to every buyer whose
key cannot hold another outcome: a user with no outcome but SOLD_OUT recorded on the
sale. Those who have one (buyers, also those whose order went back since, and those
refused for their limit) still go to Redis, where their key may carry a 200 to replay.
The set of such users is loaded when the process learns the sale is sold out; while it
stays sold out nobody joins it (no purchase can succeed). "Stays" is judged by the sale's
count of returns, not by the mark alone: units that come back, are bought and sell out
again leave a new mark, and a buyer the set does not hold. A watcher re-reads the sold-out
state of every sale answered this way every ``watch_every`` seconds: when units come back
(a refused, expired or cancelled order), every process stops within that time, also if
the sale is sold out again by then (another count of returns: the set is loaded anew); and a
process that cannot confirm the state for ``stale_after`` seconds (Redis unreachable)
stops too.

Reads of the state are shared, but only by callers that arrived before the read was
sent: a caller asks after its own purchase found its shard empty, and a read sent
before that could miss a unit given back in between (a false sold-out). So callers
join the read that has not started yet; once it starts, newcomers gather for the next.
A crowd on empty shards then costs a read per loop turn, not one per buyer; and the
read is a script call in the batcher's pipeline (``Store.sold_out_state``), since
redis-py's clients open a connection per concurrent command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.models import Sale
from gateway.store.connection import RedisOutage
from gateway.store.store import SoldOutState, Store

log = logging.getLogger("gateway.soldout")


@dataclass(slots=True)
class _Known:
    """A sale this process knows to be sold out."""

    generation: str
    returns: str             # the sale's count of returns the state was learnt under
    touched: frozenset[int]  # users with another outcome recorded: they go to Redis
    confirmed: float         # time.monotonic() of the last read that said sold out


@dataclass(slots=True)
class _Read:
    """A read of one sale's state and the callers that share it."""

    result: asyncio.Future[SoldOutState]


@dataclass(slots=True)
class SoldOut:
    store: Store
    watch_every: float = 0.2
    stale_after: float = 1.0
    _known: dict[str, _Known] = field(default_factory=dict)
    _learning: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _gathering: dict[tuple[str, str], _Read] = field(default_factory=dict)  # reads not sent yet
    _reads: set[asyncio.Task[None]] = field(default_factory=set)

    def known(self, sku: str) -> bool:
        """Known (and confirmed within ``stale_after`` seconds) to have no units anywhere."""
        entry = self._known.get(sku)
        return entry is not None and time.monotonic() - entry.confirmed < self.stale_after

    def answers(self, sale: Sale, user_id: int) -> bool:
        """Whether this user's purchase can be answered 410 from memory (see above)."""
        entry = self._known.get(sale.sku)
        return (entry is not None and entry.generation == sale.generation
                and user_id not in entry.touched
                and time.monotonic() - entry.confirmed < self.stale_after)

    async def read(self, sale: Sale) -> SoldOutState:
        """The shared state, read before a consistent read of the shards (its counter
        of returns is what ``confirm`` compares). Sold out: the fast path is prepared."""
        key = (sale.sku, sale.generation)
        read = self._gathering.get(key)
        if read is None:
            loop = asyncio.get_running_loop()
            read = self._gathering[key] = _Read(loop.create_future())
            task = loop.create_task(self._read(key, sale, read))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)
        return await asyncio.shield(read.result)  # a cancelled caller leaves the others

    async def _read(self, key: tuple[str, str], sale: Sale, read: _Read) -> None:
        # From here on the read may be sent: whoever comes now waits for the next one.
        del self._gathering[key]
        try:
            state = await self.store.sold_out_state(sale)
        except asyncio.CancelledError:  # the gateway is closing
            read.result.cancel()
            raise
        except Exception as exc:
            read.result.set_exception(exc)
            read.result.exception()  # retrieved, even if every caller has gone
            return
        read.result.set_result(state)
        if state.sold_out:
            self._learn(sale, state)

    async def confirm(self, sale: Sale, seen: SoldOutState) -> bool:
        """A consistent read of every shard, begun after ``seen`` was read, found no unit
        and no move in flight. Recorded (and True) unless units came back meanwhile."""
        if await self.store.mark_sold_out(sale, seen):
            self._learn(sale, SoldOutState(True, seen.returns))
            return True
        return False

    def forget(self, sku: str) -> None:
        self._known.pop(sku, None)

    def _still(self, entry: _Known, sale: Sale, state: SoldOutState) -> bool:
        """Whether ``state`` (sold out) is the one ``entry`` was learnt under. Units that
        came back since (another count of returns) may have been bought by users the
        entry does not list, even if the sale is sold out again: it must be learnt anew."""
        return entry.generation == sale.generation and entry.returns == state.returns

    def _learn(self, sale: Sale, state: SoldOutState) -> None:
        """Load, in the background, who must still go to Redis; then answer the others."""
        entry = self._known.get(sale.sku)
        if entry is not None and self._still(entry, sale, state):
            entry.confirmed = time.monotonic()
            return
        self.forget(sale.sku)
        if sale.sku in self._learning:
            return
        task = asyncio.get_running_loop().create_task(self._load(sale))
        self._learning[sale.sku] = task
        task.add_done_callback(lambda _: self._learning.pop(sale.sku, None))

    async def _load(self, sale: Sale) -> None:
        with RedisOutage() as outage:
            # Sold out first, then the users, then sold out again under the same count of
            # returns: nobody is added to the users while it stays so (a new one needs
            # units that came back, and every return changes the count).
            first = await self.store.sold_out_state(sale)
            if not first.sold_out:
                return
            touched = await self.store.touched_users(sale)
            still = await self.store.sold_out_state(sale)
            if still.sold_out and still.returns == first.returns:
                if len(self._known) > 10_000:
                    self._known.clear()
                self._known[sale.sku] = _Known(sale.generation, first.returns, frozenset(touched),
                                               time.monotonic())
        if outage.error:
            log.warning("could not load a sold-out sale's buyers", extra={"sku": sale.sku})

    async def watch_forever(self, cached: Callable[[str], Sale | None]) -> None:
        """Keep what this process knows current (``cached``: the process's memory of a
        sale, without a Redis call)."""
        outage = RedisOutage()
        while True:
            await asyncio.sleep(self.watch_every)
            with outage:
                await self.refresh(cached)
            # On an outage, entries age past ``stale_after`` and the fast path stops.

    async def refresh(self, cached: Callable[[str], Sale | None]) -> None:
        """One watch: confirm, or forget, every sale this process answers from memory."""
        watched = [sale for sale in map(cached, list(self._known)) if sale is not None]
        for sku in [sku for sku in self._known if cached(sku) is None]:
            self.forget(sku)
        if not watched:
            return
        states = await self.store.sold_out_states(watched)
        now = time.monotonic()
        for sale, state in zip(watched, states):
            entry = self._known.get(sale.sku)
            if entry is None:
                continue
            if state.sold_out and self._still(entry, sale, state):
                entry.confirmed = now
            else:
                self.forget(sale.sku)  # (learnt again by the next purchase that needs units)

    async def aclose(self) -> None:
        for task in list(self._learning.values()):
            task.cancel()
        await asyncio.gather(*self._learning.values(), return_exceptions=True)
