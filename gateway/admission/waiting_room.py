"""The waiting room: joins and polls, answered mostly from this process's memory.

    POST /api/queue/{sku}           -> WaitingRoom.join -> queue_join.lua (the user's shard)
    GET  /api/queue/{sku}/{ticket}  -> WaitingRoom.poll -> (memory; queue_rank.lua once
                                                           per pre-start ticket)

Each shard of a sale has its own queue (a sorted set in the shard's slot), so joins
spread over the nodes like purchases. A ticket is signed and names its shard and, when
it is final, its rank there; a ticket is admitted when its rank is below its shard's
admission cursor. The cursors are moved by one admitter per sale
(``admission.admitter``) and published in one small key that this process re-reads at
most every ``refresh_every`` seconds, whatever the number of polls. A pre-start ticket's
rank is final once its shard is sealed at the start; it is asked once and remembered.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.admission.queue_signing import QueueSigner, Ticket
from gateway.admission.room_state import RoomState
from gateway.admission.sales import SaleCache
from gateway.admission.soldout import SoldOut
from gateway.admission.window import ENDED_BODY
from gateway.aio import SingleFlight
from gateway.clock import now_ms
from gateway.http.errors import ApiError
from gateway.models import Sale
from gateway.store.connection import is_redis_failure
from gateway.store.keys import shard_of
from gateway.store.scripts.queue import Rank, SaleChanged
from gateway.store.store import Store

MAX_RETRY_AFTER = 5
_MAX_RANKS = 500_000  # remembered ranks of pre-start tickets (cleared past this)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class _Cached:
    state: RoomState
    read_at: float  # time.monotonic()


def no_ticket() -> ApiError:
    return ApiError(404, "TICKET_NOT_FOUND", "no such ticket for you in this sale's waiting room")


def sold_out() -> ApiError:
    return ApiError(410, "SOLD_OUT", "no units left in this sale", extra={"units_left": 0})


def sale_ended(units_left: int | None) -> ApiError:
    extra = {} if units_left is None else {"units_left": max(0, units_left)}
    return ApiError(410, ENDED_BODY["code"], ENDED_BODY["message"], extra=extra)


def position_of(rank: int, cursor: int, shards: int) -> int:
    """An estimate of the place in the whole sale's queue (1: next), from the ticket's
    distance to its shard's cursor: tickets are admitted in score order across shards,
    so about as many wait in every shard ahead of it as in its own. It never grows:
    the rank is fixed and the cursor only moves on."""
    return (rank - cursor) * shards + 1


@dataclass(slots=True)
class WaitingRoom:
    store: Store
    sales: SaleCache
    sold_out: SoldOut
    signer: Callable[[], Awaitable[QueueSigner]]
    pass_ttl: int
    refresh_every: float = 0.15
    rng: random.Random = field(default_factory=random.Random)
    active: dict[str, Sale] = field(default_factory=dict)  # sales with queue traffic here
    _states: dict[str, _Cached] = field(default_factory=dict)
    _reads: SingleFlight[tuple[str, str], RoomState] = field(default_factory=SingleFlight)
    _ranks: dict[tuple[str, str, int], int] = field(default_factory=dict)

    # -- the API ----------------------------------------------------------------------

    async def join(self, user_id: int, sku: str) -> Answer:
        sale = await self._sale(sku)
        now = now_ms()
        signer = await self.signer()
        if not sale.admit_rate:  # no waiting room: let through at once
            if sale.ends_at and now >= sale.ends_at:
                raise sale_ended(None)
            if self.sold_out.known(sku):
                raise sold_out()
            return self._admitted(signer, sale, user_id, None)
        state = await self.state(sale)
        if sale.ends_at and now >= sale.ends_at:
            raise sale_ended(state.units_left)
        self.active[sku] = sale
        if state.sold_out or self.sold_out.known(sku):
            raise sold_out()
        shard = shard_of(user_id, sale.shards)
        try:
            joined = await self.store.queue_join(sale, user_id, shard, self.rng.random())
        except SaleChanged:
            self._drop(sku)
            raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU") from None
        if joined.rank is not None:
            self._remember_rank(sale, user_id, joined.rank)
        ticket = Ticket(shard, None if joined.pre_start else joined.rank)
        text = signer.ticket(sku, sale.generation, user_id, shard, ticket.rank)
        return await self._answer(signer, sale, user_id, ticket, text, state, now)

    async def poll(self, user_id: int, sku: str, text: str) -> Answer:
        sale = await self._sale(sku)
        signer = await self.signer()
        ticket = signer.read_ticket(text, sku, sale.generation, user_id) if sale.admit_rate else None
        if ticket is None or ticket.shard != shard_of(user_id, sale.shards):
            raise no_ticket()
        now = now_ms()
        state = await self.state(sale)
        if sale.ends_at and now >= sale.ends_at:
            raise sale_ended(state.units_left)
        self.active[sku] = sale
        return await self._answer(signer, sale, user_id, ticket, text, state, now)

    # -- answers ----------------------------------------------------------------------

    async def _answer(self, signer: QueueSigner, sale: Sale, user_id: int, ticket: Ticket,
                      text: str, state: RoomState, now: int) -> Answer:
        if state.sold_out or self.sold_out.known(sale.sku):
            raise sold_out()
        units = state.units_left if state.units_left is not None else sale.stock
        if sale.starts_at and now < sale.starts_at:
            return _queued(text, None, math.ceil((sale.starts_at - now) / 1000), units)
        rank = ticket.rank
        if rank is None:
            rank = await self._rank(sale, user_id, ticket.shard)
            if rank is None:  # Redis's clock is not at the start yet
                return _queued(text, None, 1, units)
        cursor = state.cursor(ticket.shard)
        if rank < cursor:
            return self._admitted(signer, sale, user_id, units)
        position = position_of(rank, cursor, sale.shards)
        return _queued(text, position, math.ceil(position / sale.admit_rate), units)

    def _admitted(self, signer: QueueSigner, sale: Sale, user_id: int,
                  units_left: int | None) -> Answer:
        body: dict[str, Any] = {"code": "ADMITTED",
                                "pass": signer.issue_pass(sale.sku, sale.generation, user_id),
                                "expires_in": self.pass_ttl}
        if units_left is not None:
            body["units_left"] = max(0, units_left)
        return Answer(200, body)

    # -- memory -----------------------------------------------------------------------

    async def state(self, sale: Sale) -> RoomState:
        """The sale's admission state, re-read at most every ``refresh_every`` seconds
        (one read at a time per sale: the others wait for it); the last one read while
        Redis cannot be read."""
        cached = self._states.get(sale.sku)
        if cached is not None and cached.state.generation == sale.generation \
                and time.monotonic() - cached.read_at < self.refresh_every:
            return cached.state
        return await self._reads.run((sale.sku, sale.generation), lambda: self._read_state(sale))

    async def _read_state(self, sale: Sale) -> RoomState:
        cached = self._states.get(sale.sku)
        try:
            fresh = RoomState.parse(await self.store.queue_state(sale.sku), sale.generation)
        except Exception as exc:
            # Its node failing over: answer from what this process last read (the
            # cursors only lag; admission pauses meanwhile anyway).
            if cached is None or cached.state.generation != sale.generation \
                    or not is_redis_failure(exc):
                raise
            return cached.state
        if cached is not None:
            fresh = fresh.at_least(cached.state)
        self._states[sale.sku] = _Cached(fresh, time.monotonic())
        return fresh

    async def _rank(self, sale: Sale, user_id: int, shard: int) -> int | None:
        """A pre-start ticket's final rank (asked once, then remembered); None before
        the seal; 404 when the user holds no place (a place lost in a failover)."""
        key = (sale.sku, sale.generation, user_id)
        known = self._ranks.get(key)
        if known is not None:
            return known
        try:
            code, rank = await self.store.queue_rank(sale, user_id, shard)
        except SaleChanged:
            self._drop(sale.sku)
            raise no_ticket() from None
        if code is Rank.NOT_SEALED:
            return None
        if code is not Rank.FOUND:
            raise no_ticket()
        self._remember_rank(sale, user_id, rank)
        return rank

    def _remember_rank(self, sale: Sale, user_id: int, rank: int) -> None:
        if len(self._ranks) >= _MAX_RANKS:
            self._ranks.clear()
        self._ranks[(sale.sku, sale.generation, user_id)] = rank

    async def _sale(self, sku: str) -> Sale:
        sale = await self.sales.get(sku)
        if sale is None:
            raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
        return sale

    def _drop(self, sku: str) -> None:
        """The sale was deleted (or made again): forget it here."""
        self.sales.forget(sku)
        self.forget(sku)

    def forget(self, sku: str) -> None:
        self.active.pop(sku, None)
        self._states.pop(sku, None)


def _queued(ticket: str, position: int | None, eta_s: int, units_left: int) -> Answer:
    retry = min(MAX_RETRY_AFTER, max(1, eta_s // 2))
    return Answer(202, {"code": "QUEUED", "ticket": ticket, "position": position,
                        "eta_s": max(0, eta_s), "units_left": max(0, units_left)},
                  {"Retry-After": str(retry)})
