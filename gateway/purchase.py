"""The purchase path: from a validated request to the outcome the client gets.

handlers.seckill -> PurchaseService.buy -> Store.purchase -> lua/purchase.lua
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

from .codes import Purchase
from .config import Settings
from .errors import ApiError, bad_request, unavailable
from .keys import shard_of
from .models import PurchaseReply, Sale
from .rebalance import Rebalancer, Refill
from .sales import SaleCache
from .store import Store
from .tokens import TokenIssuer

MAX_ATTEMPTS = 16

STATUS_OF = {"OK": 200, "ALREADY_PURCHASED": 409, "INSUFFICIENT_STOCK": 409, "SOLD_OUT": 410}
MESSAGES = {
    "ALREADY_PURCHASED": "you already hold the per-user limit for this sale",
    "INSUFFICIENT_STOCK": "fewer units are left than the quantity asked for",
    "SOLD_OUT": "no units left in this sale",
}
# What a shard that is short records once a refill has looked at the whole sale.
SHORT_OUTCOME = {Refill.SOLD_OUT: "SOLD_OUT", Refill.INSUFFICIENT: "INSUFFICIENT_STOCK"}


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: dict
    headers: dict[str, str] | None = None


def outcome_body(code: str, sku: str, user_id: int, order_no: str, units: tuple[int, ...]) -> dict:
    """The body of a recorded outcome; built the same way the first time and on every
    replay of its key."""
    if code == "OK":
        return {"code": "OK", "order_no": order_no, "sku": sku, "user_id": user_id,
                "units": list(units)}
    body = {"code": code, "message": MESSAGES.get(code, "")}
    if code == "ALREADY_PURCHASED":
        body["order_no"] = order_no or None
    return body


@dataclass(slots=True)
class PurchaseService:
    settings: Settings
    store: Store
    sales: SaleCache
    rebalancer: Rebalancer
    token_issuer: Callable[[], Awaitable[TokenIssuer]]

    async def buy(self, user_id: int, sku: str, key: str, quantity: int) -> Outcome:
        sale = await self.sales.get(sku)
        if sale is None:
            raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
        if quantity > sale.per_user_limit:
            raise bad_request(f"quantity must be between 1 and {sale.per_user_limit}")
        if self.settings.key_mode == "token" and not (await self.token_issuer()).verify(key, user_id):
            raise ApiError(403, "TOKEN_INVALID", "the key is not a token issued to you, or it expired")
        return await self._admit(sale, user_id, key, quantity)

    async def _admit(self, sale: Sale, user_id: int, key: str, quantity: int) -> Outcome:
        # What to record when the shard is short: nothing yet (ask for units), unless the
        # whole sale is known to be empty.
        short_outcome = "SOLD_OUT" if self.sales.sold_out(sale.sku) else ""
        for attempt in range(MAX_ATTEMPTS):
            shard = shard_of(user_id, sale.shards)
            reply = await self.store.purchase(sale, user_id, key, quantity, shard, short_outcome)
            code = reply.code
            if code is Purchase.NEED_UNITS:
                if await self.store.is_sold_out(sale.sku):
                    # Known sold out (set after a consistent read of every shard, cleared
                    # when a refused delivery gives units back): no need to look again.
                    self.sales.mark_sold_out(sale.sku)
                    short_outcome = "SOLD_OUT"
                    continue
                refill = await self.rebalancer.refill(sale, shard, quantity)
                if refill is Refill.SOLD_OUT:
                    await self.store.set_sold_out(sale.sku, True)
                    self.sales.mark_sold_out(sale.sku)
                short_outcome = SHORT_OUTCOME.get(refill, "")
                if refill is Refill.RETRY or attempt >= 2:
                    # Near the end of a sale, crowds on several shards pull the last
                    # units back and forth; a short random pause lets one of them win.
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
                continue
            if code is Purchase.SHARDS_MISMATCH or code is Purchase.SALE_NOT_FOUND:
                # The sale was deleted (and maybe created again) since we cached it.
                self.sales.forget(sale.sku)
                fresh = await self.sales.get(sale.sku)
                if fresh is None or code is Purchase.SALE_NOT_FOUND and fresh == sale:
                    raise ApiError(404, "SALE_NOT_FOUND", "no sale for this SKU")
                sale = fresh
                continue
            # A SOLD_OUT reply does not renew the sold-out memory: only a refill's check
            # of every shard does. It may answer a quantity the sale cannot fill while
            # units are left (Refill.INSUFFICIENT), and renewed by every such reply the
            # memory would outlive units given back by a compensation.
            return self._render(sale, user_id, reply)
        raise unavailable("the sale is busy moving units; retry with the same key")

    def _render(self, sale: Sale, user_id: int, reply: PurchaseReply) -> Outcome:
        code = reply.code
        if code is Purchase.KEY_REUSED:
            raise ApiError(422, "IDEMPOTENCY_KEY_REUSED",
                           "this key was used before with a different SKU or quantity")
        if code is Purchase.BAD_QUANTITY:
            raise bad_request("quantity is over the per-user limit")
        if code is Purchase.DUPLICATE:
            body = outcome_body(reply.outcome_code, sale.sku, user_id, reply.order_no, reply.units)
            if reply.same_attempt:
                # The client library resent this very call after losing the reply: the
                # outcome is this request's own, not a duplicate's.
                return Outcome(reply.status, body)
            if self.settings.duplicate_response == "replay":
                headers = {"Idempotent-Replayed": "true"}
                if reply.order_status:
                    # The original body, as promised; what became of the order since.
                    headers["Order-Status"] = reply.order_status
                return Outcome(reply.status, body, headers)
            conflict = {"code": "IDEMPOTENT_CONFLICT",
                        "message": "this key was used before; the original outcome is attached",
                        "original": {"status": reply.status, "body": body}}
            if reply.order_status:
                conflict["order_status"] = reply.order_status
            return Outcome(409, conflict)
        name = {Purchase.OK: "OK", Purchase.ALREADY_PURCHASED: "ALREADY_PURCHASED"}.get(code) \
            or reply.outcome_code
        return Outcome(STATUS_OF[name], outcome_body(name, sale.sku, user_id, reply.order_no, reply.units))
