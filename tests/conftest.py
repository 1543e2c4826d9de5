"""Test fixtures: real Redis (a private standalone server and a private local Cluster,
both started for the session) and the gateway app served on a local port.

Every behavioural test that takes ``backend`` runs twice: on standalone Redis and on
Redis Cluster. Each test gets its own key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import Phase, settings as hypothesis_settings
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import Settings
from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis
from gateway.app import Gateway
from gateway.http.context import GATEWAY

# In CI a failing property is reported at once (with a blob to reproduce it), not after
# minutes of shrinking against a real Redis.
hypothesis_settings.register_profile(
    "ci", phases=[Phase.explicit, Phase.reuse, Phase.generate], print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

ADMIN_TOKEN = "test-admin-token"
BACKENDS = ["standalone", "cluster"]


@dataclass(frozen=True)
class Backend:
    mode: str
    url: str
    server: object  # LocalRedis or LocalCluster, for fault tests

    def settings(self, **overrides) -> Settings:
        base = Settings(
            redis_url=self.url,
            redis_mode=self.mode,
            key_prefix=f"t{uuid.uuid4().hex[:10]}",
            admin_token=ADMIN_TOKEN,
            relay=False,
        )
        return base.replace(**overrides)


@pytest.fixture(scope="session")
def standalone_redis():
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def local_cluster():
    if os.environ.get("SECKILL_SKIP_CLUSTER") == "1":
        pytest.skip("SECKILL_SKIP_CLUSTER=1")
    with LocalCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    if request.param == "cluster":
        cluster = request.getfixturevalue("local_cluster")
        return Backend("cluster", cluster.url, cluster)
    server = request.getfixturevalue("standalone_redis")
    return Backend("standalone", server.url, server)


@pytest.fixture
def settings(backend: Backend) -> Settings:
    return backend.settings()


class Api:
    """A thin client for the gateway's HTTP API, as a test (or a user) calls it."""

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
                          per_user_limit: int = 1, price: int = 0, expect: int = 201) -> dict:
        body: dict = {"stock": stock, "per_user_limit": per_user_limit, "price": price}
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

    async def buy_with_token(self, sku: str, user_id: int, quantity: int | None = None):
        return await self.buy(sku, user_id, await self.token(user_id), quantity)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Api]:
    """The gateway app on a free local port, and a client for it."""
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, app)


@pytest_asyncio.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serve(settings) as api:
        yield api


def new_sku() -> str:
    return f"sku-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sku() -> str:
    return new_sku()
