"""The Redis store: every read and write the gateway makes, and every script call.

Works the same on standalone Redis and on Redis Cluster: a script only ever gets the
keys of one shard (one hash tag), and cross-shard reads go through a non-transactional
pipeline, which the Cluster client splits by node. What each script takes and answers
is known only to its owner in ``gateway.store.scripts``. Every call here is safe to send
twice (redis-py resends a call whose reply was lost).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.models import Order, Sale, ShardState, Transfer
from gateway.store.connection import RedisClient
from gateway.store.keys import KeySpace, ShardKeys, key_shard, new_order_no, shard_of_order
from gateway.store.scripts import ScriptRunner, transfer
from gateway.store.scripts import compensate as compensate_script
from gateway.store.scripts import mark_delivered as mark_delivered_script
from gateway.store.scripts import purchase as purchase_script
from gateway.store.scripts import queue as queue_script
from gateway.store.scripts import sales as sale_scripts
from gateway.store.scripts import sold_out as sold_out_script
from gateway.store.scripts.compensate import Compensated
from gateway.store.scripts.mark_delivered import Delivered
from gateway.store.scripts.sales import Claim, Shard
from gateway.store.scripts.transfer import Applied
from gateway.store.transport.link import OutcomeUnknown

T = TypeVar("T")

# Shards created at a time (the lease is renewed between batches).
CREATE_BATCH = 256


def now_ms() -> int:
    return int(time.time() * 1000)


class SaleTaken(Exception):
    """Another creation or deletion of the SKU took it over while we worked."""


@dataclass(frozen=True, slots=True)
class SoldOutState:
    """The sale's shared sold-out state: ``returns`` counts units given back, as read
    (the token a later ``mark_sold_out`` compares)."""

    sold_out: bool
    returns: str


def _sold_out_state(sale: Sale, record: dict[str, str]) -> SoldOutState:
    """Sold out: the mark is the current count of returns, no return is under way (but
    for one announced by a process that died long ago), and it is this sale."""
    returns = str(record.get("returns", ""))
    mark = record.get("sold_out_at")
    oldest = now_ms() - sold_out_script.RETURN_STALE_MS
    returning = any(name.startswith("returning:") and int(value) > oldest
                    for name, value in record.items())
    return SoldOutState(mark is not None and mark == returns and not returning
                        and record.get("generation") == sale.generation
                        and record.get("state") == "ready", returns)


class Store:
    def __init__(self, client: RedisClient, keys: KeySpace, outcome_ttl: int = 300,
                 batcher: ScriptRunner | None = None, creation_lease_ms: int = 10_000) -> None:
        """``batcher`` (see ``gateway.store.transport``), when given, carries the hot-path
        script calls (the purchase) batched into pipelines; everything else goes to
        ``client``. The caller that made the batcher closes it. ``creation_lease_ms``: a
        creation or deletion of a sale not renewed for this long is taken to have died
        (the next PUT or DELETE of the SKU finishes or undoes it)."""
        self.client = client
        self.keys = keys
        self.outcome_ttl = outcome_ttl
        self.batcher = batcher
        self.creation_lease_ms = creation_lease_ms

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    async def _each(self, call: Callable[[ScriptRunner, int], Awaitable[T]],
                    shards: Iterable[int]) -> list[T]:
        """A script call per shard, concurrently: through the batcher (one pipeline per
        node), or through the client within its connection pool's bounds."""
        runner: ScriptRunner = self.batcher or self.client
        limit = asyncio.Semaphore(256 if self.batcher is not None else 32)

        async def one(shard: int) -> T:
            async with limit:
                return await call(runner, shard)

        return list(await asyncio.gather(*(one(shard) for shard in shards)))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()

    # -- sales ------------------------------------------------------------------

    async def create_sale(self, sale: Sale) -> Sale | None:
        """Create the sale: the sale created (with its generation), or None when the SKU
        is taken (a sale exists, or another is being made). A creation that was cut off
        (a timeout, a crash) is finished by this call when it has the same parameters,
        and undone first otherwise (once its lease is over): never left half made."""
        claimed = await self.begin_sale(sale)
        if claimed is None:
            return None
        try:
            for first in range(0, claimed.shards, CREATE_BATCH):
                shards = range(first, min(first + CREATE_BATCH, claimed.shards))
                replies = await self._each(
                    lambda runner, shard: sale_scripts.create_shard(
                        runner, self.keys.shard(sale.sku, shard), claimed), shards)
                if Shard.CLOSED in replies:
                    raise SaleTaken(sale.sku)  # deleted (or undone) while we worked
                stale = [shard for shard, reply in zip(shards, replies)
                         if reply is Shard.OTHER_GENERATION]
                if stale:
                    await self._replace_stale_shards(claimed, stale)
                await self._renew(claimed)
            if not await sale_scripts.set_state(self.client, self.keys.sale(sale.sku),
                                                claimed.generation, "ready"):
                raise SaleTaken(sale.sku)
        except SaleTaken:
            return None
        return claimed

    async def begin_sale(self, sale: Sale) -> Sale | None:
        """Claim the SKU for ``sale`` (its record reads ``creating``) and make sure the
        relay reads every stream the sale can write to, before any shard exists. The
        sale to create (with its generation: a cut-off creation's, when resumed); None
        when the SKU is taken."""
        registry = self.keys.sale(sale.sku)
        fresh = replace(sale, created_at=sale.created_at or now_ms(),
                        generation=sale.generation or secrets.token_hex(6))
        for _ in range(3):
            reply = await sale_scripts.claim(self.client, registry, fresh, now_ms(),
                                             self.creation_lease_ms)
            if reply.claim is Claim.TAKEN:
                return None
            if reply.claim is Claim.STALE:
                # Its creator or deleter died: finish that (undo a half-made sale).
                await self._finish_delete(sale.sku, reply.generation)
                continue
            claimed = replace(fresh, generation=reply.generation)
            if reply.claim is Claim.RESUME:
                stored = await self._sale_from_record(sale.sku)
                claimed = stored[0] if stored is not None else claimed
            await self.register_streams(claimed.shards)
            await self.client.hset(self.keys.sales, sale.sku, claimed.shards)
            return claimed
        return None

    async def create_shard(self, sale: Sale, shard: int) -> Shard:
        return await sale_scripts.create_shard(self.client, self.keys.shard(sale.sku, shard), sale)

    async def _renew(self, sale: Sale) -> None:
        """Renew the creation's lease; SaleTaken when it is no longer ours to create."""
        if not await sale_scripts.set_state(self.client, self.keys.sale(sale.sku), sale.generation,
                                            "creating", now_ms() + self.creation_lease_ms):
            raise SaleTaken(sale.sku)

    async def _replace_stale_shards(self, sale: Sale, shards: list[int]) -> None:
        """Shards of a generation the registry no longer names (a creator that outlived its
        lease, a deletion cut off): ours to replace, while the registry says the SKU is
        ours and being created."""
        await self._renew(sale)
        for shard in shards:
            sk = self.keys.shard(sale.sku, shard)
            await sale_scripts.close_shard(self.client, sk, "", 2 * self.creation_lease_ms)
            if await sale_scripts.create_shard(self.client, sk, sale) is not Shard.CREATED:
                raise SaleTaken(sale.sku)

    async def get_sale(self, sku: str) -> Sale | None:
        """The sale, once it is complete (a sale being created or deleted is not for sale)."""
        found = await self._sale_from_record(sku)
        return found[0] if found is not None and found[1] == "ready" else None

    async def sale_record(self, sku: str) -> tuple[Sale, str] | None:
        """The sale and its state (``creating``, ``ready``, ``deleting``), whatever it is."""
        return await self._sale_from_record(sku)

    async def _sale_from_record(self, sku: str) -> tuple[Sale, str] | None:
        record: dict[str, str] = await self.client.hgetall(self.keys.sale(sku))  # type: ignore[assignment]
        if not record or "generation" not in record or "stock" not in record:
            return None
        sale = Sale(sku=sku, stock=int(record["stock"]), price=int(record["price"]),
                    per_user_limit=int(record["per_user_limit"]), shards=int(record["shards"]),
                    created_at=int(record["created_at"]), generation=record["generation"],
                    starts_at=int(record.get("starts_at") or 0),
                    ends_at=int(record.get("ends_at") or 0),
                    payment_ttl=int(record.get("payment_ttl") or 0),
                    admit_rate=float(record.get("admit_rate") or 0))
        return sale, record.get("state", "")

    async def list_sales(self) -> dict[str, int]:
        """SKU -> shard count of every sale (also those being created or deleted)."""
        sales: dict[str, str] = await self.client.hgetall(self.keys.sales)  # type: ignore[assignment]
        return {sku: int(n) for sku, n in sales.items()}

    async def register_streams(self, shards: int) -> None:
        """The relay reads streams 0..shards-1 from now on (the mark only grows)."""
        await self.client.zadd(self.keys.relay_shards, {"max": shards}, gt=True)

    async def relay_shards(self) -> int:
        """How many shard streams can hold a purchase: those of the widest sale ever
        begun (deleted sales too: their streams may hold purchases not yet delivered)."""
        stored = await self.client.zscore(self.keys.relay_shards, "max")
        sales = await self.list_sales()
        return max(int(stored or 0), max(sales.values(), default=0))

    async def delete_sale(self, sale: Sale) -> None:
        """Remove the sale and every key of it: shards, buyers, orders, transfers.
        Each shard is closed first (its stock record goes, so no purchase lands in it
        afterwards), then its orders are deleted; the registry record goes last, so a
        deletion cut off half-way is finished by the next DELETE (or PUT) of the SKU.
        Idempotency records are not per sale; they expire on their own."""
        lease = now_ms() + self.creation_lease_ms
        await sale_scripts.set_state(self.client, self.keys.sale(sale.sku), sale.generation,
                                     "deleting", lease)
        await self._finish_delete(sale.sku, sale.generation, sale.shards)

    async def _finish_delete(self, sku: str, generation: str, shards: int | None = None) -> None:
        if shards is None:
            found = await self._sale_from_record(sku)
            shards = found[0].shards if found is not None else await self.relay_shards()
        closed = await self._each(
            lambda runner, shard: sale_scripts.close_shard(
                runner, self.keys.shard(sku, shard), generation, 2 * self.creation_lease_ms),
            range(shards))
        pipe = self._pipeline()
        for shard, order_nos in enumerate(closed):
            if order_nos is None:
                continue  # another generation's shard
            sk = self.keys.shard(sku, shard)
            for order_no in order_nos:
                pipe.delete(sk.order(order_no))
            pipe.delete(sk.order_index)
        for shard in range(shards):  # the waiting room's queues (closed shards take no join)
            sk = self.keys.shard(sku, shard)
            pipe.delete(sk.queue)
            pipe.delete(sk.queue_meta)
        pipe.delete(self.keys.queue_state(sku))
        pipe.delete(self.keys.queue_lease(sku))
        await pipe.execute()
        registry = self.keys.sale(sku)
        found = await self._sale_from_record(sku)
        if found is None or found[0].generation == generation:
            await self.client.hdel(self.keys.sales, sku)
        await sale_scripts.set_state(self.client, registry, generation, "gone")

    async def shard_states(self, sale: Sale, shards: Iterable[int] | None = None) -> list[ShardState]:
        shards = list(range(sale.shards) if shards is None else shards)
        pipe = self._pipeline()
        for shard in shards:
            sk = self.keys.shard(sale.sku, shard)
            pipe.hmget(sk.stock, "remaining", "sold", "version", "returned")
            pipe.hgetall(sk.transfers_out)
        replies = await pipe.execute()
        states = []
        for i, shard in enumerate(shards):
            remaining, sold, version, returned = replies[2 * i]
            states.append(ShardState(shard, int(remaining or 0), int(sold or 0), int(version or 0),
                                     replies[2 * i + 1] or {}, int(returned or 0)))
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

    # -- sold out ---------------------------------------------------------------

    async def sold_out_state(self, sale: Sale) -> SoldOutState:
        record: dict[str, str] = await self.client.hgetall(self.keys.sale(sale.sku))  # type: ignore[assignment]
        return _sold_out_state(sale, record)

    async def sold_out_states(self, sales: list[Sale]) -> list[SoldOutState]:
        """The states of several sales in one round trip (per node)."""
        pipe = self._pipeline()
        for sale in sales:
            pipe.hgetall(self.keys.sale(sale.sku))
        return [_sold_out_state(sale, record) for sale, record in zip(sales, await pipe.execute())]

    async def touched_users(self, sale: Sale) -> set[int]:
        """Users with an outcome other than SOLD_OUT recorded on the sale (buyers, also
        those whose order went back since, and those refused for their limit or for too
        large a quantity)."""
        pipe = self._pipeline()
        for shard in range(sale.shards):
            pipe.smembers(self.keys.shard(sale.sku, shard).touched)
        return {int(user) for members in await pipe.execute() for user in members}

    async def mark_sold_out(self, sale: Sale, seen: SoldOutState) -> bool:
        return await sold_out_script.mark(self.client, self.keys.sale(sale.sku), seen.returns,
                                          sale.generation, now_ms())

    async def count_return(self, order: Order, step: str) -> None:
        """Around units going back to the order's sale: ``begin`` before, ``end`` after
        (any sold-out mark set before is stale then), ``cancel`` if none went back."""
        await sold_out_script.count_return(self.client, self.keys.sale(order.sku), step,
                                           order.order_no, order.generation, now_ms())

    # -- purchase ---------------------------------------------------------------

    def binds_key_apart(self, user_id: int, shard: int) -> bool:
        """Whether a purchase in ``shard`` must first bind its key in the key's own slot
        (it is another slot)."""
        return shard != key_shard(user_id)

    async def bind_key(self, user_id: int, key: str, sale: Sale, quantity: int) -> bool:
        """False: the key was used for another request (another sale or quantity)."""
        return await purchase_script.bind_key(
            self.batcher or self.client, self.keys.key_record(user_id, key),
            purchase_script.fingerprint(sale.sku, quantity, sale.generation), self.outcome_ttl)

    async def purchase(self, sale: Sale, user_id: int, key: str, quantity: int,
                       shard: int, short_outcome: str = "") -> purchase_script.Reply:
        """``short_outcome``: what to record if the shard has too few units ("" asks for
        units instead; "SOLD_OUT" or "INSUFFICIENT_STOCK" once the whole sale is known)."""
        sk = self.keys.shard(sale.sku, shard)
        request = purchase_script.Request(
            user_id=user_id, sku=sale.sku, quantity=quantity, order_no=new_order_no(shard),
            now_ms=now_ms(), outcome_ttl=self.outcome_ttl, shards=sale.shards,
            generation=sale.generation, short_outcome=short_outcome)
        if self.batcher is not None:
            return await purchase_script.run(self.batcher, sk, sk.idempotency(user_id, key), request)
        try:
            return await purchase_script.run(self.client, sk, sk.idempotency(user_id, key), request)
        except RedisConnectionError as exc:
            # redis-py cannot tell whether a call whose connection broke had run; only a
            # failure to connect says it was never sent.
            if "connecting to" in str(exc):
                raise
            raise OutcomeUnknown(f"{exc} (the purchase may have run)") from exc

    # -- moving units between shards ---------------------------------------------

    async def transfer_out(self, sale: Sale, donor: int, receiver: int, want: int,
                           transfer_id: str) -> tuple[int, str] | None:
        return await transfer.take_out(self.client, self.keys.shard(sale.sku, donor), receiver,
                                       want, transfer_id, now_ms(), sale.generation)

    async def transfer_in(self, sale: Sale, move: Transfer) -> Applied:
        return await transfer.put_in(self.client, self.keys.shard(sale.sku, move.receiver), move,
                                     sale.generation)

    async def transfer_done(self, sale: Sale, move: Transfer) -> None:
        await transfer.finish(self.client, self.keys.shard(sale.sku, move.donor), move.transfer_id)

    # -- orders -------------------------------------------------------------------

    async def get_order(self, order_no: str) -> Order | None:
        shard = shard_of_order(order_no)
        if shard is None:
            return None
        record: dict[str, str] = await self.client.hgetall(  # type: ignore[assignment]
            self.keys.order(order_no, shard))
        return Order.from_record(record) if record else None

    def _order_shard(self, order: Order) -> tuple[ShardKeys, str]:
        shard = shard_of_order(order.order_no)
        assert shard is not None
        sk = self.keys.shard(order.sku, shard)
        return sk, order.idempotency_key or sk.idempotency(order.user_id, "-")

    async def compensate(self, order: Order, reason: str, keep_units: Iterable[int] = (),
                         status: str = "rejected") -> compensate_script.Result:
        """Give a purchase's units back to its shard (but ``keep_units``, sold to another
        order) and free the buyer's limit: the endpoint refused it (``rejected``), or it
        was left unpaid or cancelled (``released``)."""
        sk, idempotency_key = self._order_shard(order)
        return await compensate_script.run(self.client, sk, order.order_no, idempotency_key,
                                           reason, keep_units, status)

    async def mark_delivered(self, order: Order) -> Delivered:
        sk, idempotency_key = self._order_shard(order)
        return await mark_delivered_script.run(self.client, sk, order.order_no, idempotency_key)

    # -- waiting room --------------------------------------------------------------

    def _runner(self) -> ScriptRunner:
        return self.batcher or self.client

    async def queue_join(self, sale: Sale, user_id: int, shard: int,
                         pre_score: float) -> queue_script.Joined:
        return await queue_script.join(self._runner(), self.keys.shard(sale.sku, shard), user_id,
                                       sale.generation, sale.starts_at, pre_score)

    async def queue_rank(self, sale: Sale, user_id: int,
                         shard: int) -> tuple[queue_script.Rank, int]:
        return await queue_script.rank(self._runner(), self.keys.shard(sale.sku, shard), user_id,
                                       sale.generation, sale.starts_at)

    async def queue_heads(self, sale: Sale, cursors: list[int],
                          count: int) -> list[queue_script.Head]:
        """Every shard of the sale as the admitter sees it (``count`` tickets each from
        its cursor on), through one pipeline per node."""
        return await self._each(
            lambda runner, shard: queue_script.head(
                runner, self.keys.shard(sale.sku, shard), sale.generation, sale.starts_at,
                cursors[shard], count), range(sale.shards))

    async def queue_advance(self, sale: Sale, step: queue_script.Advance) -> tuple[int, int]:
        return await queue_script.advance(self._runner(), self.keys.queue_state(sale.sku), step)

    async def queue_lease(self, sku: str, owner: str, lease_ms: int) -> bool:
        return await queue_script.lease(self.client, self.keys.queue_lease(sku), owner, lease_ms)

    async def queue_state(self, sku: str) -> dict[str, str]:
        state: dict[str, str] = await self.client.hgetall(self.keys.queue_state(sku))  # type: ignore[assignment]
        return state

    async def queue_lengths(self, sale: Sale) -> list[int]:
        pipe = self._pipeline()
        for shard in range(sale.shards):
            pipe.zcard(self.keys.shard(sale.sku, shard).queue)
        return [int(n) for n in await pipe.execute()]

    # -- tokens -------------------------------------------------------------------

    async def token_secret(self, candidate: str) -> str:
        """The deployment's token-signing secret, shared by every worker: the first
        process to start stores its candidate, everyone reads the stored one."""
        await self.client.set(self.keys.token_secret, candidate, nx=True)
        return str(await self.client.get(self.keys.token_secret))


__all__ = ["Compensated", "Delivered", "SaleTaken", "SoldOutState", "Store"]
