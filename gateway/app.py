"""Assembles the gateway: its parts (owned by the app object, no globals), its routes
and its background work.

    http/        what clients and operators call (routes, middleware, server)
    admission/   deciding purchases: tokens, sales, the purchase path, unit moves, sold out
    store/       Redis: keys, scripts and their owners, the batching transport
    delivery/    the relay that delivers admitted purchases to the seckill endpoint
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

from gateway.admission.admitter import Admitter
from gateway.admission.moves import Rebalancer
from gateway.admission.purchase import PurchaseService
from gateway.admission.queue_signing import QueueSigner
from gateway.admission.returns import Returns
from gateway.admission.room_state import RoomState
from gateway.admission.sales import SaleCache
from gateway.admission.snapshot import read_sale
from gateway.admission.soldout import SoldOut
from gateway.admission.tokens import TokenIssuer
from gateway.admission.waiting_room import WaitingRoom
from gateway.aio import SingleFlight, cancel_and_wait
from gateway.config import Settings
from gateway.delivery.relay import Relay, RelayConfig
from gateway.http.admin import sale_settings
from gateway.http.auth import Authenticator
from gateway.http.context import GATEWAY
from gateway.http.middleware import GUARD, guard, guard_state
from gateway.http.openapi import build as build_openapi
from gateway.http.ratelimit import RateLimiter
from gateway.http.routes import add_routes
from gateway.logs import LogThrottle
from gateway.metrics import Metrics
from gateway.models import Order, Sale
from gateway.store.connection import RedisClient, RedisOutage, connect, is_redis_failure
from gateway.store.keys import KeySpace
from gateway.store.scripts import purchase as purchase_script
from gateway.store.scripts import queue as queue_script
from gateway.store.store import Store
from gateway.store.transport import Batcher, make_batcher

log = logging.getLogger("gateway")

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Gateway:
    """Everything a request needs."""

    settings: Settings
    store: Store
    metrics: Metrics
    sales: SaleCache
    sold_out: SoldOut
    returns: Returns
    rebalancer: Rebalancer
    purchases: PurchaseService
    auth: Authenticator
    user_limiter: RateLimiter
    ip_limiter: RateLimiter
    openapi_json: bytes
    room: WaitingRoom = None  # type: ignore[assignment]  # set by build
    admitter: Admitter = None  # type: ignore[assignment]  # set by build
    in_flight: int = 0
    log_throttle: LogThrottle = field(default_factory=LogThrottle)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    relay: Relay | None = None
    relay_consumer: str | None = None
    _issuer: TokenIssuer | None = None
    _queue_signer: QueueSigner | None = None
    _issuer_loading: SingleFlight[None, TokenIssuer] = field(default_factory=SingleFlight)
    _started: asyncio.Event = field(default_factory=asyncio.Event)  # the start-up work is done
    _gauged: set[str] = field(default_factory=set)  # SKUs with a units_remaining series
    _admin_work: set[asyncio.Task[Any]] = field(default_factory=set)  # creations, deletions

    @classmethod
    def build(cls, settings: Settings, client: RedisClient | None = None) -> Gateway:
        client = client or connect(settings)
        metrics = Metrics()
        warn = _Throttled(log, "purchases answered without a replica acknowledgement: "
                               "a primary has no replica (GET /healthz names it)")

        def unprotected(count: int) -> None:
            metrics.unprotected.inc(count)
            warn()

        batcher = make_batcher(client, settings, on_batch=metrics.batch_size.observe,
                               must_replicate=_must_replicate, replicated=_needs_replicas,
                               on_unprotected=unprotected)
        store = Store(client, KeySpace(settings.key_prefix), outcome_ttl=settings.idempotency_ttl,
                      batcher=batcher)
        sales = SaleCache(store)
        sold_out = SoldOut(store)
        rebalancer = Rebalancer(store, on_move=metrics.moves.inc)
        gw = cls(settings=settings, store=store, metrics=metrics, sales=sales, sold_out=sold_out,
                 returns=Returns(store, sold_out), rebalancer=rebalancer, purchases=None,  # type: ignore[arg-type]  # set below
                 auth=Authenticator(settings.auth, settings.jwt_secret, settings.admin_token),
                 user_limiter=RateLimiter(settings.rate_limit_user),
                 ip_limiter=RateLimiter(settings.rate_limit_ip),
                 openapi_json=orjson.dumps(build_openapi()))
        fast = {path: metrics.fast_answers.labels(path) for path in ("window", "sold_out")}
        gw.purchases = PurchaseService(settings, store, sales, sold_out, rebalancer, gw.token_issuer,
                                       on_fast_answer=lambda path: fast[path].inc(),
                                       queue_signer=gw.queue_signer)
        gw.room = WaitingRoom(store, sales, sold_out, gw.queue_signer, settings.queue_pass_ttl)
        gw.admitter = Admitter(store, sold_out, gw.room)
        return gw

    async def token_issuer(self) -> TokenIssuer:
        """Tokens are signed with SECKILL_TOKEN_SECRET, or else with a secret kept in
        Redis so that every worker and every restart agrees on it. Read once, at start
        (:meth:`start_up`); until it is known, the callers that need it share one read
        (a failed read fails them all, and the next caller reads again)."""
        if self._issuer is not None:
            return self._issuer
        return await self._issuer_loading.run(None, self._load_issuer)

    async def _load_issuer(self) -> TokenIssuer:
        secret = self.settings.token_secret or await self.store.token_secret(secrets.token_hex(32))
        self._issuer = TokenIssuer(secret.encode(), self.settings.idempotency_ttl)
        return self._issuer

    async def queue_signer(self) -> QueueSigner:
        """Waiting-room tickets and passes, signed with keys derived from the token secret."""
        if self._queue_signer is None:
            issuer = await self.token_issuer()
            self._queue_signer = QueueSigner(issuer.secret, self.settings.queue_pass_ttl)
        return self._queue_signer

    async def start_up(self, pause: float = 0.05, max_pause: float = 1.0) -> None:
        """What a process does once before it calls itself healthy (``started``): learn
        the topology and connect (the batcher: every node), load the scripts, read the
        token secret. Without it, a crowd arriving at the first healthy moment would do
        each of these in every request at once. Tried again until Redis answers."""
        outage = RedisOutage()
        while True:
            try:
                with outage:
                    await self.store.ping()  # the client's topology, on a Cluster
                    if isinstance(self.store.batcher, Batcher):
                        await self.store.batcher.warm()
                    await self.store.load_scripts()
                    await self.token_issuer()
            except Exception:
                log.exception("start-up failed: /healthz answers 503 until a restart")
                raise
            if outage.error is None:
                break
            if self.log_throttle.allow("start-up"):
                log.warning("start-up: Redis does not answer; trying again",
                            extra={"error": repr(outage.error)})
            await asyncio.sleep(pause)
            pause = min(pause * 2, max_pause)
        self._started.set()
        log.info("started")

    async def started(self, timeout: float) -> bool:
        """True once the start-up work is done; waits for it up to ``timeout`` seconds."""
        if not self._started.is_set():
            try:
                await asyncio.wait_for(self._started.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    def forget_sale(self, sku: str) -> None:
        """The sale was created or deleted here: drop what this process remembers of it."""
        self.sales.forget(sku)
        self.sold_out.forget(sku)
        self.room.forget(sku)

    async def create_sale(self, sale: Sale) -> Sale | None:
        """Create the sale (False: the SKU is taken). The creation runs to its end even
        if the request that asked for it is cancelled (its deadline, its client gone):
        a sale is never left half made by a timeout (a crash is finished by the next PUT)."""
        created: Sale | None = await self._run_to_end(self.store.create_sale(sale))
        self.forget_sale(sale.sku)
        return created

    async def delete_sale(self, sku: str) -> bool:
        """Delete the sale, also one half made or half deleted; False: no such SKU."""
        found = await self.store.sale_record(sku)
        if found is None:
            return False
        await self._run_to_end(self.store.delete_sale(found[0]))
        self.forget_sale(sku)
        return True

    async def _run_to_end(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(work)
        self._admin_work.add(task)
        task.add_done_callback(self._admin_work.discard)
        return await asyncio.shield(task)

    def health(self) -> dict[str, Any]:
        """What is degraded while Redis answers (for /healthz)."""
        batcher = self.store.batcher
        degraded = batcher.degraded() if isinstance(batcher, Batcher) else []
        report: dict[str, Any] = {"degraded": degraded}
        if self.relay is not None:
            report["delivery"] = self.relay.state()
        return report

    async def release_order(self, order_no: str, reason: str) -> Order | None:
        """Give an order's units back (``expired`` or ``cancelled``); the order as it is
        then (``released``; or what it was if it was settled otherwise already)."""
        order = await self.store.get_order(order_no)
        if order is None:
            return None
        await self.returns.release(order, reason)
        return await self.store.get_order(order_no)

    async def sale_status(self, sku: str) -> dict[str, Any] | None:
        found = await self.store.sale_record(sku)
        if found is None:
            return None
        sale, state = found
        snap = await read_sale(self.store, sale)
        self.metrics.units_remaining.labels(sku).set(snap.remaining)
        settings = sale_settings(sale)
        if sale.admit_rate:
            settings["waiting_room"] = {**settings["waiting_room"], **await self._room_counts(sale)}
        return {
            **settings, "state": state, "sold": snap.sold, "remaining": snap.remaining,
            "released": snap.released, "in_transfer": snap.in_transfer, "sold_out": snap.sold_out,
            "shards": [{"shard": s.shard, "remaining": s.remaining, "sold": s.sold,
                        "transfers_out": len(s.transfers_out)} for s in snap.states],
        }

    async def _room_counts(self, sale: Sale) -> dict[str, Any]:
        """The waiting room's counts: tickets joined, admitted, waiting; and the clock of
        its rate's bucket (Redis's: when it started, when it last filled)."""
        joined = sum(await self.store.queue_lengths(sale))
        room = RoomState.parse(await self.store.queue_state(sale.sku), sale.generation)
        return {"joined": joined, "admitted": room.admitted,
                "waiting": max(0, joined - room.admitted), "sold_out": room.sold_out,
                "units_left": room.units_left, "rate_since_ms": room.since_ms,
                "rate_at_ms": room.last_ms}

    def start_background(self) -> None:
        self.tasks.append(asyncio.create_task(self.start_up(), name="start-up"))
        self.tasks.append(asyncio.create_task(
            self.rebalancer.sweep_forever(observe=self._show_remaining), name="transfer-sweep"))
        self.tasks.append(asyncio.create_task(
            self.sold_out.watch_forever(self.sales.cached), name="sold-out-watch"))
        self.tasks.append(asyncio.create_task(self.admitter.run_forever(), name="admitter"))
        if self.settings.relay and self.settings.upstream_url:
            overrides = {"consumer": self.relay_consumer} if self.relay_consumer else {}
            self.relay = Relay.from_settings(
                self.settings, self.metrics, RelayConfig.from_settings(self.settings, **overrides))
            self.relay.start()

    def _show_remaining(self, remaining: dict[str, int]) -> None:
        gauge = self.metrics.units_remaining
        for sku, units in remaining.items():
            gauge.labels(sku).set(units)
        for sku in self._gauged - remaining.keys():  # deleted sales: no stale series
            gauge.remove(sku)
        self._gauged = set(remaining)

    async def close(self, relay_drain: float = 5.0) -> None:
        """Stop background work (the app's cleanup: the HTTP server has drained by now)."""
        if self.relay is not None:
            await self._let_relay_catch_up(relay_drain)
            await self.relay.stop()  # drains: in-flight deliveries finish and acknowledge
            self.relay = None
        if self._admin_work:  # let sales being created or deleted be whole
            await asyncio.wait(list(self._admin_work), timeout=10.0)
        await cancel_and_wait(self.tasks)
        await self.rebalancer.aclose()
        await self.sold_out.aclose()
        if self.store.batcher is not None:
            await self.store.batcher.aclose()  # type: ignore[attr-defined]
        await self.store.close()

    async def _let_relay_catch_up(self, timeout: float) -> None:
        """Before the relay stops, let it deliver what was admitted, for up to ``timeout``
        seconds. No purchase reaches this gateway any more, so the streams empty out
        unless the endpoint is down. Stopping at once would leave entries to the next
        relay (those it had read but not acknowledged only after its claim timeout) and
        may cancel a read whose entries Redis has already handed over."""
        assert self.relay is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        streams = self.relay.streams
        left = -1
        while True:
            try:
                shards = await self.store.relay_shards()
                left = await streams.backlog([self.store.keys.stream(s) for s in range(shards)])
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
            if left == 0:
                return
            if loop.time() >= deadline:
                log.warning("relay stopping with purchases not yet delivered",
                            extra={"backlog": left})
                return
            await asyncio.sleep(0.05)


def _must_replicate(sha: str, raw: Any) -> bool:
    """Replies held until a replica has the write: admitted purchases, queue places and
    admission cursors."""
    return purchase_script.admits(sha, raw) or queue_script.must_replicate(sha, raw)


def _needs_replicas(sha: str) -> bool:
    return purchase_script.needs_replicas(sha) or queue_script.needs_replicas(sha)


class _Throttled:
    """A warning logged at most once per ``every`` seconds."""

    def __init__(self, logger: logging.Logger, message: str, every: float = 10.0) -> None:
        self.logger, self.message = logger, message
        self.throttle = LogThrottle(every)

    def __call__(self) -> None:
        if self.throttle.allow(self.message):
            self.logger.warning(self.message)


def create_app(settings: Settings, client: RedisClient | None = None, *,
               relay_consumer: str | None = None) -> web.Application:
    """``relay_consumer``: the in-process relay's consumer name (default: host and pid)."""
    app = web.Application(middlewares=[guard], client_max_size=settings.max_body_bytes)
    gateway = Gateway.build(settings, client)
    gateway.relay_consumer = relay_consumer
    app[GATEWAY] = gateway
    app[GUARD] = guard_state(gateway)
    # Read at scrape time: nothing to keep in step on the request path.
    gateway.metrics.in_flight.set_function(lambda: gateway.in_flight)
    add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        gateway.start_background()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifecycle)
    return app
