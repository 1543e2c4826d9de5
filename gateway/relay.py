"""The relay: delivers admitted purchases from the per-shard streams to the seckill endpoint.

Every admitted purchase leaves an entry in its shard's stream (``{prefix:s}:purchases``),
written by the same Lua call that took its units. The relay reads the streams with one
consumer group, POSTs each purchase with ``Idempotency-Key: <order_no>`` and
acknowledges the entry only once the endpoint has decided:

* 2xx, or 409 for an order it holds already: delivered; the order reads ``delivered``;
* 409 ``UNIT_TAKEN`` or another 4xx: rejected; the purchase is compensated (its units
  go back to the sale, the order reads ``rejected``);
* 5xx, 408/425/429, timeouts, refused connections: retried with capped exponential
  backoff and jitter, for as long as it takes.

Delivery is at least once and, with the endpoint's idempotency, exactly once in effect.
An entry is in a consumer's pending list from read to acknowledgement, so a relay that
dies loses nothing: restarted under the same consumer name it re-reads its own pending
entries first, and every relay claims entries that stayed pending too long (XAUTOCLAIM).
A live relay refreshes the idle time of its in-flight entries, so a slow endpoint does
not make relays steal each other's work. Several relays may run at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
import orjson
from redis.exceptions import ResponseError

from .aio import cancel_and_wait
from .codes import Compensated
from .config import Settings
from .keys import KeySpace
from .metrics import Metrics
from .models import parse_units
from .redis_conn import RedisClient, connect, is_redis_failure
from .store import Store

log = logging.getLogger("gateway.relay")

T = TypeVar("T")

#: 4xx answers that mean "not now" rather than "no": retried, never compensated.
RETRYABLE_4XX = frozenset({408, 425, 429})


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class RelayConfig:
    consumer: str = field(default_factory=default_consumer)
    group: str = "relay"
    concurrency: int = 64           # deliveries in flight, over all streams
    read_count: int = 100           # entries per XREADGROUP
    block_ms: int = 2000            # XREADGROUP BLOCK
    request_timeout: float = 10.0   # one POST, connect to last byte
    claim_idle_ms: int = 60_000     # claim entries pending longer than this
    claim_every: float = 5.0        # seconds between claim rounds (and heartbeats)
    refresh_every: float = 2.0      # seconds between looks for new shards
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    drain_timeout: float = 10.0     # stop(): how long in-flight deliveries may finish
    forget_consumers_ms: int = 3_600_000  # drop idle consumers with nothing pending


@dataclass(frozen=True, slots=True)
class Admitted:
    """One purchase-stream entry: the purchase as the endpoint receives it."""

    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    admitted_at: int

    @classmethod
    def parse(cls, fields: dict[str, str]) -> "Admitted | None":
        try:
            return cls(fields["order_no"], fields["sku"], int(fields["user_id"]),
                       parse_units(fields["units"]), int(fields["quantity"]),
                       int(fields["amount"]), int(fields["admitted_at"]))
        except (KeyError, ValueError):
            return None

    def body(self) -> bytes:
        return orjson.dumps({
            "order_no": self.order_no, "sku": self.sku, "user_id": self.user_id,
            "units": list(self.units), "quantity": self.quantity, "amount": self.amount,
            "admitted_at": self.admitted_at,
        })


@dataclass(frozen=True, slots=True)
class Verdict:
    """The endpoint's decision on one purchase."""

    delivered: bool
    reason: str = ""
    taken: tuple[int, ...] = ()  # units the endpoint says other orders hold


def judge(status: int, body: bytes, units: tuple[int, ...]) -> Verdict | None:
    """The endpoint's answer as a verdict; None: no decision, ask again later."""
    if 200 <= status < 300:
        return Verdict(True)
    if status >= 500 or status in RETRYABLE_4XX or status < 400:
        return None
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        data = {}
    code = data.get("code", "") if isinstance(data, dict) else ""
    if status == 409 and code == "UNIT_TAKEN":
        # Units held elsewhere are sold: they must not go back on sale, or the next buyer
        # is refused too. An endpoint that does not say which: keep them all back.
        reported = data.get("units")
        held = {u for u in reported if isinstance(u, int)} if isinstance(reported, list) else set()
        return Verdict(False, "UNIT_TAKEN", tuple(u for u in units if u in held) if held else units)
    if status == 409:
        return Verdict(True)  # the endpoint has this order already
    return Verdict(False, f"{status} {code}".strip())


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


