"""Seeing the gateway run: its metrics, its logs, and how it stops.

The gateway runs as it does in production: ``python -m gateway serve`` in a subprocess,
on a private Redis, spoken to over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import uuid

import jwt
import orjson
import pytest
import redis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from devtools.redis_server import LocalRedis
from gateway.app import create_app
from gateway.http.server import GatewayRunner
from gateway.store.keys import KeySpace
from tests.support.delivery import ORDERS_TOKEN, orders_service, upstream
from tests.support.services import (
    ADMIN_TOKEN,
    JWT_SECRET,
    TOKEN_SECRET,
    GatewayProcess,
    admin_headers,
    gateway_process,
    http,
    put_sale,
)

# -- helpers for the tests below ------------------------------------------------------------

def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def samples_named(samples: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


async def scrape(session: ClientSession, gw: GatewayProcess) -> dict:
    async with session.get(gw.url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return metric_samples(await resp.text())


async def wait_for(check, what: str, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(every)


@pytest.fixture
def private_redis():
    """A Redis of the test's own: these tests stop it (SIGSTOP, SIGKILL)."""
    with LocalRedis() as server:
        yield server


# -- SIGTERM --------------------------------------------------------------------------------

async def test_sigterm_drains_requests_in_flight_and_the_relay(private_redis, sqlite_url, tmp_path):
    """Requests in flight when SIGTERM arrives (held by a Redis stopped with SIGSTOP) all
    get complete answers; the process exits 0; its relay delivers and acknowledges every
    purchase before it stops (nothing left pending in the streams)."""
    n, shards = 60, 4
    async with orders_service(sqlite_url) as orders, ClientSession() as session:
        with gateway_process(private_redis.url, tmp_path / "gateway.log", SECKILL_RELAY="true",
                             SECKILL_UPSTREAM_URL=orders.orders_url, SECKILL_UPSTREAM_TOKEN=ORDERS_TOKEN,
                             SECKILL_KEY_MODE="client",
                             SECKILL_REDIS_TIMEOUT="10", SECKILL_REQUEST_TIMEOUT="15") as gw:
            sku = f"drain-{uuid.uuid4().hex[:6]}"
            await asyncio.to_thread(put_sale, gw, sku, n + 10, shards=shards)

            async def buy(user: int) -> tuple[int, dict]:
                headers = {"X-User-Id": str(user), "X-Idempotency-Key": f"drain-key-{user:08d}"}
                async with session.post(f"{gw.url}/api/seckill/{sku}", headers=headers) as resp:
                    return resp.status, await resp.json()

            assert (await buy(0))[0] == 200  # the relay has streams to read
            private_redis.pause()
            try:
                calls = [asyncio.create_task(buy(user)) for user in range(1, n + 1)]

                async def all_in_flight() -> bool:
                    in_flight = sample(await scrape(session, gw), "seckill_in_flight_requests")
                    return in_flight is not None and in_flight >= n + 1  # and this scrape
                await wait_for(all_in_flight, "every purchase is in flight")
                gw.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.5)
                with pytest.raises(ConnectionRefusedError):  # draining: no new connections
                    socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            finally:
                private_redis.resume()
            answers = await asyncio.gather(*calls)
            assert [status for status, _ in answers] == [200] * n, answers
            assert all(body["code"] == "OK" and body["units"] for _, body in answers)
            assert await asyncio.to_thread(gw.process.wait, 30) == 0, gw.output()
            # Within the bounds: 10 s for the HTTP drain (here: the Redis stall), then up
            # to 5 s for the relay to catch up.
            assert time.monotonic() - signalled < 15
        events = [orjson.loads(line)["event"] for line in gw.log_lines()]
        assert events.index("draining") < events.index("relay stopped") < events.index("stopped")
        assert "relay stopping with purchases not yet delivered" not in events
        client = redis.Redis.from_url(private_redis.url, decode_responses=True)
        try:
            streams = [KeySpace(gw.prefix).stream(s) for s in range(shards)]
            pending = [_pending(client, stream) for stream in streams]
            left = [client.xlen(stream) for stream in streams]
        finally:
            client.close()
        stored = await orders.db.list_orders(sku)
        assert pending == [0] * shards, pending
        assert left == [0] * shards and len(stored) == n + 1, (left, len(stored))


