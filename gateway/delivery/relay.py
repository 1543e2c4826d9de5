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
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from redis.backoff import EqualJitterBackoff

from gateway.admission.returns import Returns
from gateway.admission.soldout import SoldOut
from gateway.aio import cancel_and_wait
from gateway.config import Settings
from gateway.delivery.breaker import Breaker
from gateway.delivery.endpoint import Verdict, judge, retry_after
from gateway.delivery.streams import PurchaseStreams
from gateway.metrics import Metrics
from gateway.models import Purchase
from gateway.store.connection import RedisOutage, connect
from gateway.store.keys import KeySpace
from gateway.store.store import Store

log = logging.getLogger("gateway.relay")

T = TypeVar("T")

CLAIM_EVERY = 5.0


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
    claim_every: float = CLAIM_EVERY  # seconds between claim rounds (and heartbeats)
    refresh_every: float = 2.0      # seconds between looks for new shards
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    drain_timeout: float = 10.0     # stop(): how long in-flight deliveries may finish
    forget_consumers_ms: int = 3_600_000  # drop idle consumers with nothing pending
    pause_after: int = 5            # refusals in a row (same status) that pause delivery
    probe_every: float = 5.0        # while paused: seconds between probes of the endpoint

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RelayConfig:
        """``SECKILL_RELAY_CLAIM_IDLE_MS`` is the one setting of the claim time. Claim
        rounds also keep our own in-flight entries fresh: they must come well within the
        idle time after which other relays take entries over."""
        idle_ms = settings.relay_claim_idle_ms
        values: dict[str, Any] = {"claim_idle_ms": idle_ms,
                                  "claim_every": min(CLAIM_EVERY, idle_ms / 3000),
                                  "pause_after": settings.relay_pause_after}
        values.update(overrides)
        return cls(**values)


