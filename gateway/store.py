"""The Redis store: every read and write the gateway makes, and every script call.

Works the same on standalone Redis and on Redis Cluster: a script only ever gets the
keys of one shard (one hash tag), and cross-shard reads go through a non-transactional
pipeline, which the Cluster client splits by node.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Iterable

import orjson

from .batcher import Batcher
from .codes import Compensated, Created, Delivered, Purchase, TRANSFER_OUT_NO_SHARD, TransferIn
from .keys import KeySpace, new_order_no, shard_of_order
from .models import Order, PurchaseReply, Sale, ShardState, Transfer, parse_units
from .redis_conn import RedisClient
from .scripts import Scripts


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, client: RedisClient, keys: KeySpace, scripts: Scripts | None = None,
                 outcome_ttl: int = 300, batcher: Batcher | None = None) -> None:
        """``batcher`` (see gateway.batcher), when given, carries the hot-path script
        calls (the purchase) batched into pipelines; everything else goes to ``client``.
        The caller that made the batcher closes it."""
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts.load()
        self.outcome_ttl = outcome_ttl
        self.batcher = batcher

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()

    # -- sales ------------------------------------------------------------------

    async def create_sale(self, sale: Sale) -> bool:
        """Create the sale; False when the SKU is taken. The registry record is
        claimed first (SET NX), then each shard is created (idempotently)."""
        created_at = sale.created_at or _now_ms()
        generation = sale.generation or secrets.token_hex(6)
        record = orjson.dumps({
            "stock": sale.stock, "price": sale.price, "per_user_limit": sale.per_user_limit,
            "shards": sale.shards, "created_at": created_at, "generation": generation,
        })
        if not await self.client.set(self.keys.sale(sale.sku), record, nx=True):
            return False
        for shard in range(sale.shards):
            lo, hi = sale.shard_range(shard)
            sk = self.keys.shard(sale.sku, shard)
            reply = await self.scripts.create_shard(
                self.client, (sk.stock, sk.units),
                (lo, hi, sale.per_user_limit, sale.price, sale.shards, generation))
            Created(int(reply))
        await self.client.hset(self.keys.sales, sale.sku, sale.shards)
        return True

    async def get_sale(self, sku: str) -> Sale | None:
        record = await self.client.get(self.keys.sale(sku))
        if record is None:
            return None
        data = orjson.loads(record)
        return Sale(sku=sku, stock=data["stock"], price=data["price"],
                    per_user_limit=data["per_user_limit"], shards=data["shards"],
                    created_at=data["created_at"], generation=data.get("generation", ""))

    async def list_sales(self) -> dict[str, int]:
        """SKU -> shard count of every sale."""
        return {sku: int(n) for sku, n in (await self.client.hgetall(self.keys.sales)).items()}

    async def set_sold_out(self, sku: str, sold_out: bool) -> None:
        if sold_out:
            await self.client.set(self.keys.sold_out(sku), 1)
        else:
            await self.client.delete(self.keys.sold_out(sku))

    async def is_sold_out(self, sku: str) -> bool:
        return bool(await self.client.exists(self.keys.sold_out(sku)))

    async def delete_sale(self, sale: Sale) -> None:
        """Remove the sale and every key of it: shards, buyers, orders, transfers.
        Idempotency records are not per sale; they expire on their own."""
        pipe = self._pipeline()
        for shard in range(sale.shards):
            pipe.smembers(self.keys.shard(sale.sku, shard).order_index)
        indexes = await pipe.execute()
        pipe = self._pipeline()
        for shard, order_nos in enumerate(indexes):
            sk = self.keys.shard(sale.sku, shard)
            for order_no in order_nos:
                pipe.delete(sk.order(order_no))
            for key in sk.sale_keys():
                pipe.delete(key)
        pipe.hdel(self.keys.sales, sale.sku)
        pipe.delete(self.keys.sold_out(sale.sku))
        pipe.delete(self.keys.sale(sale.sku))
        await pipe.execute()

    async def shard_states(self, sale: Sale, shards: Iterable[int] | None = None) -> list[ShardState]:
        shards = list(range(sale.shards) if shards is None else shards)
        pipe = self._pipeline()
        for shard in shards:
            sk = self.keys.shard(sale.sku, shard)
            pipe.hmget(sk.stock, "remaining", "sold", "ver")
            pipe.hgetall(sk.transfers_out)
        replies = await pipe.execute()
        states = []
        for i, shard in enumerate(shards):
            remaining, sold, ver = replies[2 * i]
            states.append(ShardState(shard, int(remaining or 0), int(sold or 0), int(ver or 0),
                                     replies[2 * i + 1] or {}))
        return states

    async def applied_transfers(self, sale: Sale, transfer_ids: dict[int, list[str]]) -> set[str]:
        """Of the given transfer ids (by receiving shard), those already applied."""
        pipe = self._pipeline()
        asked: list[str] = []
        for receiver, ids in transfer_ids.items():
            sk = self.keys.shard(sale.sku, receiver)
            for transfer_id in ids:
                pipe.sismember(sk.transfers_in, transfer_id)
                asked.append(transfer_id)
        if not asked:
            return set()
        replies = await pipe.execute()
        return {tid for tid, hit in zip(asked, replies) if hit}

    # -- purchase ---------------------------------------------------------------

    async def purchase(self, sale: Sale, user_id: int, key: str, quantity: int,
                       shard: int, short_outcome: str = "") -> PurchaseReply:
        """``short_outcome``: what to record if the shard has too few units ("" asks for
        units instead; "SOLD_OUT" or "INSUFFICIENT_STOCK" once the whole sale is known)."""
        sk = self.keys.shard(sale.sku, shard)
        order_no = new_order_no(shard)
        reply = await self.scripts.purchase(
            self.batcher or self.client,
            (sk.idempotency(user_id, key), sk.stock, sk.units, sk.buyers,
             sk.order(order_no), sk.order_index, sk.stream),
            (user_id, sale.sku, quantity, f"{sale.sku}|{quantity}", order_no, _now_ms(),
             self.outcome_ttl, sale.shards, short_outcome),
        )
        return decode_purchase(reply)

    # -- moving units between shards ---------------------------------------------

    async def transfer_out(self, sale: Sale, donor: int, receiver: int, want: int,
                           transfer_id: str) -> tuple[int, str] | None:
        sk = self.keys.shard(sale.sku, donor)
        reply = await self.scripts.transfer_out(
            self.client, (sk.stock, sk.units, sk.transfers_out),
            (transfer_id, receiver, want, _now_ms(), sale.generation))
        if int(reply[0]) == TRANSFER_OUT_NO_SHARD:
            return None
        return int(reply[0]), reply[1]

    async def transfer_in(self, sale: Sale, transfer: Transfer) -> TransferIn:
        sk = self.keys.shard(sale.sku, transfer.receiver)
        reply = await self.scripts.transfer_in(
            self.client, (sk.stock, sk.units, sk.transfers_in),
            (transfer.transfer_id, transfer.ranges, transfer.count, sale.generation))
        return TransferIn(int(reply))

    async def transfer_done(self, sale: Sale, transfer: Transfer) -> None:
        await self.client.hdel(self.keys.shard(sale.sku, transfer.donor).transfers_out,
                               transfer.transfer_id)

    # -- orders -------------------------------------------------------------------

    async def get_order(self, order_no: str) -> Order | None:
        shard = shard_of_order(order_no)
        if shard is None:
            return None
        record = await self.client.hgetall(self.keys.order(order_no, shard))
        return decode_order(record) if record else None

    async def compensate(self, order: Order, reason: str, keep_units: Iterable[int] = ()) -> Compensated:
        shard = shard_of_order(order.order_no)
        assert shard is not None
        sk = self.keys.shard(order.sku, shard)
        reply = await self.scripts.compensate(
            self.client,
            (sk.order(order.order_no), sk.stock, sk.units, sk.buyers,
             order.idempotency_key or sk.idempotency(order.user_id, "-")),
            (reason, ",".join(str(u) for u in keep_units)))
        result = Compensated(int(reply[0]))
        if result is Compensated.DONE and int(reply[1]) > 0:
            # Units are back: the sale is not sold out any more.
            await self.set_sold_out(order.sku, False)
        return result

    async def mark_delivered(self, order: Order) -> Delivered:
        shard = shard_of_order(order.order_no)
        assert shard is not None
        sk = self.keys.shard(order.sku, shard)
        reply = await self.scripts.mark_delivered(
            self.client,
            (sk.order(order.order_no), order.idempotency_key or sk.idempotency(order.user_id, "-")),
            ())
        return Delivered(int(reply))

    # -- tokens -------------------------------------------------------------------

    async def token_secret(self, candidate: str) -> str:
        """The deployment's token-signing secret, shared by every worker: the first
        process to start stores its candidate, everyone reads the stored one."""
        await self.client.set(self.keys.token_secret, candidate, nx=True)
        return await self.client.get(self.keys.token_secret)


def decode_purchase(reply: list[Any]) -> PurchaseReply:
    code = Purchase(int(reply[0]))
    if code is Purchase.OK:
        return PurchaseReply(code, order_no=reply[1], units=parse_units(reply[2]), amount=int(reply[3]))
    if code is Purchase.DUPLICATE:
        return PurchaseReply(code, status=int(reply[1]), outcome_code=reply[2], order_no=reply[3] or "",
                             units=parse_units(reply[4] or ""), order_status=reply[5] or "",
                             same_attempt=bool(int(reply[6])))
    if code is Purchase.SOLD_OUT:
        return PurchaseReply(code, outcome_code=reply[1])
    if code is Purchase.ALREADY_PURCHASED:
        return PurchaseReply(code, order_no=reply[1] or "")
    if code is Purchase.NEED_UNITS:
        return PurchaseReply(code, missing=int(reply[1]))
    return PurchaseReply(code)


def decode_order(record: dict[str, str]) -> Order:
    return Order(
        order_no=record["order_no"], sku=record["sku"], user_id=int(record["user_id"]),
        units=parse_units(record["units"]), quantity=int(record["quantity"]),
        amount=int(record["amount"]), status=record["status"],
        admitted_at=int(record["admitted_at"]), idempotency_key=record.get("idem", ""),
        reason=record.get("reason", ""),
    )