def _pending(client: redis.Redis, stream: str) -> int:
    """Entries read by a relay and not acknowledged (none when no relay read the stream)."""
    try:
        return int(client.xpending(stream, "relay")["pending"])
    except redis.ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise


# -- metrics --------------------------------------------------------------------------------

async def test_metrics_after_some_traffic(private_redis, sqlite_url, tmp_path):
    """After purchases (some moving units between shards), refusals, a Redis stall and
    deliveries through an endpoint that fails at first, every metric is there with
    values that fit what happened."""
    stock, shards, buyers, stalled = 40, 4, 25, 3
    async with orders_service(sqlite_url) as orders, upstream(orders.orders_url, fail_first=3) as up, \
            ClientSession() as session:
        with gateway_process(private_redis.url, tmp_path / "gateway.log", SECKILL_RELAY="true",
                             SECKILL_UPSTREAM_URL=up.url, SECKILL_UPSTREAM_TOKEN=ORDERS_TOKEN,
                             SECKILL_KEY_MODE="client",
                             SECKILL_REDIS_TIMEOUT="0.5") as gw:
            sku = f"m-{uuid.uuid4().hex[:6]}"
            await asyncio.to_thread(put_sale, gw, sku, stock, shards=shards)

            async def buy(user: int) -> int:
                headers = {"X-User-Id": str(user), "X-Idempotency-Key": f"metrics-key-{user:08d}"}
                async with session.post(f"{gw.url}/api/seckill/{sku}", headers=headers) as resp:
                    await resp.read()
                    return resp.status

            # Every buyer on shard 0, which starts with 10 units: units must move to it.
            statuses = await asyncio.gather(*(buy(shards * i) for i in range(buyers)))
            assert statuses == [200] * buyers
            for headers in ({}, {"X-User-Id": "-1"}):
                async with session.get(gw.url + "/api/token", headers=headers) as resp:
                    assert resp.status == 401
            async with session.get(gw.url + "/no/such/path") as resp:
                assert resp.status == 404
            # Redis stalled: reads time out (reads only: a purchase timing out may still be
            # admitted when Redis wakes up, which would blur the counts below).
            order_path = f"/api/orders/0-{'0' * 32}"
            private_redis.pause()
            try:
                async def look() -> int:
                    async with session.get(gw.url + order_path, headers={"X-User-Id": "1"}) as resp:
                        await resp.read()
                        return resp.status
                statuses = await asyncio.gather(*(look() for _ in range(stalled)))
            finally:
                private_redis.resume()
            assert statuses == [503] * stalled

            async def delivered() -> bool:
                return len(await orders.db.list_orders(sku)) == buyers
            await wait_for(delivered, "every purchase is delivered")

            async def settled() -> dict | None:
                m = await scrape(session, gw)
                return m if (sample(m, "seckill_relay_lag") == 0
                             and sample(m, "seckill_units_remaining", sku=sku) == stock - buyers) else None
            # Both gauges are updated in the background (the relay's and the sweep's rounds):
            # no admin read of the sale is needed to make them current.
            m = await wait_for(settled, "the lag and the units remaining are current", timeout=20)

            seckill = "/api/seckill/{sku}"
            assert sample(m, "seckill_requests_total", route=seckill, code="OK") == buyers
            assert sample(m, "seckill_requests_total", route="/api/orders/{order_no}",
                          code="UNAVAILABLE") == stalled
            assert sample(m, "seckill_requests_total", route="/api/token", code="UNAUTHENTICATED") == 2
            assert sample(m, "seckill_requests_total", route="unmatched", code="NOT_FOUND") == 1
            assert sample(m, "seckill_requests_total", route="/admin/sales/{sku}", code="CREATED") == 1
            count = sample(m, "seckill_request_seconds_count", route=seckill)
            assert count == buyers
            assert 0 < sample(m, "seckill_request_seconds_sum", route=seckill) < 60
            buckets = sorted((float(dict(labels)["le"]), value) for labels, value in
                             samples_named(m, "seckill_request_seconds_bucket").items()
                             if dict(labels)["route"] == seckill)
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
            assert buckets[-1] == (float("inf"), count)
            assert sum(samples_named(m, "seckill_redis_errors_total").values()) >= stalled
            batches = sample(m, "seckill_redis_batch_size_count")
            assert batches >= 1 and sample(m, "seckill_redis_batch_size_sum") >= buyers
            assert sample(m, "seckill_unit_moves_total") >= 1
            assert sample(m, "seckill_relay_retries_total") >= 3  # the endpoint's first 500s
            assert sample(m, "seckill_relay_delivered_total", result="delivered") == buyers
            assert up.answered[500] == 3
            assert sample(m, "seckill_in_flight_requests") == 1  # this scrape

            status, _, _ = await asyncio.to_thread(http, gw, "DELETE", f"/admin/sales/{sku}",
                                                   None, admin_headers())
            assert status == 204

            async def forgotten() -> bool:
                return sample(await scrape(session, gw), "seckill_units_remaining", sku=sku) is None
            await wait_for(forgotten, "a deleted sale has no units-remaining series", timeout=10)
            assert await asyncio.to_thread(gw.terminate) == 0