@dataclass(slots=True)
class PurchaseStreams:
    """The stream commands of the relay, for one consumer of one group."""

    client: RedisClient
    keys: KeySpace
    group: str
    consumer: str

    @property
    def high_water_key(self) -> str:
        """Sorted set remembering the largest shard count ever seen, so that streams of
        a deleted wider sale are still read after a restart."""
        return f"{self.keys.prefix}:relay:shards"

    async def shard_count(self, sales: dict[str, int]) -> int:
        seen = max(sales.values(), default=0)
        if seen:
            await self.client.zadd(self.high_water_key, {"max": seen}, gt=True)
        stored = await self.client.zscore(self.high_water_key, "max")
        return max(seen, int(stored or 0))

    async def ensure_group(self, stream: str) -> None:
        try:
            await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, stream: str, cursor: str, count: int,
                   block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        reply = await self.client.xreadgroup(self.group, self.consumer, {stream: cursor},
                                             count=count, block=block_ms)
        return list(reply[0][1]) if reply else []

    async def claim_stale(self, stream: str, min_idle_ms: int,
                          count: int) -> list[tuple[str, dict[str, str]]]:
        claimed: list[tuple[str, dict[str, str]]] = []
        cursor = "0-0"
        while True:
            reply = await self.client.xautoclaim(stream, self.group, self.consumer, min_idle_ms,
                                                 start_id=cursor, count=count)
            cursor, entries = reply[0], reply[1]
            claimed.extend(e for e in entries if e[0] is not None)
            if cursor in ("0-0", "0") or len(claimed) >= count:
                return claimed

    async def touch(self, stream: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries we are still working on."""
        await self.client.xclaim(stream, self.group, self.consumer, 0, entry_ids, justid=True)

    async def done(self, stream: str, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(stream, self.group, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def backlog(self, streams: list[str]) -> int:
        """Entries not yet delivered: delivered entries are deleted, so XLEN counts them."""
        if not streams:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
        return sum(int(n) for n in await pipe.execute())

    async def forget_idle_consumers(self, stream: str, idle_ms: int) -> None:
        for consumer in await self.client.xinfo_consumers(stream, self.group):
            if (consumer["name"] != self.consumer and int(consumer["pending"]) == 0
                    and int(consumer["idle"]) > idle_ms):
                await self.client.xgroup_delconsumer(stream, self.group, consumer["name"])


class Relay:
    """Reads every shard's stream and delivers; ``start()`` then ``await stop()``."""

    def __init__(self, store: Store, upstream_url: str, metrics: Metrics | None = None,
                 config: RelayConfig | None = None, *, owns_store: bool = False) -> None:
        self.store = store
        self.upstream_url = upstream_url
        self.metrics = metrics or Metrics()
        self.config = config or RelayConfig()
        self.owns_store = owns_store
        self.streams = PurchaseStreams(store.client, store.keys, self.config.group,
                                       self.config.consumer)
        self._random = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._background: list[asyncio.Task] = []
        self._readers: dict[int, asyncio.Task] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Task] = {}
        self._stopping = False

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None,
                      config: RelayConfig | None = None) -> "Relay":
        """A relay with its own Redis client: its blocking reads need a socket timeout
        longer than the BLOCK time, and must not hold the gateway's connections."""
        if not settings.upstream_url:
            raise ValueError("the relay needs SECKILL_UPSTREAM_URL")
        if config is None:
            # Claim rounds also keep our own in-flight entries fresh: they must come
            # well within the idle time after which other relays take entries over.
            idle_ms = settings.relay_claim_idle_ms
            config = RelayConfig(claim_idle_ms=idle_ms,
                                 claim_every=min(RelayConfig().claim_every, idle_ms / 3000))
        timeout = max(settings.redis_timeout, config.block_ms / 1000 + 2.0)
        store = Store(connect(settings.replace(redis_timeout=timeout)),
                      KeySpace(settings.key_prefix), outcome_ttl=settings.idempotency_ttl)
        return cls(store, settings.upstream_url, metrics, config, owns_store=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start reading and delivering (call from inside the running event loop)."""
        if self._session is not None:
            raise RuntimeError("relay already started")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout),
            connector=aiohttp.TCPConnector(limit=self.config.concurrency),
        )
        self._background = [
            asyncio.create_task(self._discover_forever(), name="relay-discover"),
            asyncio.create_task(self._claim_forever(), name="relay-claim"),
        ]
        log.info("relay started", extra={"consumer": self.config.consumer,
                                         "upstream": self.upstream_url})

    async def stop(self) -> None:
        """Stop reading, let in-flight deliveries finish and acknowledge (for up to
        ``drain_timeout``), then stop. Whatever is cut off stays pending in Redis and
        is delivered by the next relay to read or claim it."""
        if self._session is None:
            return
        self._stopping = True
        await cancel_and_wait([*self._background, *self._readers.values()])
        pending = list(self._in_flight.values())
        if pending:
            _, cut = await asyncio.wait(pending, timeout=self.config.drain_timeout)
            await cancel_and_wait(list(cut))
            if cut:
                log.warning("relay stopped with deliveries cut off", extra={"count": len(cut)})
        await self._session.close()
        self._session = None
        self._background, self._readers = [], {}
        self._stopping = False
        if self.owns_store:
            await self.store.close()
        log.info("relay stopped", extra={"consumer": self.config.consumer})

    async def __aenter__(self) -> "Relay":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- reading --------------------------------------------------------------------------

    async def _discover_forever(self) -> None:
        """One reader per shard stream; sales (and so shards) appear at any time."""
        while not self._stopping:
            try:
                count = await self.streams.shard_count(await self.store.list_sales())
                for shard in range(len(self._readers), count):
                    self._readers[shard] = asyncio.create_task(
                        self._read_forever(self.store.keys.stream(shard)), name=f"relay-read-{shard}")
                streams = [self.store.keys.stream(shard) for shard in self._readers]
                self.metrics.relay_lag.set(await self.streams.backlog(streams))
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                log.warning("relay: redis failure looking for streams", extra={"error": repr(exc)})
            await asyncio.sleep(self.config.refresh_every)

    async def _read_forever(self, stream: str) -> None:
        """Own pending entries first (a restart under the same name), then new ones."""
        cursor = "0"
        group_ready = False
        failures = 0
        while not self._stopping:
            try:
                if not group_ready:
                    await self.streams.ensure_group(stream)
                    group_ready = True
                if cursor == ">":
                    entries = await self.streams.read(stream, ">", self.config.read_count,
                                                      self.config.block_ms)
                else:
                    entries = await self.streams.read(stream, cursor, self.config.read_count, None)
                    cursor = entries[-1][0] if entries else ">"
                failures = 0
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                failures += 1
                group_ready = False  # NOGROUP after a lost stream: create it again
                # Entries whose read reply was lost with the node are pending under our
                # name: read our own pending list again rather than wait for a claim.
                cursor = "0"
                log.warning("relay: redis failure reading", extra={"stream": stream,
                                                                    "error": repr(exc)})
                await asyncio.sleep(self._backoff(failures))
                continue
            for entry_id, fields in entries:
                if self._stopping:
                    break
                await self._dispatch(stream, entry_id, fields)

    async def _claim_forever(self) -> None:
        """Keep our in-flight entries fresh; take over entries other relays left behind."""
        rounds = 0
        while not self._stopping:
            await asyncio.sleep(self.config.claim_every)
            rounds += 1
            for shard in list(self._readers):
                stream = self.store.keys.stream(shard)
                try:
                    mine = [entry_id for (s, entry_id) in self._in_flight if s == stream]
                    if mine:
                        await self.streams.touch(stream, mine)
                    stale = await self.streams.claim_stale(stream, self.config.claim_idle_ms,
                                                           self.config.read_count)
                    if stale:
                        log.info("relay: claimed stale entries",
                                 extra={"stream": stream, "count": len(stale)})
                    for entry_id, fields in stale:
                        if self._stopping:
                            break
                        await self._dispatch(stream, entry_id, fields)
                    if rounds % 60 == 0:
                        await self.streams.forget_idle_consumers(stream,
                                                                 self.config.forget_consumers_ms)
                except Exception as exc:
                    if not is_redis_failure(exc):
                        raise
                    log.warning("relay: redis failure claiming", extra={"stream": stream,
                                                                         "error": repr(exc)})

    async def _dispatch(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        key = (stream, entry_id)
        if key in self._in_flight:
            return
        await self._slots.acquire()
        if key in self._in_flight or self._stopping:  # (read and claimed at once)
            self._slots.release()
            return
        task = asyncio.create_task(self._deliver(stream, entry_id, fields))
        self._in_flight[key] = task

        def finished(_: asyncio.Task) -> None:
            self._in_flight.pop(key, None)
            self._slots.release()

        task.add_done_callback(finished)

    # -- delivering -----------------------------------------------------------------------

    async def _deliver(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        purchase = Admitted.parse(fields)
        if purchase is None:
            if fields:  # an empty entry was deleted after its acknowledgement was lost
                log.error("relay: malformed purchase entry dropped",
                          extra={"stream": stream, "entry": entry_id, "fields": fields})
                self.metrics.relay_delivered.labels("malformed").inc()
        else:
            verdict = await self._post_until_decided(purchase)
            await self._settle(purchase, verdict)
        await self._redis(lambda: self.streams.done(stream, entry_id), "acknowledge")

    async def _post_until_decided(self, purchase: Admitted) -> Verdict:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": purchase.order_no}
        body = purchase.body()
        attempt = 0
        while True:
            retry_after = 0.0
            try:
                async with self._session.post(self.upstream_url, data=body, headers=headers,
                                              allow_redirects=False) as response:
                    answer = await response.read()
                    verdict = judge(response.status, answer, purchase.units)
                    if verdict is not None:
                        return verdict
                    problem = f"HTTP {response.status}"
                    retry_after = _retry_after(response.headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = repr(exc)
            attempt += 1
            self.metrics.relay_retries.inc()
            if attempt == 1 or attempt % 10 == 0:
                log.warning("relay: delivery failed, will retry",
                            extra={"order_no": purchase.order_no, "attempt": attempt,
                                   "problem": problem})
            await asyncio.sleep(max(retry_after, self._backoff(attempt)))

    async def _settle(self, purchase: Admitted, verdict: Verdict) -> None:
        """Record the verdict on the order. A missing order record (the sale was deleted)
        leaves nothing to record; the entry is still acknowledged."""
        order = await self._redis(lambda: self.store.get_order(purchase.order_no), "read order")
        if verdict.delivered:
            self.metrics.relay_delivered.labels("delivered").inc()
            if order is not None:
                await self._redis(lambda: self.store.mark_delivered(order), "mark delivered")
                if order.status == "rejected":
                    log.error("relay: endpoint accepted an order compensated before",
                              extra={"order_no": purchase.order_no})
            return
        self.metrics.relay_delivered.labels("rejected").inc()
        log.warning("relay: purchase rejected", extra={"order_no": purchase.order_no,
                                                       "reason": verdict.reason,
                                                       "taken": list(verdict.taken)})
        if order is None:
            return
        result = await self._redis(
            lambda: self.store.compensate(order, verdict.reason, keep_units=verdict.taken),
            "compensate")
        if result is not Compensated.NO_ORDER:
            # Units came back: the sale may be buyable again. (Also after ALREADY: a
            # compensation that ran before a Redis error may not have cleared it; a
            # needless clear only costs one consistent read of the sale.)
            await self._redis(lambda: self.store.set_sold_out(order.sku, False), "clear sold-out")

    async def _redis(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a Redis call until it succeeds: a delivery, once decided, must be recorded."""
        failures = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                failures += 1
                log.warning("relay: redis failure, will retry", extra={"step": what,
                                                                        "error": repr(exc)})
                await asyncio.sleep(self._backoff(failures))

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter (half fixed, half random)."""
        ceiling = min(self.config.backoff_cap, self.config.backoff_base * 2 ** min(attempt - 1, 30))
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)


async def run_relay(settings: Settings, config: RelayConfig | None = None) -> None:
    """``seckill-gateway relay``: deliver until SIGTERM/SIGINT, then drain and stop."""
    relay = Relay.from_settings(settings, config=config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay.start()
    try:
        await stop.wait()
    finally:
        await relay.stop()
