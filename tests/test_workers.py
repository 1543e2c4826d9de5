"""``serve --workers N``: the supervisor keeps N workers alive, counts restarts, drains on
SIGTERM and gives up (non-zero) when workers cannot start.

Real processes on a real Redis: ``python -m gateway serve --workers 2`` in a subprocess
(its workers are its children), spoken to over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import ChildProcess, free_port
from devtools.redis_server import LocalRedis
from tests.support.services import ADMIN_TOKEN, Service, gateway_process, observed_env

pytestmark = pytest.mark.timeout(180)

RESTARTS = "seckill_worker_restarts_total"


# -- helpers --------------------------------------------------------------------------------

def listening_pids(gw: Service) -> list[int]:
    """Worker pids, in the order they said they listen."""
    return [orjson.loads(line)["pid"] for line in gw.log_lines() if '"listening"' in line]


def events(gw: Service) -> list[dict]:
    return [orjson.loads(line) for line in gw.log_lines() if line.startswith("{")]


async def eventually(check, what: str, timeout: float = 60.0, every: float = 0.05):
    """Poll until ``check()`` returns something true (the timeout guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(every)
    return result


@dataclass(frozen=True)
class Scrape:
    """One worker's /metrics: which worker answered, and its samples."""

    pid: int
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))


async def scrape(url: str) -> Scrape:
    """A new connection each time: the kernel picks the worker."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    (pid,) = [int(dict(labels)["pid"]) for (name, labels) in samples if name == "seckill_worker"]
    return Scrape(pid, samples)


async def scrape_each(url: str, pids: set[int], tries: int = 400) -> dict[int, Scrape]:
    """A scrape of every worker in ``pids`` (scraping until each has answered once)."""
    seen: dict[int, Scrape] = {}
    for _ in range(tries):
        got = await scrape(url)
        seen[got.pid] = got
        if pids <= seen.keys():
            return seen
    raise AssertionError(f"workers {pids - seen.keys()} never answered a scrape")


@dataclass
class TokenLoad:
    """``concurrency`` clients asking for tokens, a new connection per request, so that
    the kernel spreads them over the workers and a dead worker's share moves at once."""

    url: str
    concurrency: int = 16
    results: list[tuple[float, float, int, str]] = field(default_factory=list)  # sent, done, status, error
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, n: int) -> None:
        user = n * 1_000_000
        while not self._stop.is_set():
            user += 1
            sent = time.monotonic()
            try:
                async with session.get(self.url + "/api/token", headers={"X-User-Id": str(user)}) as resp:
                    await resp.read()
                    self.results.append((sent, time.monotonic(), resp.status, ""))
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.results.append((sent, time.monotonic(), 0, type(exc).__name__))

    def stop(self) -> None:
        self._stop.set()

    def sent_after(self, moment: float) -> list[tuple[float, float, int, str]]:
        return [r for r in self.results if r[0] > moment]


# -- a worker dies ----------------------------------------------------------------------------

async def test_a_killed_worker_is_replaced_counted_and_the_load_goes_on(standalone_redis, tmp_path):
    with gateway_process(standalone_redis.url, tmp_path / "gateway.log", workers=2) as gw:
        first = await eventually(lambda: _two(listening_pids(gw)), "both workers listen")
        load = TokenLoad(gw.url)
        running = asyncio.create_task(load.run())
        try:
            await eventually(lambda: _async(len(load.results) >= 200), "the load runs")
            victim, survivor = first
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()

            async def replacement() -> int | None:
                new = [pid for pid in listening_pids(gw) if pid not in first]
                return new[0] if new else None
            new_pid = await eventually(replacement, "a new worker listens")
            restarted = time.monotonic()  # it listened before this: a conservative mark
            await eventually(lambda: _async(len(load.sent_after(restarted)) >= 300),
                             "the load runs on after the restart")
        finally:
            load.stop()
            await running

        # The supervisor is alive and says what happened.
        assert gw.running
        died = [e for e in events(gw) if e["event"] == "worker died, starting another"]
        assert [(e["pid"], e["restarts"]) for e in died] == [(victim, 1)]
        assert "killed by SIGKILL" in died[0]["exit"]

        # Every request was answered, but those in flight on the killed worker at the kill
        # (or queued on its socket): those may get a connection error, and none after
        # the new worker listened.
        failed = [r for r in load.results if r[2] != 200]
        print(f"\n{len(load.results)} requests, {len(failed)} without an answer "
              f"({sorted({r[3] for r in failed})}), all sent between the kill and the restart "
              f"({restarted - killed:.3f} s)")
        assert all(r[2] == 0 for r in failed), failed  # no HTTP error, only lost connections
        assert all(r[1] >= killed and r[0] <= restarted for r in failed), (killed, restarted, failed)
        assert not [r for r in load.sent_after(restarted) if r[2] != 200]

        # Every worker, the new one and the old one, reports the one restart; the new one
        # took part of the load.
        workers = await scrape_each(gw.url, {new_pid, survivor})
        assert {pid: s.value(RESTARTS) for pid, s in workers.items()} == {new_pid: 1.0, survivor: 1.0}
        assert (workers[new_pid].value("seckill_requests_total", route="/api/token", code="OK") or 0) > 0

        assert await asyncio.to_thread(gw.terminate) == 0, gw.log_tail()


async def _async(value):
    return value


async def _two(pids: list[int]) -> list[int] | None:
    return pids if len(pids) == 2 else None