# -- logs -----------------------------------------------------------------------------------

TRACEBACK = re.compile(r"Traceback|File \"|\.py\b|line \d+", re.IGNORECASE)


async def test_logs_are_few_json_lines_without_secrets(private_redis, tmp_path):
    """200 requests of every kind, then Redis going away: a handful of JSON lines, none
    of them holding a secret, a token or an idempotency key; no answer shows a traceback."""
    seen: list[str] = []  # every token, key and JWT sent: none may reach the logs
    async with ClientSession() as session:
        with gateway_process(private_redis.url, tmp_path / "gateway.log", SECKILL_AUTH="jwt",
                             SECKILL_JWT_SECRET=JWT_SECRET, SECKILL_REDIS_TIMEOUT="0.3") as gw:
            sku = f"l-{uuid.uuid4().hex[:6]}"
            await asyncio.to_thread(put_sale, gw, sku, 1000, per_user_limit=1)

            def bearer(user: int) -> dict[str, str]:
                token = jwt.encode({"sub": str(user), "exp": int(time.time()) + 600}, JWT_SECRET,
                                   algorithm="HS256")
                seen.append(token)
                return {"Authorization": f"Bearer {token}"}

            async def request(method: str, path: str, headers: dict, body: bytes | None = None):
                async with session.request(method, gw.url + path, headers=headers, data=body) as resp:
                    return resp.status, await resp.read()

            statuses = []
            for user in range(60):  # a token, a purchase, a repeat of it: 180 requests
                status, body = await request("GET", "/api/token", bearer(user))
                key = orjson.loads(body)["token"]
                seen.append(key)
                for _ in range(2):
                    statuses.append((await request("POST", f"/api/seckill/{sku}",
                                                   {**bearer(user), "X-Idempotency-Key": key}))[0])
            assert statuses.count(200) == 60 and statuses.count(409) == 60
            refusals = [("GET", "/api/token", {}), ("GET", "/api/token", {"Authorization": "Bearer x.y.z"}),
                        ("POST", f"/api/seckill/{sku}", {**bearer(1), "X-Idempotency-Key": "{bad}"}),
                        ("GET", f"/admin/sales/{sku}", {"Authorization": "Bearer wrong"}),
                        ("GET", "/nope", {}), ("DELETE", "/api/token", {})]
            for i in range(20):
                method, path, headers = refusals[i % len(refusals)]
                status, body = await request(method, path, headers)
                assert 400 <= status < 500 and not TRACEBACK.search(body.decode()), body
            quiet = len(gw.log_lines())

            # Redis gone: 503s, told in the log once, not per request; no traceback to clients.
            await asyncio.to_thread(private_redis.kill)
            for user in range(100, 130):
                status, body = await request("GET", "/api/token", bearer(user))
                assert status == 200  # tokens need no Redis
                key = orjson.loads(body)["token"]
                seen.append(key)
                status, body = await request("POST", f"/api/seckill/{sku}",
                                             {**bearer(user), "X-Idempotency-Key": key})
                assert status == 503 and orjson.loads(body)["code"] == "UNAVAILABLE", body
                assert not TRACEBACK.search(body.decode()), body
            status, body = await request("GET", "/healthz", {})
            assert status == 503 and not TRACEBACK.search(body.decode())
            # A malformed request, refused by the HTTP parser: JSON too, echoing nothing.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /api/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + ADMIN_TOKEN.encode() + b"\x01\r\n\r\n")
            raw = await reader.read()
            writer.close()
            assert b" 400 " in raw.split(b"\r\n")[0] and b'"code":"BAD_REQUEST"' in raw, raw
            assert ADMIN_TOKEN.encode() not in raw and not TRACEBACK.search(raw.decode()), raw
            assert await asyncio.to_thread(gw.terminate) == 0

    lines = gw.log_lines()
    events = [orjson.loads(line) for line in lines]  # every line is one JSON object
    for event in events:
        assert {"ts", "level", "event"} <= set(event), event
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["ts"]), event
        assert event["level"] in ("debug", "info", "warning", "error", "critical"), event
    assert quiet <= 3, lines  # listening (and the like): nothing per request
    assert len(lines) <= quiet + 10, lines  # the outage: a few lines, not one per request
    assert [e["event"] for e in events if e["logger"] == "gateway.server"] == ["listening", "draining",
                                                                               "stopped"]
    output = gw.output()
    for secret in (ADMIN_TOKEN, JWT_SECRET, TOKEN_SECRET, *seen):
        assert secret not in output, secret
    # Nor parts of a token (a JWT's signature, a token's uuid) that a log might cut out.
    for token in seen:
        for part in token.split("."):
            if len(part) >= 16:
                assert part not in output, part


