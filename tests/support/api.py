"""The gateway as a test (or a user) calls it: over HTTP, on a real Redis."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Gateway, create_app
from gateway.config import Settings
from gateway.http.context import GATEWAY

ADMIN_TOKEN = "test-admin-token"


@dataclass(frozen=True)
class Backend:
    """A Redis deployment the tests run on: standalone or Cluster."""

    mode: str
    url: str
    server: object  # LocalRedis or LocalCluster, for fault tests

    def settings(self, **overrides: object) -> Settings:
        base = Settings(
            redis_url=self.url,
            redis_mode=self.mode,
            key_prefix=f"t{uuid.uuid4().hex[:10]}",  # each test its own keys
            admin_token=ADMIN_TOKEN,
            relay=False,
        )
        return base.replace(**overrides)


class Api:
    """A thin client for the gateway's HTTP API."""

    def __init__(self, client: TestClient, app: web.Application) -> None:
        self.client = client
        self.app = app

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def create_sale(self, sku: str, stock: int, *, shards: int | None = None,
                          per_user_limit: int = 1, price: int = 0, expect: int = 201,
                          **extra: object) -> dict:
        body: dict = {"stock": stock, "per_user_limit": per_user_limit, "price": price, **extra}
        if shards is not None:
            body["shards"] = shards
        resp = await self.client.put(f"/admin/sales/{sku}", json=body, headers=self.admin)
        data = await resp.json()
        assert resp.status == expect, data
        return data

    async def sale(self, sku: str) -> dict:
        resp = await self.client.get(f"/admin/sales/{sku}", headers=self.admin)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def token(self, user_id: int) -> str:
        resp = await self.client.get("/api/token", headers={"X-User-Id": str(user_id)})
        data = await resp.json()
        assert resp.status == 200, data
        return data["token"]

    async def buy(self, sku: str, user_id: int | None, key: str | None, quantity: int | None = None,
                  *, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
        hdrs = {} if user_id is None else {"X-User-Id": str(user_id)}
        if key is not None:
            hdrs["X-Idempotency-Key"] = key
        hdrs.update(headers or {})
        if body is None and quantity is not None:
            body = b'{"quantity": %d}' % quantity
        resp = await self.client.post(f"/api/seckill/{sku}", data=body, headers=hdrs)
        return resp.status, await resp.json(), dict(resp.headers)

    async def buy_with_token(self, sku: str, user_id: int, quantity: int | None = None
                             ) -> tuple[int, dict, dict]:
        return await self.buy(sku, user_id, await self.token(user_id), quantity)

    async def fast_path_answers(self) -> float:
        """Purchases this process answered 410 from memory (its ``/metrics``)."""
        text = await (await self.client.get("/metrics")).text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('seckill_fast_path_answers_total{path="sold_out"}'))


@contextlib.asynccontextmanager
async def serve(settings: Settings, port: int | None = None) -> AsyncIterator[Api]:
    """The gateway app on a local port (a free one unless ``port``), and a client for it."""
    app = create_app(settings)
    async with TestClient(TestServer(app, port=port)) as client:
        yield Api(client, app)


def new_sku() -> str:
    return f"sku-{uuid.uuid4().hex[:8]}"
