"""A cold start: the first moment a fresh gateway says it is healthy, a flash sale's
first second arrives (3,000 purchases and 900 token requests at once) at a process that
has never read the sale nor the token secret. Every buyer gets an outcome of a purchase
(200, or 410 once the units are gone), never a 503; and the burst costs Redis a handful
of new connections, not one per request (redis-py's Cluster client opens a connection
per concurrent command: a read per request, all at once, meant thousands)."""

from __future__ import annotations

from collections import Counter

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from tests.support.api import Backend, new_sku, serve
from tests.support.burst import ConnectionCount, burst, burst_session, first_healthy, open_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUYERS = 3000
TOKEN_REQUESTS = 900
STOCK = 2000
SHARDS = 16
# New Redis connections the burst may cost the fresh process (its start-up work is done
# once /healthz says 200; what is left is a few connections of background work).
MAX_NEW_CONNECTIONS = 50


async def test_a_burst_at_the_first_healthy_moment_gets_no_503(backend: Backend) -> None:
    settings = backend.settings()
    sku = new_sku()
    first_user = 7_000_000
    buyers = range(first_user, first_user + BUYERS)
    # Another process made the sale and handed out the buyers' tokens (signed with the
    # deployment's secret, kept in Redis); then it went away.
    async with serve(settings) as other:
        await other.create_sale(sku, STOCK, shards=SHARDS)
        issuer = await other.gateway.token_issuer()
        keys = {user: issuer.issue(user) for user in buyers}
    token_users = range(first_user + BUYERS, first_user + BUYERS + TOKEN_REQUESTS)

    count = ConnectionCount(backend.server)  # type: ignore[arg-type]
    with open_files(4 * (BUYERS + TOKEN_REQUESTS)):
        server = TestServer(create_app(settings))
        await server.start_server()
        try:
            base = str(server.make_url("")).rstrip("/")
            async with burst_session() as session:
                await first_healthy(session, base, pause=0.001)
                before = await count.read()
                outcome = await burst(session, base, sku, keys, token_users)
                after = await count.read()
        finally:
            await server.close()
            count.close()

    bought = Counter({k: n for k, n in outcome.items() if k.startswith("buy ")})
    tokens = Counter({k: n for k, n in outcome.items() if k.startswith("token ")})
    print(f"\n{backend.mode}: {dict(outcome)}; new Redis connections: {after - before}")
    assert set(bought) <= {"buy 200 OK", "buy 410 SOLD_OUT"}, outcome
    assert bought["buy 200 OK"] == STOCK, outcome
    assert tokens == Counter({"token 200 OK": TOKEN_REQUESTS}), outcome
    assert after - before < MAX_NEW_CONNECTIONS, (after - before, outcome)
