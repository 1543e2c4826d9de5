"""Helpers for the fault tests with real processes (tests/test_failover.py): the gateway
and the orders service as subprocesses, and a load generator that buys the way the
contract tells clients to (a distinct user and key per buyer; on 503, the same key
again, a few times).

Every process started here is stopped by its context manager (SIGTERM, then SIGKILL),
whatever the test did to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from devtools.processes import ChildProcess, Probe, free_port, http_answers

ADMIN_TOKEN = "failover-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ORDERS_TOKEN = "failover-orders-token"
PAYMENT_SECRET = "failover-payment-secret"



def _clean_environ() -> dict[str, str]:
    """The test process's environment without any SECKILL_* setting of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}


@dataclass(eq=False)
class Service(ChildProcess):
    """One ``python -m gateway <argv> --host 127.0.0.1 --port <port>`` subprocess."""

    port: int = 0
    health_path: str = "/healthz"
    healthy_only: bool = False  # ready only when the health check answers 2xx

    @classmethod
    def of(cls, name: str, argv: list[str], env: dict[str, str], log_path: Path,
           **options: object) -> Service:
        port = free_port()
        command = [sys.executable, "-m", "gateway", *argv, "--host", "127.0.0.1", "--port", str(port)]
        return cls(name, command, log_path, env=env, cwd=log_path.parent, port=port, **options)  # type: ignore[arg-type]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    url = base_url

    @property
    def prefix(self) -> str:
        return (self.env or {})["SECKILL_KEY_PREFIX"]

    def start(self, ready: Probe | None = None, timeout: float = 30.0) -> Service:
        """Start the process and wait until it answers HTTP on its port."""
        super().start(ready or http_answers(self.base_url + self.health_path,
                                            ok_only=self.healthy_only), timeout)
        return self

    def output(self) -> str:
        return self.log_text()

    def log_lines(self) -> list[str]:
        """The process's output lines (the start marker of each start left out)."""
        return [line for line in self.log_text().splitlines()
                if line.strip() and not line.startswith("--- ")]


def gateway_env(*, redis_url: str, redis_mode: str, key_prefix: str, upstream_url: str | None,
                database_url: str, **settings: object) -> dict[str, str]:
    """The environment of a gateway subprocess: SECKILL_* settings, client keys."""
    env = _clean_environ()
    env.update({
        "SECKILL_REDIS_URL": redis_url,
        "SECKILL_REDIS_MODE": redis_mode,
        "SECKILL_KEY_PREFIX": key_prefix,
        "SECKILL_KEY_MODE": "client",
        "SECKILL_ADMIN_TOKEN": ADMIN_TOKEN,
        "SECKILL_DATABASE_URL": database_url,
    })
    if upstream_url:
        env["SECKILL_UPSTREAM_URL"] = upstream_url
        env["SECKILL_UPSTREAM_TOKEN"] = ORDERS_TOKEN
    else:
        env["SECKILL_RELAY"] = "false"
    for name, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"SECKILL_{name.upper()}"] = text
    return env


@contextlib.contextmanager
def orders_service(tmp_path: Path, database_url: str) -> Iterator[Service]:
    env = _clean_environ()
    env.update({"SECKILL_DATABASE_URL": database_url, "SECKILL_ORDERS_TOKEN": ORDERS_TOKEN,
                "SECKILL_PAYMENT_SECRET": PAYMENT_SECRET})
    service = Service.of("orders", ["orders", "serve"], env, tmp_path / "orders.log")
    try:
        yield service.start()
    finally:
        service.stop()


@contextlib.contextmanager
def gateway_service(tmp_path: Path, env: dict[str, str],
                    name: str = "gateway") -> Iterator[Service]:
    service = Service.of(name, ["serve"], env, tmp_path / f"{name}.log")
    try:
        yield service.start()
    finally:
        service.stop()


async def create_sale(base_url: str, sku: str, stock: int, shards: int = 16,
                      price: int = 100) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{base_url}/admin/sales/{sku}", headers=ADMIN,
                               json={"stock": stock, "shards": shards, "price": price}) as resp:
            body = await resp.json()
            assert resp.status == 201, (resp.status, body)


