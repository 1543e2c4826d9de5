"""The gateway's state: everything a request needs, owned by the app (no globals)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from .aio import cancel_and_wait
from .auth import Authenticator
from .config import Settings
from .keys import KeySpace
from .logs import LogThrottle
from .openapi import build as build_openapi
from .ratelimit import RateLimiter
from .metrics import Metrics
from .purchase import PurchaseService
from .rebalance import Rebalancer, transfers_of
from .redis_conn import RedisClient, connect, is_redis_failure, make_batcher
from .relay import Relay
from .sales import SaleCache
from .store import Store
from .tokens import TokenIssuer

log = logging.getLogger("gateway")


@dataclass(slots=True)
class Gateway:
    settings: Settings
    store: Store
    sales: SaleCache
    rebalancer: Rebalancer
    purchases: PurchaseService
    auth: Authenticator
    metrics: Metrics
    tasks: list[asyncio.Task] = field(default_factory=list)
    in_flight: int = 0
    log_throttle: LogThrottle = field(default_factory=LogThrottle)
    user_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    ip_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    openapi_json: bytes = b""
    _issuer: TokenIssuer | None = None
    relay: Relay | None = None

    @classmethod
    def build(cls, settings: Settings, client: RedisClient | None = None) -> "Gateway":
        client = client or connect(settings)
        metrics = Metrics()
        store = Store(client, KeySpace(settings.key_prefix), outcome_ttl=settings.idempotency_ttl,
                      batcher=make_batcher(client, settings, metrics.batch_size.observe))
        sales = SaleCache(store)
        rebalancer = Rebalancer(store)
        auth = Authenticator(settings.auth, settings.jwt_secret, settings.admin_token)
        gw = cls(settings, store, sales, rebalancer, None, auth, metrics)  # type: ignore[arg-type]
        gw.purchases = PurchaseService(settings, store, sales, rebalancer, gw.token_issuer)
        rebalancer.on_move = gw.metrics.moves.inc
        gw.user_limiter = RateLimiter(settings.rate_limit_user)
        gw.ip_limiter = RateLimiter(settings.rate_limit_ip)
        gw.openapi_json = orjson.dumps(build_openapi())
        return gw

    async def token_issuer(self) -> TokenIssuer:
        """Tokens are signed with SECKILL_TOKEN_SECRET, or else with a secret kept in
        Redis so that every worker and every restart agrees on it."""
        if self._issuer is None:
            secret = self.settings.token_secret or await self.store.token_secret(secrets.token_hex(32))
            self._issuer = TokenIssuer(secret.encode(), self.settings.idempotency_ttl)
        return self._issuer

    async def sale_status(self, sku: str) -> dict | None:
        sale = await self.store.get_sale(sku)
        if sale is None:
            return None
        states = await self.store.shard_states(sale)
        for _ in range(5):
            # Which transfer records the receivers applied is read apart from the
            # shards; a move step landing in between would count its units twice or
            # not at all. Read the shards again: unchanged, the three reads agree.
            pending = [t for state in states for t in transfers_of(state)]
            by_receiver: dict[int, list[str]] = {}
            for transfer in pending:
                by_receiver.setdefault(transfer.receiver, []).append(transfer.transfer_id)
            applied = await self.store.applied_transfers(sale, by_receiver)
            again = await self.store.shard_states(sale)
            unchanged = all(a.version == b.version and a.transfers_out == b.transfers_out
                            for a, b in zip(states, again))
            states = again
            if unchanged:
                break
        in_transfer = sum(t.count for t in pending if t.transfer_id not in applied)
        remaining = sum(s.remaining for s in states)
        sold = sum(s.sold for s in states)
        self.metrics.units_remaining.labels(sku).set(remaining)
        return {
            "sku": sku, "stock": sale.stock, "sold": sold, "remaining": remaining,
            "in_transfer": in_transfer, "price": sale.price, "per_user_limit": sale.per_user_limit,
            "sold_out": remaining == 0 and in_transfer == 0,
            "shards": [{"shard": s.shard, "remaining": s.remaining, "sold": s.sold,
                        "transfers_out": len(s.transfers_out)} for s in states],
        }

    def start_background(self) -> None:
        self.tasks.append(asyncio.create_task(self._sweep_forever(), name="transfer-sweep"))
        if self.settings.relay and self.settings.upstream_url:
            self.relay = Relay.from_settings(self.settings, self.metrics)
            self.relay.start()

    async def _sweep_forever(self, every: float = 2.0, older_than_ms: int = 5000) -> None:
        """Finish unit moves that a crashed process left half-done, and keep the
        ``seckill_units_remaining`` gauge current from the same read of the shards."""
        gauge = self.metrics.units_remaining
        shown: set[str] = set()
        while True:
            await asyncio.sleep(every)
            try:
                listed = set()
                for sku in await self.store.list_sales():
                    sale = await self.store.get_sale(sku)
                    if sale is None:
                        continue
                    listed.add(sku)
                    states = await self.store.shard_states(sale)
                    gauge.labels(sku).set(sum(s.remaining for s in states))
                    now_ms = int(time.time() * 1000)
                    stale = [t for s in states for t in transfers_of(s)
                             if now_ms - t.started_ms >= older_than_ms]
                    if stale:
                        await self.rebalancer.finish(sale, stale)
                for sku in shown - listed:  # deleted sales: no stale series
                    gauge.remove(sku)
                shown = listed
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                continue

    async def close(self, relay_drain: float = 5.0) -> None:
        """Stop background work (the app's cleanup: the HTTP server has drained by now)."""
        if self.relay is not None:
            await self._let_relay_catch_up(relay_drain)
            await self.relay.stop()  # drains: in-flight deliveries finish and acknowledge
            self.relay = None
        await cancel_and_wait(self.tasks)
        if self.store.batcher is not None:
            await self.store.batcher.aclose()
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
                shards = await streams.shard_count(await self.store.list_sales())
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


GATEWAY = web.AppKey("gateway", Gateway)
