"""Fixtures: real Redis (a private standalone server and a private 3+3 local Cluster,
both started once per session), real databases (SQLite, and PostgreSQL on a schema of
its own per test), and the gateway app served on a local port.

Every test that takes ``backend`` runs twice: on standalone Redis and on Redis Cluster;
a test that uses the cluster carries the ``cluster`` marker (``-m "not cluster"`` skips
them all). Each test gets its own key prefix, so tests never see each other's keys. In
CI (``CI`` set) a skipped test fails the run: everything must run there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from aiohttp import ClientSession
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings

from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis
from gateway.config import Settings
from tests.support.api import Api, Backend, new_sku, serve
from tests.support.delivery import orders_service, postgres_schema
from tests.support.faults import Proxied, proxied_cluster, proxied_standalone
from tests.support.orders import Client

# In CI a failing property is reported at once (with a blob to reproduce it), not after
# minutes of shrinking against a real Redis.
hypothesis_settings.register_profile(
    "ci", phases=[Phase.explicit, Phase.reuse, Phase.generate], print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


# -- Redis ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def standalone_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1) as cluster:
        yield cluster


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        yield Backend("cluster", cluster.url, cluster)
        # A fault test may have paused or killed nodes: the next test gets a whole cluster.
        for node in cluster.nodes:
            if node.paused:
                cluster.resume(node)
            elif not node.running:
                cluster.restart(node)
        cluster.wait_until_healthy()
        return
    server: LocalRedis = request.getfixturevalue("standalone_redis")
    yield Backend("standalone", server.url, server)
    server.resume()


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    """Redis (standalone, then Cluster) behind fault-injecting proxies."""
    if request.param == "cluster":
        with proxied_cluster(request.getfixturevalue("local_cluster")) as through:
            yield through
    else:
        with proxied_standalone(request.getfixturevalue("standalone_redis")) as through:
            yield through


@pytest.fixture
def standalone(standalone_redis: LocalRedis) -> Backend:
    """Standalone Redis only, for tests whose subject is not the Redis topology."""
    return Backend("standalone", standalone_redis.url, standalone_redis)


@pytest.fixture
def settings(backend: Backend) -> Settings:
    return backend.settings()


@pytest_asyncio.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serve(settings) as api:
        yield api


@pytest.fixture
def sku() -> str:
    return new_sku()


# -- databases --------------------------------------------------------------------------------

@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    """The orders store's URL, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/orders.db"
        return
    async with postgres_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/orders.db"


# -- markers and CI ---------------------------------------------------------------------------

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the cluster is a cluster test, however it gets there."""
    for item in items:
        if "local_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"CI: {len(_skipped)} test(s) skipped; everything must run "
                                f"in CI: {', '.join(_skipped[:10])}", red=True)


@pytest_asyncio.fixture
async def orders_client(database_url: str) -> AsyncIterator[Client]:
    """The bundled orders service on a local port, on SQLite and PostgreSQL."""
    async with orders_service(database_url) as service, ClientSession() as session:
        yield Client(service, session)