async def sale_status(base_url: str, sku: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/admin/sales/{sku}", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def metric(base_url: str, name: str) -> float:
    """The sum of every sample of one Prometheus metric (0 when absent)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/metrics") as resp:
            text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the load ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP attempt of one buyer. Times are ``time.monotonic()``."""

    sent: float
    done: float
    user: int
    shard: int
    try_no: int  # 0 for the first send of a key, then 1, 2 ... for its resends
    status: int  # 0: no HTTP answer (refused, reset, client timeout)
    code: str
    retry_after: str | None = None
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def failed(self) -> bool:
        """What the contract calls "retry with the same key": 503, or no answer at all."""
        return self.status in (0, 503)


@dataclass(eq=False)
class Load:
    """Buyers against one gateway: ``concurrency`` at a time, each a new user with a new
    client key. A buyer that gets 503 (or no answer) sends the same key again, up to
    ``retries`` times, ``retry_pause`` apart (shorter than the Retry-After of 1 s, so that
    the error window is measured finely). Every 200, and every 409 IDEMPOTENT_CONFLICT
    whose original is a 200, is written to ``record`` in the verifier's format."""

    base_url: str
    sku: str
    record: Path
    shards: int = 16
    concurrency: int = 32
    retries: int = 4
    retry_pause: float = 0.1
    first_user: int = 1_000_000
    request_timeout: float = 15.0
    pace: float = 0.0  # seconds each buyer slot rests before the next buyer
    tag: str = "k"
    attempts: list[Attempt] = field(default_factory=list)
    admitted: list[dict] = field(default_factory=list)
    _users: Iterator[int] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    async def run(self, max_seconds: float) -> None:
        """Until ``stop()`` or ``max_seconds``; buyers in the middle of their resends
        finish them."""
        self._users = itertools.count(self.first_user)
        deadline = time.monotonic() + max_seconds
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        with open(self.record, "ab") as record:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await asyncio.gather(*(self._buyer(session, record, deadline)
                                       for _ in range(self.concurrency)))

    async def _buyer(self, session: aiohttp.ClientSession, record, deadline: float) -> None:
        assert self._users is not None
        while not self._stop.is_set() and time.monotonic() < deadline:
            user = next(self._users)
            key = f"{self.tag}-{user:012d}"
            for try_no in range(self.retries + 1):
                attempt, body = await self._send(session, user, key, try_no)
                self.attempts.append(attempt)
                if not attempt.failed:
                    self._record(record, attempt, body, user, key)
                    break
                await asyncio.sleep(self.retry_pause)
            if self.pace:
                await asyncio.sleep(self.pace)

    async def _send(self, session: aiohttp.ClientSession, user: int, key: str,
                    try_no: int) -> tuple[Attempt, dict]:
        sent = time.monotonic()
        headers = {"X-User-Id": str(user), "X-Idempotency-Key": key}
        try:
            async with session.post(f"{self.base_url}/api/seckill/{self.sku}",
                                    data=b'{"quantity":1}', headers=headers) as resp:
                raw = await resp.read()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = {"code": f"NOT_JSON {raw[:60]!r}"}
            code = str(body.get("code", "")) if isinstance(body, dict) else "NOT_AN_OBJECT"
            return Attempt(sent, time.monotonic(), user, user % self.shards, try_no, status, code,
                           retry_after), body
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Attempt(sent, time.monotonic(), user, user % self.shards, try_no, 0, "",
                           error=type(exc).__name__), {}

    def _record(self, record, attempt: Attempt, body: dict, user: int, key: str) -> None:
        if attempt.status == 200 and attempt.code == "OK":
            admitted = body
        elif (attempt.status == 409 and attempt.code == "IDEMPOTENT_CONFLICT"
              and isinstance(body.get("original"), dict)
              and body["original"].get("status") == 200):
            admitted = body["original"].get("body") or {}
        else:
            return
        line = {"sku": self.sku, "order_no": admitted.get("order_no"),
                "units": admitted.get("units"), "user_id": user, "key": key,
                "status": attempt.status, "scenario": "failover",
                "sent": round(attempt.sent, 4), "done": round(attempt.done, 4)}
        self.admitted.append(line)
        record.write(orjson.dumps(line) + b"\n")
        record.flush()

    # -- what was seen -----------------------------------------------------------------

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.attempts:
            name = f"{a.status} {a.code or a.error}".strip()
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def successes(self) -> list[Attempt]:
        return [a for a in self.attempts
                if (a.status, a.code) in ((200, "OK"), (409, "IDEMPOTENT_CONFLICT"))]

    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.failed]

    def unexpected(self, gateway_down: tuple[float, float] | None = None) -> list[Attempt]:
        """Answers a client of this load must never get: a 5xx other than 503, a 503
        without Retry-After or with another code, anything but the purchase outcomes, and
        no answer at all (a request left unanswered), except while ``gateway_down`` (the
        gateway process itself was killed between these two monotonic times)."""
        allowed = {(200, "OK"), (409, "IDEMPOTENT_CONFLICT"), (503, "UNAVAILABLE")}
        out = []
        for a in self.attempts:
            if a.status == 0:
                if gateway_down is None or not (a.sent <= gateway_down[1]
                                                and a.done >= gateway_down[0]):
                    out.append(a)
                continue
            if (a.status, a.code) not in allowed or (a.status == 503 and not a.retry_after):
                out.append(a)
        return out


# -- one gateway process, as an operator runs it (the observability and fuzz tests) -----------

TOKEN_SECRET = "obs-token-secret-93a7c5e1"
JWT_SECRET = "obs-jwt-secret-2d8e4f60b1c3a5e7-9b0c4d1e"

GatewayProcess = Service


def observed_env(redis_url: str, **extra: str) -> dict[str, str]:
    """A standalone gateway with a known token secret, no relay, unbuffered output."""
    env = _clean_environ()
    env.update({
        "SECKILL_REDIS_URL": redis_url,
        "SECKILL_REDIS_MODE": "standalone",
        "SECKILL_KEY_PREFIX": f"p{uuid.uuid4().hex[:10]}",
        "SECKILL_ADMIN_TOKEN": ADMIN_TOKEN,
        "SECKILL_TOKEN_SECRET": TOKEN_SECRET,
        "SECKILL_RELAY": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@contextlib.contextmanager
def gateway_process(redis_url: str, log_path: Path, *, workers: int = 1, ready_timeout: float = 30.0,
                    **env: str) -> Iterator[Service]:
    """``python -m gateway serve`` answering 200 on /healthz when this yields; killed (its
    workers too) on the way out if the test did not stop it."""
    gw = Service.of("gateway", ["serve", "--workers", str(workers)], observed_env(redis_url, **env),
                    log_path, healthy_only=True)
    try:
        yield gw.start(timeout=ready_timeout)
    finally:
        gw.kill()


def http(gw: Service, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One request with the standard library: (status, headers, body)."""
    request = urllib.request.Request(gw.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def put_sale(gw: Service, sku: str, stock: int, **fields: int) -> dict:
    status, _, body = http(gw, "PUT", f"/admin/sales/{sku}", orjson.dumps({"stock": stock, **fields}),
                           admin_headers())
    assert status == 201, body
    return orjson.loads(body)
