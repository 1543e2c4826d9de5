"""``seckill-gateway relay`` as a process of its own: it delivers, serves ``/metrics`` and
``/healthz`` on its own port, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import free_port
from tests.support.api import serve
from tests.support.delivery import ORDERS_TOKEN, admit, all_delivered, eventually, orders_service
from tests.support.services import Service, gateway_env

pytestmark = pytest.mark.timeout(120)


def relay_process(redis_url: str, prefix: str, upstream_url: str, log: Path,
                  metrics_port: int) -> Service:
    env = gateway_env(redis_url=redis_url, redis_mode="standalone", key_prefix=prefix,
                      upstream_url=upstream_url, database_url="sqlite:///unused.db",
                      upstream_token=ORDERS_TOKEN)
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "gateway", "relay", "--consumer", f"relay-{uuid.uuid4().hex[:6]}",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)]
    return Service("relay", argv, log, env=env, cwd=log.parent, port=metrics_port, healthy_only=True)


async def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_the_relay_process_delivers_serves_metrics_and_stops_on_sigterm(standalone, sqlite_url,
                                                                             tmp_path):
    settings = standalone.settings(key_mode="client")
    async with serve(settings) as api, orders_service(sqlite_url) as orders:
        sku = f"rp-{uuid.uuid4().hex[:8]}"
        await api.create_sale(sku, 10, shards=2)
        order_nos = await admit(api.gateway, sku, range(1, 4))
        relay = relay_process(standalone.url, settings.key_prefix, orders.orders_url,
                              tmp_path / "relay.log", free_port())
        relay.start()
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(relay.url + "/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["code"] == "OK"

            async def delivered_and_no_lag() -> bool:
                seen = await metrics(relay.url)
                return (seen.get(("seckill_relay_delivered_total", (("result", "delivered"),))) == 3
                        and seen.get(("seckill_relay_lag", ())) == 0)
            await eventually(delivered_and_no_lag, "the relay reports 3 delivered and no lag")
            assert await all_delivered(api.gateway, order_nos)
        finally:
            try:
                status = await asyncio.to_thread(relay.terminate)
            finally:
                relay.kill()
    assert status == 0, relay.log_tail()
    events = [orjson.loads(line)["event"] for line in relay.log_lines()]
    assert events.index("relay metrics listening") < events.index("relay stopped")


def test_relay_help_has_the_metrics_port_and_no_claim_idle_flag():
    """The claim time has one setting, SECKILL_RELAY_CLAIM_IDLE_MS."""
    out = subprocess.run([sys.executable, "-m", "gateway", "relay", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--metrics-port" in out and "--metrics-host" in out
    assert "claim" not in out.replace("SECKILL_RELAY_CLAIM_IDLE_MS", "")


def test_a_metrics_port_in_use_is_a_configuration_error(standalone_redis, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        relay = relay_process(standalone_redis.url, "rp-busy", "http://127.0.0.1:9/orders",
                              tmp_path / "relay.log", holder.getsockname()[1])
        out = subprocess.run(relay.argv, env=relay.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "configuration error: relay metrics on 127.0.0.1:" in out.stderr
