"""The Redis store: every read and write the gateway makes, and every script call.

Works the same on standalone Redis and on Redis Cluster: a script only ever gets the
keys of one shard (one hash tag), and cross-shard reads go through a non-transactional
pipeline, which the Cluster client splits by node. What each script takes and answers
is known only to its owner in ``gateway.store.scripts``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

import orjson

from gateway.models import Order, Sale, ShardState, Transfer
from gateway.store.connection import RedisClient
from gateway.store.keys import KeySpace, new_order_no, shard_of_order
from gateway.store.scripts import ScriptRunner, create_shard, transfer
from gateway.store.scripts import compensate as compensate_script
from gateway.store.scripts import mark_delivered as mark_delivered_script
from gateway.store.scripts import purchase as purchase_script
from gateway.store.scripts.compensate import Compensated
from gateway.store.scripts.mark_delivered import Delivered
from gateway.store.scripts.transfer import Applied


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, client: RedisClient, keys: KeySpace, outcome_ttl: int = 300,
                 batcher: ScriptRunner | None = None) -> None:
        """``batcher`` (see ``gateway.store.transport``), when given, carries the hot-path
        script calls (the purchase) batched into pipelines; everything else goes to
        ``client``. The caller that made the batcher closes it."""
        self.client = client
        self.keys = keys
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
        created_at = sale.created_at or now_ms()
        generation = sale.generation or secrets.token_hex(6)
        record = orjson.dumps({
            "stock": sale.stock, "price": sale.price, "per_user_limit": sale.per_user_limit,
            "shards": sale.shards, "created_at": created_at, "generation": generation,
        })
        if not await self.client.set(self.keys.sale(sale.sku), record, nx=True):
            return False
        sale = Sale(sale.sku, sale.stock, sale.price, sale.per_user_limit, sale.shards,
                    created_at, generation)
        for shard in range(sale.shards):
            await create_shard.run(self.client, self.keys.shard(sale.sku, shard), sale)
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
        sales: dict[str, str] = await self.client.hgetall(self.keys.sales)  # type: ignore[assignment]
        return {sku: int(n) for sku, n in sales.items()}

    async def set_sold_out_flag(self, sku: str, sold_out: bool) -> None:
        """The shared "no units anywhere" flag (decided by ``admission.soldout``)."""
        if sold_out:
            await self.client.set(self.keys.sold_out(sku), 1)
        else:
            await self.client.delete(self.keys.sold_out(sku))

    async def sold_out_flag(self, sku: str) -> bool:
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
            pipe.hmget(sk.stock, "remaining", "sold", "version")
            pipe.hgetall(sk.transfers_out)
        replies = await pipe.execute()
        states = []
        for i, shard in enumerate(shards):
            remaining, sold, version = replies[2 * i]
            states.append(ShardState(shard, int(remaining or 0), int(sold or 0), int(version or 0),
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
                       shard: int, short_outcome: str = "") -> purchase_script.Reply:
        """``short_outcome``: what to record if the shard has too few units ("" asks for
        units instead; "SOLD_OUT" or "INSUFFICIENT_STOCK" once the whole sale is known)."""
        sk = self.keys.shard(sale.sku, shard)
        request = purchase_script.Request(
            user_id=user_id, sku=sale.sku, quantity=quantity, order_no=new_order_no(shard),
            now_ms=now_ms(), outcome_ttl=self.outcome_ttl, shards=sale.shards,
            short_outcome=short_outcome)
        return await purchase_script.run(self.batcher or self.client, sk,
                                         sk.idempotency(user_id, key), request)

    # -- moving units between shards ---------------------------------------------

    async def transfer_out(self, sale: Sale, donor: int, receiver: int, want: int,
                           transfer_id: str) -> tuple[int, str] | None:
        return await transfer.take_out(self.client, self.keys.shard(sale.sku, donor), receiver,
                                       want, transfer_id, now_ms(), sale.generation)

    async def transfer_in(self, sale: Sale, move: Transfer) -> Applied:
        return await transfer.put_in(self.client, self.keys.shard(sale.sku, move.receiver), move,
                                     sale.generation)

    async def transfer_done(self, sale: Sale, move: Transfer) -> None:
        await self.client.hdel(self.keys.shard(sale.sku, move.donor).transfers_out,
                               move.transfer_id)

    # -- orders -------------------------------------------------------------------

    async def get_order(self, order_no: str) -> Order | None:
        shard = shard_of_order(order_no)
        if shard is None:
            return None
        record: dict[str, str] = await self.client.hgetall(  # type: ignore[assignment]
            self.keys.order(order_no, shard))
        return Order.from_record(record) if record else None

    def _order_shard(self, order: Order) -> tuple[Any, str]:
        shard = shard_of_order(order.order_no)
        assert shard is not None
        sk = self.keys.shard(order.sku, shard)
        return sk, order.idempotency_key or sk.idempotency(order.user_id, "-")

    async def compensate(self, order: Order, reason: str,
                         keep_units: Iterable[int] = ()) -> Compensated:
        """Undo a purchase the endpoint refused: its units back in its shard (but
        ``keep_units``, sold to another order), the buyer's limit freed."""
        sk, idempotency_key = self._order_shard(order)
        result = await compensate_script.run(self.client, sk, order.order_no, idempotency_key,
                                             reason, keep_units)
        return result.outcome

    async def mark_delivered(self, order: Order) -> Delivered:
        sk, idempotency_key = self._order_shard(order)
        return await mark_delivered_script.run(self.client, sk, order.order_no, idempotency_key)

    # -- tokens -------------------------------------------------------------------

    async def token_secret(self, candidate: str) -> str:
        """The deployment's token-signing secret, shared by every worker: the first
        process to start stores its candidate, everyone reads the stored one."""
        await self.client.set(self.keys.token_secret, candidate, nx=True)
        return str(await self.client.get(self.keys.token_secret))