async def test_an_unhandled_error_is_a_json_500_without_the_traceback(standalone, caplog):
    """A bug in a handler: the client gets a bare JSON 500; the traceback goes to the log."""
    app = create_app(standalone.settings())

    async def broken(request):
        raise RuntimeError("secret internals: /srv/app/gateway.py line 42")

    app.router.add_get("/broken", broken)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/broken")
        body = await resp.text()
    assert resp.status == 500 and orjson.loads(body) == {"code": "INTERNAL", "message": "internal error"}
    assert "secret internals" not in body and not TRACEBACK.search(body)
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].exc_info is not None


# -- several workers --------------------------------------------------------------------------

async def test_two_workers_share_one_port_and_stop_on_sigterm(standalone_redis, tmp_path):
    with gateway_process(standalone_redis.url, tmp_path / "gateway.log", workers=2) as gw:
        async def listening() -> list[int]:
            pids = [orjson.loads(line)["pid"] for line in gw.log_lines() if '"listening"' in line]
            return pids if len(pids) == 2 else []
        pids = await wait_for(listening, "both workers listen")
        assert len(set(pids)) == 2 and gw.process.pid not in pids

        hits = 40
        for _ in range(hits):  # a connection each: the kernel spreads them over the workers
            async with ClientSession() as session, \
                    session.get(gw.url + "/api/token", headers={"X-User-Id": "7"}) as resp:
                assert resp.status == 200
        counts: dict[int, float | None] = {}
        for _ in range(60):
            async with ClientSession() as session:
                metrics = await scrape(session, gw)
            (worker,), = [labels for labels in samples_named(metrics, "seckill_worker")]
            counts[int(worker[1])] = sample(metrics, "seckill_requests_total",
                                            route="/api/token", code="OK")
            if len(counts) == 2:
                break
        # Each worker counts its own requests: two counts that add up to all of them.
        assert set(counts) == set(pids) and all(counts.values()) and sum(counts.values()) == hits, counts

        assert await asyncio.to_thread(gw.terminate) == 0
        stopped = [orjson.loads(line)["pid"] for line in gw.log_lines() if '"stopped"' in line]
        assert sorted(stopped) == sorted(pids)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def test_errors_outside_the_app_are_json_without_the_traceback(caplog):
    """What aiohttp itself answers on a connection of ``serve_app``'s runner (an error that
    escapes the app, a request the parser refuses): JSON with a code, no traceback, no
    request bytes echoed."""
    app = web.Application()  # no guard middleware: the error reaches aiohttp

    async def broken(request):
        raise RuntimeError("secret internals")

    app.router.add_get("/broken", broken)
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    try:
        for request in (b"GET /broken HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n",
                        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Secret: s3cr3t\x01\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head, _, body = (await reader.read()).partition(b"\r\n\r\n")
            writer.close()
            assert b"Content-Type: application/json" in head, head
            data = orjson.loads(body)
            assert data["code"] in ("INTERNAL", "BAD_REQUEST"), data
            assert not TRACEBACK.search(body.decode()) and b"secret" not in body.lower(), body
    finally:
        await runner.cleanup()
    assert any(r.exc_info for r in caplog.records if r.getMessage() == "error handling request")
