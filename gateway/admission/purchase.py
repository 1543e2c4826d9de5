"""The purchase path: from a validated request to the outcome the client gets.

    http.public.seckill -> PurchaseService.buy -> Store.purchase -> purchase.lua

One script call admits or refuses on the buyer's shard. When the shard is short, units
move to it from other shards (``admission.moves``) and the call is made again; only a
consistent read of the whole sale lets it record ``SOLD_OUT`` (``admission.soldout``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.admission.moves import Rebalancer, Refill
from gateway.admission.outcomes import STATUS, Outcome, outcome_body, render
from gateway.admission.queue_signing import QueueSigner
from gateway.admission.sales import SaleCache
from gateway.admission.soldout import SoldOut
from gateway.admission.tokens import TokenIssuer
from gateway.admission.window import ended, not_started, outside
from gateway.clock import now_ms
from gateway.config import Settings
from gateway.http.errors import ApiError, bad_request, unavailable
from gateway.models import Sale
from gateway.store.keys import shard_of
from gateway.store.scripts.purchase import Code
from gateway.store.store import Store

# Script calls (with unit moves between them) stop being started past this share of the
# request deadline, so that the answer is a 503 that says nothing was admitted rather
# than a deadline cutting a call whose outcome is then unknown.
ATTEMPT_BUDGET = 0.6

SOLD_OUT = Outcome(STATUS["SOLD_OUT"], outcome_body("SOLD_OUT", "", 0, "", ()))

# What a shard that is short records once a refill has looked at the whole sale.
SHORT_OUTCOME = {Refill.SOLD_OUT: "SOLD_OUT", Refill.INSUFFICIENT: "INSUFFICIENT_STOCK"}


@dataclass(slots=True)
class PurchaseService:
    settings: Settings
    store: Store
    sales: SaleCache
    sold_out: SoldOut
    rebalancer: Rebalancer
    token_issuer: Callable[[], Awaitable[TokenIssuer]]
    on_fast_answer: Callable[[str], None] = lambda path: None  # e.g. a metric per path
    # Checks waiting-room passes; None: none can be checked (a sale with a waiting room
    # then sells to nobody).
    queue_signer: Callable[[], Awaitable[QueueSigner]] | None = None

    async def buy(self, user_id: int, sku: str, key: str, quantity: int,
                  queue_pass: str | None = None) -> Outcome:
        sale = await self.sales.get(sku)
        if sale is None:
            raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
        if quantity > sale.per_user_limit:
            raise bad_request(f"quantity must be between 1 and {sale.per_user_limit}")
        refused = outside(sale, now_ms())  # from this process's memory: no Redis call
        if refused is not None:
            self.on_fast_answer("window")
            raise refused
        if self.settings.key_mode == "token" and not (await self.token_issuer()).verify(key, user_id):
            raise ApiError(403, "TOKEN_INVALID", "the key is not a token issued to you, or it expired")
        if sale.admit_rate and not await self._has_pass(queue_pass, sale, user_id):
            raise ApiError(403, "QUEUE_PASS_REQUIRED",
                           "this sale has a waiting room: send the X-Queue-Pass it gave you")
        if self.sold_out.answers(sale, user_id):
            # Known sold out, and no other outcome can be stored against this user's keys:
            # answered from memory, not recorded (a key may buy if units come back).
            self.on_fast_answer("sold_out")
            return SOLD_OUT
        return await self._admit(sale, user_id, key, quantity)

    async def _has_pass(self, queue_pass: str | None, sale: Sale, user_id: int) -> bool:
        """A waiting room's pass for this user and sale, not expired: checked in memory
        (a signed pass), before any Redis work."""
        if self.queue_signer is None:
            return False
        signer = await self.queue_signer()
        return signer.valid_pass(queue_pass, sale.sku, sale.generation, user_id)

    async def _admit(self, sale: Sale, user_id: int, key: str, quantity: int) -> Outcome:
        # What to answer when the shard is short: nothing yet (ask for units), until the
        # whole sale is known to be empty.
        short_outcome = ""
        bound_for = ""  # the generation of the sale the key is bound to (if it must be)
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + self.settings.request_timeout * ATTEMPT_BUDGET
        attempt = -1
        while attempt < 0 or loop.time() < stop_at:
            attempt += 1
            shard = shard_of(user_id, sale.shards)
            if bound_for != sale.generation and self.store.binds_key_apart(user_id, shard):
                if not await self.store.bind_key(user_id, key, sale, quantity):
                    raise ApiError(422, "IDEMPOTENCY_KEY_REUSED",
                                   "this key was used before with a different SKU or quantity")
                bound_for = sale.generation
            reply = await self.store.purchase(sale, user_id, key, quantity, shard, short_outcome)
            code = reply.code
            if code is Code.NEED_UNITS:
                if (await self.sold_out.read(sale)).sold_out:
                    # Known sold out (a consistent read of every shard found none, and no
                    # unit came back since): answered, not recorded against the key.
                    short_outcome = "KNOWN_SOLD_OUT"
                    continue
                refill, seen = await self.rebalancer.refill(sale, shard, quantity)
                if refill is Refill.SOLD_OUT and not await self.sold_out.confirm(sale, seen):
                    refill = Refill.RETRY  # units came back while it looked: look again
                short_outcome = SHORT_OUTCOME.get(refill, "")
                if refill is Refill.RETRY or attempt >= 2:
                    # Near the end of a sale, crowds on several shards pull the last
                    # units back and forth; a short random pause lets one of them win.
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(attempt, 5))))
                continue
            if code is Code.NOT_STARTED:  # this process's clock is ahead of Redis's
                raise not_started(reply.at_ms, now_ms())
            if code is Code.ENDED:
                raise ended()
            if code is Code.SALE_CHANGED or code is Code.SALE_NOT_FOUND:
                # The sale was deleted (and maybe created again) since we cached it.
                self.sales.forget(sale.sku)
                fresh = await self.sales.get(sale.sku)
                if fresh is None or fresh.generation == sale.generation:
                    raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
                sale = fresh
                continue
            return render(reply, sale, user_id, self.settings.duplicate_response)
        raise unavailable("the sale is busy moving units; retry with the same key")