class Relay:
    """Reads every shard's stream and delivers; ``start()`` then ``await stop()``."""

    def __init__(self, store: Store, upstream_url: str, metrics: Metrics | None = None,
                 config: RelayConfig | None = None, *, owns_store: bool = False,
                 upstream_token: str | None = None) -> None:
        self.store = store
        self.upstream_url = upstream_url
        self.upstream_token = upstream_token
        self.admin_token: str | None = None  # for the standalone relay's resume endpoint
        self.metrics = metrics or Metrics()
        self.config = config or RelayConfig()
        self.owns_store = owns_store
        self.streams = PurchaseStreams(store.client, store.keys, self.config.group,
                                       self.config.consumer)
        self.returns = Returns(store, SoldOut(store))
        self.breaker = Breaker(self.config.pause_after, self.config.probe_every)
        self.metrics.relay_paused.set_function(lambda: 1.0 if self.breaker.paused else 0.0)
        self._backoff = EqualJitterBackoff(cap=self.config.backoff_cap,
                                           base=self.config.backoff_base)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._background: list[asyncio.Task[None]] = []
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None,
                      config: RelayConfig | None = None) -> Relay:
        """A relay with its own Redis client: its blocking reads need a socket timeout
        longer than the BLOCK time, and must not hold the gateway's connections."""
        if not settings.upstream_url:
            raise ValueError("the relay needs SECKILL_UPSTREAM_URL")
        config = config or RelayConfig.from_settings(settings)
        timeout = max(settings.redis_timeout, config.block_ms / 1000 + 2.0)
        store = Store(connect(settings.replace(redis_timeout=timeout)),
                      KeySpace(settings.key_prefix), outcome_ttl=settings.idempotency_ttl)
        return cls(store, settings.upstream_url, metrics, config, owns_store=True,
                   upstream_token=settings.upstream_token)

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
        self._stopping.set()
        await cancel_and_wait([*self._background, *self._readers.values()])
        pending = list(self._in_flight.values())
        if pending:
            # Paused, the deliveries wait for nothing that will come: cut them at once.
            drain = 0.0 if self.breaker.paused else self.config.drain_timeout
            _, cut = await asyncio.wait(pending, timeout=drain)
            await cancel_and_wait(list(cut))
            if cut:
                log.warning("relay stopped with deliveries cut off", extra={"count": len(cut)})
        await self._session.close()
        self._session = None
        self._background, self._readers = [], {}
        self._stopping.clear()
        if self.owns_store:
            await self.store.close()
        log.info("relay stopped", extra={"consumer": self.config.consumer})

    async def __aenter__(self) -> Relay:
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
        outage = RedisOutage()
        while not self._stopping.is_set():
            with outage:
                count = await self.store.relay_shards()
                for shard in range(len(self._readers), count):
                    self._readers[shard] = asyncio.create_task(
                        self._read_forever(self.store.keys.stream(shard)), name=f"relay-read-{shard}")
                streams = [self.store.keys.stream(shard) for shard in self._readers]
                self.metrics.relay_lag.set(await self.streams.backlog(streams))
            if outage.error:
                log.warning("relay: redis failure looking for streams",
                            extra={"error": repr(outage.error)})
            await asyncio.sleep(self.config.refresh_every)

    async def _read_forever(self, stream: str) -> None:
        """Own pending entries first (a restart under the same name), then new ones."""
        cursor = "0"
        group_ready = False
        failures = 0
        outage = RedisOutage()
        while not self._stopping.is_set():
            entries: list[tuple[str, dict[str, str]]] = []
            with outage:
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
            if outage.error:
                failures += 1
                group_ready = False  # NOGROUP after a lost stream: create it again
                # Entries whose read reply was lost with the node are pending under our
                # name: read our own pending list again rather than wait for a claim.
                cursor = "0"
                log.warning("relay: redis failure reading", extra={"stream": stream,
                                                                    "error": repr(outage.error)})
                await asyncio.sleep(self._pause(failures))
                continue
            for entry_id, fields in entries:
                if self._stopping.is_set():
                    break
                await self._dispatch(stream, entry_id, fields)

    async def _claim_forever(self) -> None:
        """Keep our in-flight entries fresh; take over entries other relays left behind."""
        rounds = 0
        outage = RedisOutage()
        while not self._stopping.is_set():
            await asyncio.sleep(self.config.claim_every)
            rounds += 1
            for shard in list(self._readers):
                stream = self.store.keys.stream(shard)
                with outage:
                    mine = [entry_id for (s, entry_id) in self._in_flight if s == stream]
                    if mine:
                        await self.streams.touch(stream, mine)
                    stale = await self.streams.claim_stale(stream, self.config.claim_idle_ms,
                                                           self.config.read_count)
                    if stale:
                        log.info("relay: claimed stale entries",
                                 extra={"stream": stream, "count": len(stale)})
                    for entry_id, fields in stale:
                        if self._stopping.is_set():
                            break
                        await self._dispatch(stream, entry_id, fields)
                    if rounds % 60 == 0:
                        await self.streams.forget_idle_consumers(stream,
                                                                 self.config.forget_consumers_ms)
                if outage.error:
                    log.warning("relay: redis failure claiming", extra={"stream": stream,
                                                                         "error": repr(outage.error)})

    async def _dispatch(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        key = (stream, entry_id)
        if key in self._in_flight:
            return
        await self._slots.acquire()
        if key in self._in_flight or self._stopping.is_set():  # (read and claimed at once)
            self._slots.release()
            return
        task = asyncio.create_task(self._deliver(stream, entry_id, fields))
        self._in_flight[key] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(key, None)
            self._slots.release()

        task.add_done_callback(finished)

    # -- delivering -----------------------------------------------------------------------

    async def _deliver(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        purchase = Purchase.from_fields(fields)
        if purchase is None:
            if fields:  # an empty entry was deleted after its acknowledgement was lost
                log.error("relay: malformed purchase entry dropped",
                          extra={"stream": stream, "entry": entry_id, "fields": fields})
                self.metrics.relay_delivered.labels("malformed").inc()
        elif await self._released_before_delivery(purchase):
            self.metrics.relay_delivered.labels("released").inc()
        else:
            verdict = await self._post_until_decided(purchase)
            if verdict is None:
                self.metrics.relay_delivered.labels("released").inc()
            else:
                await self._settle(purchase, verdict)
        await self._redis(lambda: self.streams.done(stream, entry_id), "acknowledge")

    async def _released_before_delivery(self, purchase: Purchase) -> bool:
        """An order released (by an admin) before it was delivered is never delivered:
        its units are back in the sale. Asked before the first POST and before every
        retry (a release may come while the endpoint fails or delivery is paused). (A
        release that comes while a POST is in flight cannot stop that POST: ``_settle``
        logs it.)"""
        order = await self._redis(lambda: self.store.get_order(purchase.order_no), "read order")
        return order is not None and order.status == "released"

    async def _post_until_decided(self, purchase: Purchase) -> Verdict | None:
        """The endpoint's verdict; None: the order was released while its delivery was
        retried or paused, and is not posted again."""
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": purchase.order_no}
        if self.upstream_token:
            headers["Authorization"] = f"Bearer {self.upstream_token}"
        body = orjson.dumps(purchase.payload())
        attempt = 0
        while True:
            wait = 0.0
            await self.breaker.may_post()  # (paused: only one probe now and then)
            if attempt and await self._released_before_delivery(purchase):
                return None
            try:
                async with self._session.post(self.upstream_url, data=body, headers=headers,
                                              allow_redirects=False) as response:
                    answer = await response.read()
                    verdict = judge(response.status, answer, purchase.units)
                    if verdict is not None and self._decided(purchase, verdict):
                        return verdict
                    problem = f"HTTP {response.status}"
                    wait = retry_after(response.headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = repr(exc)
            attempt += 1
            self.metrics.relay_retries.inc()
            if attempt == 1 or attempt % 10 == 0:
                log.warning("relay: delivery failed, will retry",
                            extra={"order_no": purchase.order_no, "attempt": attempt,
                                   "problem": problem})
            await asyncio.sleep(max(wait, self._pause(attempt)))

    def _decided(self, purchase: Purchase, verdict: Verdict) -> bool:
        """Whether the endpoint's verdict stands (False: delivery is paused by the breaker
        and the order is posted again once it resumes)."""
        if verdict.delivered:
            self.breaker.delivered()
            return True
        if verdict.reason == "UNIT_TAKEN":
            return True  # always genuine: a unit another order holds
        return self.breaker.refused(verdict.status, purchase.order_no, verdict.misconfigured)

    def state(self) -> dict[str, Any]:
        """Delivering or paused, and why (for /healthz)."""
        return self.breaker.state()

    async def _settle(self, purchase: Purchase, verdict: Verdict) -> None:
        """Record the verdict on the order. A missing order record (the sale was deleted)
        leaves nothing to record; the entry is still acknowledged."""
        order = await self._redis(lambda: self.store.get_order(purchase.order_no), "read order")
        if verdict.delivered:
            self.metrics.relay_delivered.labels("delivered").inc()
            if order is not None:
                await self._redis(lambda: self.store.mark_delivered(order), "mark delivered")
                if order.status in ("rejected", "released"):
                    log.error("relay: the endpoint accepted an order whose units went back "
                              "to the sale meanwhile; cancel it there",
                              extra={"order_no": purchase.order_no, "status": order.status})
            return
        self.metrics.relay_delivered.labels("rejected").inc()
        log.warning("relay: purchase rejected", extra={"order_no": purchase.order_no,
                                                       "reason": verdict.reason,
                                                       "taken": list(verdict.taken)})
        if order is None:
            return
        await self._redis(lambda: self.returns.reject(order, verdict.reason, verdict.taken),
                          "compensate")

    async def _redis(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a Redis call until it succeeds: a delivery, once decided, must be recorded."""
        failures = 0
        outage = RedisOutage()
        while True:
            with outage:
                return await call()
            failures += 1
            log.warning("relay: redis failure, will retry", extra={"step": what,
                                                                    "error": repr(outage.error)})
            await asyncio.sleep(self._pause(failures))

    def _pause(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter (half fixed, half random)."""
        return self._backoff.compute(min(attempt - 1, 30))


