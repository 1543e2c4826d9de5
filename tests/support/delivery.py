"""Helpers for the delivery tests: the orders service on a local port (SQLite, or a
PostgreSQL schema of its own per test), real HTTP upstreams that fail or stall in front
of it, a relay, and fast admission of many purchases. (The fixtures are in conftest.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import asyncpg
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import Settings
from gateway.delivery.relay import Relay, RelayConfig
from gateway.models import Order
from gateway.orders.app import create_orders_app
from gateway.orders.config import OrdersConfig, ReleaseConfig
from gateway.orders.db import OrdersDb, open_orders_db
from tests.support.api import ADMIN_TOKEN

PG_URL = os.environ.get("SECKILL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


# -- databases ----------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A database URL on a fresh PostgreSQL schema; the schema is dropped afterwards."""
    try:
        admin = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") and shutil.which("pg_isready"):
            # CI on a machine with PostgreSQL must run these tests, not skip them.
            pytest.fail(f"PostgreSQL installed but not reachable at {PG_URL}: {exc!r}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc!r}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield f"{PG_URL}?search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


# -- HTTP services ------------------------------------------------------------------------

# The orders service's secrets in tests: the relay sends ORDERS_TOKEN as its bearer
# (SECKILL_UPSTREAM_TOKEN), a test playing the payment provider signs with PAYMENT_SECRET.
ORDERS_TOKEN = "test-orders-token"
PAYMENT_SECRET = "test-payment-secret"
# Quick timers: expiry and releases within a fraction of a second.
FAST_ORDERS = dict(expire_every=0.1,
                   releases=ReleaseConfig(poll_every=0.1, backoff_base=0.02, backoff_cap=0.2))


@dataclass
class OrdersService:
    server: TestServer
    db: OrdersDb
    config: OrdersConfig

    @property
    def orders_url(self) -> str:
        return str(self.server.make_url("/orders"))

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    @property
    def auth(self) -> dict[str, str]:
        """The header its callers (the relay, the shop) send."""
        return {"Authorization": f"Bearer {self.config.orders_token}"}


def orders_config(gateway_url: str | None = None, **tuning) -> OrdersConfig:
    """The test secrets; releases go to ``gateway_url`` with the tests' admin token."""
    return OrdersConfig(ORDERS_TOKEN, PAYMENT_SECRET, gateway_url=gateway_url,
                        admin_token=ADMIN_TOKEN if gateway_url else None,
                        **{**FAST_ORDERS, **tuning})


@contextlib.asynccontextmanager
async def orders_service(database_url: str, gateway_url: str | None = None,
                         **tuning) -> AsyncIterator[OrdersService]:
    """The bundled orders service on a local port (a real server), with the test
    secrets; ``tuning``: fields of ``OrdersConfig``."""
    db = open_orders_db(database_url)
    config = orders_config(gateway_url, **tuning)
    server = TestServer(create_orders_app(db, config))
    await server.start_server()
    try:
        yield OrdersService(server, db, config)
    finally:
        await server.close()


@dataclass
class Upstream:
    """A real HTTP endpoint in front of the orders service, for fault tests.

    Answers 500 to the first ``fail_first`` POSTs; stores the next ``stall_next`` but
    answers them only after ``stall_seconds`` (by then the relay has given up: stored,
    answer lost); holds POSTs from number ``hold_from`` on until ``release()``; or
    answers every POST with ``reject_with``. Handlers run on when their client goes
    away (as in production: aiohttp cancels them only in its TestServer), so a held
    request still reaches the store after the relay that sent it died.
    """

    target: str
    session: ClientSession
    fail_first: int = 0
    stall_next: int = 0
    stall_seconds: float = 0.0
    hold_from: int = 0
    reject_with: int = 0
    reject_orders: set[str] = field(default_factory=set)  # refused with 422, the others pass
    authorization: list[str] = field(default_factory=list)  # the bearer of every POST
    posts: int = 0
    held: int = 0
    answered: dict[int, int] = field(default_factory=dict)  # status -> count
    url: str = ""
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self._released.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        n = self.posts
        body = await request.read()
        self.authorization.append(request.headers.get("Authorization", ""))
        if n <= self.fail_first:
            return self._answer(500, b'{"code":"INTERNAL"}')
        if self.reject_with:
            return self._answer(self.reject_with, b'{"code":"REFUSED"}')
        if request.headers.get("Idempotency-Key") in self.reject_orders:
            return self._answer(422, b'{"code":"AMOUNT_MISMATCH"}')
        if self.hold_from and n >= self.hold_from:
            self.held += 1
            await self._released.wait()
        headers = {"Content-Type": "application/json",
                   "Idempotency-Key": request.headers.get("Idempotency-Key", ""),
                   "Authorization": request.headers.get("Authorization", "")}
        async with self.session.post(self.target, data=body, headers=headers) as response:
            status, answer = response.status, await response.read()
        if n <= self.fail_first + self.stall_next:
            await asyncio.sleep(self.stall_seconds)
        return self._answer(status, answer)

    def _answer(self, status: int, body: bytes) -> web.Response:
        self.answered[status] = self.answered.get(status, 0) + 1
        return web.Response(status=status, body=body, content_type="application/json")


@contextlib.asynccontextmanager
async def upstream(target: str, **behaviour) -> AsyncIterator[Upstream]:
    """An ``Upstream`` on a local port (an AppRunner, like ``serve_app``)."""
    async with ClientSession() as session:
        up = Upstream(target, session, **behaviour)
        app = web.Application()
        app.router.add_post("/orders", up.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        up.url = f"http://127.0.0.1:{sock.getsockname()[1]}/orders"
        try:
            yield up
        finally:
            up.release()
            await runner.cleanup()


# -- the relay and purchases ----------------------------------------------------------------

FAST = dict(claim_every=0.2, refresh_every=0.1, backoff_base=0.02, backoff_cap=0.2,
            request_timeout=5.0, drain_timeout=5.0, block_ms=500)


@contextlib.asynccontextmanager
async def running_relay(settings: Settings, upstream_url: str, **config) -> AsyncIterator[Relay]:
    """A started relay with quick timers; stopped (drained) on exit."""
    options = {**FAST, "consumer": f"test-{uuid.uuid4().hex[:6]}", **config}
    relay = Relay.from_settings(
        settings.replace(upstream_url=upstream_url,
                         upstream_token=settings.upstream_token or ORDERS_TOKEN),
        config=RelayConfig(**options))
    relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def admit(gw: Gateway, sku: str, users: Iterable[int], quantity: int = 1,
                concurrency: int = 64, key_tag: str = "") -> dict[str, tuple[int, ...]]:
    """Buy for every user through the purchase service (client key mode); order_no -> units.
    Keys are made from the user id (and ``key_tag``, to buy again). The concurrency
    stays under the Cluster client's connections per node (100, and it raises beyond)."""
    assert gw.settings.key_mode == "client"
    limit = asyncio.Semaphore(concurrency)

    async def buy(user: int) -> tuple[str, tuple[int, ...]]:
        async with limit:
            outcome = await gw.purchases.buy(user, sku, f"key-{key_tag}{user:012d}", quantity)
        assert outcome.status == 200, outcome.body
        return outcome.body["order_no"], tuple(outcome.body["units"])

    return dict(await asyncio.gather(*(buy(user) for user in users)))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    """Poll until ``check()`` holds (the timeout only guards against a hang)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def gateway_orders(gw: Gateway, order_nos: Iterable[str]) -> dict[str, Order | None]:
    order_nos = list(order_nos)
    limit = asyncio.Semaphore(64)  # within the gateway's Redis connections

    async def get(order_no: str) -> Order | None:
        async with limit:
            return await gw.store.get_order(order_no)

    return dict(zip(order_nos, await asyncio.gather(*(get(no) for no in order_nos))))


async def statuses(gw: Gateway, order_nos: Iterable[str]) -> dict[str, str]:
    return {no: (order.status if order else "missing")
            for no, order in (await gateway_orders(gw, order_nos)).items()}


async def all_delivered(gw: Gateway, order_nos: Iterable[str]) -> bool:
    return set((await statuses(gw, order_nos)).values()) == {"delivered"}


async def settled(gw: Gateway, shards: int, timeout: float = 60.0) -> None:
    """Wait until every purchase-stream entry was delivered or rejected, and recorded:
    the relay deletes an entry only after the order's status was written. (Cheap to
    poll, so the polling does not starve the relay it waits for.)"""
    async def empty() -> bool:
        return await backlog(gw, shards) == 0

    await eventually(empty, "every purchase is settled", timeout)


async def backlog(gw: Gateway, shards: int) -> int:
    """Purchase-stream entries not yet delivered (delivered ones are deleted)."""
    return sum([await gw.store.client.xlen(gw.store.keys.stream(s)) for s in range(shards)])
