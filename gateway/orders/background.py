"""The orders service's background work: expiring unpaid orders, sending releases.

Both are safe with several services on one database. Expiry is one conditional UPDATE
per batch (``pending`` -> ``expired``), so an order expires once whoever runs it. A
release is queued in the transaction that closed the order and delivered at least once:
a sender leases the rows it claims (so others leave them alone), POSTs each to the
gateway and marks it done on a 200 (or a 404: the gateway does not know the order).
Should a lease run out mid-send, two services may send one release; the gateway's
release is idempotent, so that costs a request, not a second return of the units.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp
import orjson
from redis.backoff import EqualJitterBackoff
from yarl import URL

from gateway.logs import LogThrottle
from gateway.orders.config import OrdersConfig, ReleaseConfig
from gateway.orders.db import OrdersDb, Release

log = logging.getLogger("gateway.orders")


def now_ms() -> int:
    return int(time.time() * 1000)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with equal jitter (half fixed, half random), as the
    relay's (redis-py's implementation)."""
    return float(EqualJitterBackoff(cap=cap, base=base).compute(min(attempt - 1, 30)))


class Sent(enum.Enum):
    RELEASED = "released"            # 200: the units are back in the sale
    UNKNOWN_ORDER = "unknown_order"  # 404: nothing to release there; stop trying
    RETRY = "retry"                  # anything else: try again later


class ReleaseSender:
    """Delivers the ``releases`` outbox to ``POST {gateway}/admin/orders/{no}/release``."""

    def __init__(self, db: OrdersDb, gateway_url: str, admin_token: str, config: ReleaseConfig,
                 session: aiohttp.ClientSession, wake: asyncio.Event) -> None:
        self.db = db
        self.gateway_url = gateway_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_token}"}
        self.config = config
        self.session = session
        self.wake = wake
        self._throttle = LogThrottle()

    async def run(self) -> None:
        while True:
            self.wake.clear()  # before looking: a wake-up during the look is not lost
            sent = await _guarded(self.db, "release", self.send_due, self._throttle)
            if sent is None or sent < self.config.batch:
                await _nap(self.wake, self.config.poll_every)

    async def send_due(self) -> int:
        """Claim the releases due now and send them; how many were claimed."""
        lease_ms = int(self.config.lease * 1000)
        claimed = await self.db.claim_releases(now_ms(), lease_ms, self.config.batch)
        results = await asyncio.gather(*(self._deliver(r) for r in claimed), return_exceptions=True)
        for release, result in zip(claimed, results):
            if isinstance(result, Exception) and self._throttle.allow("release-failed"):
                # The row keeps its lease, which runs out: the release is sent again.
                log.warning("a release attempt failed; retried after its lease", extra={
                    "order_no": release.order_no, "error": repr(result)})
        return len(claimed)

    async def _deliver(self, release: Release) -> None:
        sent = await self._post(release)
        if sent is Sent.RETRY:
            delay = backoff(release.attempts, self.config.backoff_base, self.config.backoff_cap)
            await self.db.postpone_release(release.order_no, now_ms() + int(delay * 1000))
            return
        if sent is Sent.UNKNOWN_ORDER:
            log.warning("the gateway does not know the order; release dropped",
                        extra={"order_no": release.order_no, "reason": release.reason})
        await self.db.finish_release(release.order_no, now_ms(), sent.value)

    def url(self, order_no: str) -> URL:
        # Encoded as we build it: yarl must not re-interpret an order_no of dots.
        path = f"/admin/orders/{quote(order_no, safe='')}/release"
        return URL(self.gateway_url + path, encoded=True)

    async def _post(self, release: Release) -> Sent:
        try:
            async with self.session.post(
                    self.url(release.order_no), json={"reason": release.reason},
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as resp:
                status = resp.status
                body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._throttle.allow("release-unreachable"):
                log.warning("gateway unreachable; releases are retried",
                            extra={"order_no": release.order_no, "error": repr(exc)})
            return Sent.RETRY
        if status == 200:
            return Sent.RELEASED
        if status == 404 and _code_of(body) == "ORDER_NOT_FOUND":
            # The gateway does not know the order. Any other 404 (no such route: a wrong
            # SECKILL_GATEWAY_URL, an old gateway) is a fault to retry, or units are lost.
            return Sent.UNKNOWN_ORDER
        if self._throttle.allow(f"release-{status}"):
            hint = " (check SECKILL_ADMIN_TOKEN)" if status in (401, 403) else ""
            log.warning(f"the gateway answered {status} to a release{hint}; retrying",
                        extra={"order_no": release.order_no, "attempts": release.attempts})
        return Sent.RETRY


def _code_of(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    return str(data.get("code", "")) if isinstance(data, dict) else ""


class Expirer:
    """Moves ``pending`` orders past their ``pay_by`` to ``expired``."""

    def __init__(self, db: OrdersDb, config: OrdersConfig, on_expired: Callable[[], None]) -> None:
        self.db = db
        self.config = config
        self.on_expired = on_expired
        self._throttle = LogThrottle()

    async def run(self) -> None:
        while True:
            await _guarded(self.db, "expiry", self.expire_due, self._throttle)
            await asyncio.sleep(self.config.expire_every)

    async def expire_due(self) -> int:
        """Expire every order due now, a batch per transaction; how many."""
        total = 0
        while True:
            expired = await self.db.expire_due(now_ms(), self.config.expire_batch)
            total += len(expired)
            if expired:
                log.info("orders expired", extra={"count": len(expired)})
                self.on_expired()
            if len(expired) < self.config.expire_batch:
                return total


class Background:
    """The expirer and the release sender of one orders app: started with it, cancelled
    when it stops (a release cut short stays queued and is sent after its lease)."""

    def __init__(self, db: OrdersDb, config: OrdersConfig) -> None:
        self.db = db
        self.config = config
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def releases_queued(self) -> None:
        """Call after committing a close: the sender looks at once, not at its next poll."""
        self.wake.set()

    async def start(self) -> None:
        expirer = Expirer(self.db, self.config, self.releases_queued)
        self._tasks.append(asyncio.create_task(expirer.run(), name="orders-expirer"))
        if not self.config.gateway_url:
            log.warning("SECKILL_GATEWAY_URL is not set: releases of expired and cancelled "
                        "orders stay queued in the database (see /healthz releases_pending)")
            return
        assert self.config.admin_token  # OrdersConfig insists
        self._session = aiohttp.ClientSession()
        sender = ReleaseSender(self.db, self.config.gateway_url, self.config.admin_token,
                               self.config.releases, self._session, self.wake)
        self._tasks.append(asyncio.create_task(sender.run(), name="orders-releases"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _guarded(db: OrdersDb, what: str, step: Callable[[], Awaitable[int]],
                   throttle: LogThrottle) -> int | None:
    """One round of a background loop; a failure is logged (not too often) and the loop
    goes on. None when the round failed."""
    try:
        return await step()
    except db.failures as exc:
        if throttle.allow(f"{what}-db"):
            log.warning(f"{what}: database unavailable; will retry", extra={"error": repr(exc)})
    except Exception:
        if throttle.allow(f"{what}-bug"):
            log.exception(f"{what}: unexpected error; will retry")
    return None


async def _nap(wake: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if woken."""
    try:
        await asyncio.wait_for(wake.wait(), seconds)
    except asyncio.TimeoutError:
        pass