async def test_workers_stop_when_the_supervisor_is_killed(standalone_redis, tmp_path):
    """No orphans serving the port with nobody to restart them: a SIGKILLed supervisor's
    workers get SIGTERM and drain."""
    with gateway_process(standalone_redis.url, tmp_path / "gateway.log", workers=2) as gw:
        pids = await eventually(lambda: _two(listening_pids(gw)), "both workers listen")
        os.kill(gw.pid, signal.SIGKILL)
        await eventually(lambda: _async(not any(map(_exists, pids))), "the workers exit", timeout=60)
    stopped = [e["pid"] for e in events(gw) if e["event"] == "stopped"]
    assert sorted(stopped) == sorted(pids)


def _exists(pid: int) -> bool:
    """The process runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- SIGTERM ----------------------------------------------------------------------------------

@pytest.fixture
def private_redis():
    """A Redis of this test's own: it is paused (SIGSTOP) to hold requests in flight."""
    with LocalRedis() as server:
        yield server


async def test_sigterm_drains_requests_in_flight_on_every_worker_and_exits_0(private_redis, tmp_path):
    """Admin PUTs held in their handlers (Redis paused) when SIGTERM reaches the
    supervisor: the workers stop accepting connections, answer every PUT once Redis is
    back, and the supervisor exits 0.

    (A request whose body is still arriving is not one of them: once aiohttp starts its
    shutdown it reads no more bytes, so such a request ends unanswered after the drain
    timeout. The gateway's bodies are a few hundred bytes, sent with the headers.)"""
    n = 8
    with gateway_process(private_redis.url, tmp_path / "gateway.log", workers=2,
                         SECKILL_REQUEST_TIMEOUT="60", SECKILL_REDIS_TIMEOUT="30") as gw:
        pids = await eventually(lambda: _two(listening_pids(gw)), "both workers listen")
        skus = [f"drain-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        connector = aiohttp.TCPConnector(force_close=True)  # spread over the workers
        async with aiohttp.ClientSession(connector=connector) as session:
            async def put(sku: str) -> tuple[int, dict]:
                async with session.put(f"{gw.url}/admin/sales/{sku}", json={"stock": 3, "shards": 2},
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                    return resp.status, await resp.json()

            private_redis.pause()
            try:
                puts = [asyncio.create_task(put(sku)) for sku in skus]
                in_flight: dict[int, float] = {}  # pid -> PUTs in its handlers

                async def all_in_flight() -> bool:
                    # A worker's gauge counts the scrape too. A worker's last figure can
                    # only undercount (no PUT ends meanwhile): a sum of n is the truth.
                    got = await scrape(gw.url)
                    in_flight[got.pid] = (got.value("seckill_in_flight_requests") or 0) - 1
                    return sum(in_flight.values()) == n
                await eventually(all_in_flight, "every PUT is in a handler")

                gw.process.send_signal(signal.SIGTERM)  # the supervisor only: it tells the workers

                async def refused() -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
                        return False
                    except ConnectionRefusedError:
                        return True
                await eventually(refused, "no worker accepts connections any more")
            finally:
                private_redis.resume()
            answers = await asyncio.gather(*puts)
        assert [status for status, _ in answers] == [201] * n, answers
        assert {body["sku"] for _, body in answers} == set(skus)
        assert await asyncio.to_thread(gw.process.wait, 60) == 0, gw.log_tail()

    log = events(gw)
    assert sorted(e["pid"] for e in log if e["event"] == "draining") == sorted(pids)
    assert sorted(e["pid"] for e in log if e["event"] == "stopped") == sorted(pids)
    assert [e["clean"] for e in log if e["event"] == "workers stopped"] == [True]


# -- workers that cannot start ---------------------------------------------------------------

async def test_workers_that_cannot_start_make_the_supervisor_give_up(standalone_redis, tmp_path):
    """The port is held by a socket without SO_REUSEPORT: every worker fails to bind and
    dies at once. The supervisor restarts them until the crash-loop limit, then stops and
    exits 1 with the reason in its log."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        gw = Service("gateway", [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "2"],
                     tmp_path / "gateway.log", env=observed_env(standalone_redis.url), cwd=tmp_path,
                     port=port)
        ChildProcess.start(gw)
        try:
            status = await asyncio.to_thread(gw.process.wait, 120)
        finally:
            gw.kill()
    assert status == 1, gw.log_tail()
    log = events(gw)
    (gave_up,) = [e for e in log if e["event"] == "giving up: cannot keep the workers alive"]
    assert "worker exits within" in gave_up["reason"], gave_up
    failures = [e for e in log if e["event"] == "worker failed"]
    assert failures and all("address already in use" in e["error"] for e in failures)


# -- under gunicorn, as the README shows it ----------------------------------------------------

async def test_the_gateway_runs_under_gunicorn_with_its_runner(standalone_redis, tmp_path):
    """The documented command: gunicorn's aiohttp worker runs ``gunicorn_app``'s runner
    (parser-level errors answered in JSON) and stops with 0 on SIGTERM."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "gateway.http.server:gunicorn_app",
            "--worker-class", "aiohttp.GunicornUVLoopWebWorker", "--workers", "2", "--reuse-port",
            "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "30", "--no-control-socket"]
    gw = Service("gunicorn", argv, tmp_path / "gunicorn.log", env=observed_env(standalone_redis.url),
                 cwd=tmp_path, port=port, healthy_only=True)
    gw.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/api/token", headers={"X-User-Id": "7"}) as resp:
                assert resp.status == 200 and (await resp.json())["code"] == "OK"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400" and orjson.loads(body)["code"] == "BAD_REQUEST", raw
        assert await asyncio.to_thread(gw.terminate) == 0, gw.log_tail()
    finally:
        gw.kill()
