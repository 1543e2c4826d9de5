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
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import aiohttp
import orjson

from devtools.processes import free_port, stop_process

ADMIN_TOKEN = "failover-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ORDERS_TOKEN = "failover-orders-token"
PAYMENT_SECRET = "failover-payment-secret"



def _clean_environ() -> dict[str, str]:
    """The test process's environment without any SECKILL_* setting of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}


@dataclass(eq=False)
class Service:
    """One ``python -m gateway ...`` subprocess on a local port; log in ``log_path``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    health_path: str = "/healthz"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> "Service":
        """Start the process and wait until it answers HTTP on its port."""
        assert not self.running, f"{self.name} is running"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", *self.argv, "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.log_path.parent, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + self.health_path, timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers (a 503 health: Redis not reachable yet)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} does not answer:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.running:
            self.process.kill()  # type: ignore[union-attr]
        if self.process is not None:
            self.process.wait()

    def pause(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the gateway drains), SIGKILL after ``timeout``."""
        if self.process is None:
            return
        if self.running:
            self.resume()
        stop_process(self.process, timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


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
    service = Service("orders", ["orders", "serve"], env, free_port(), tmp_path / "orders.log")
    try:
        yield service.start()
    finally:
        service.stop()


@contextlib.contextmanager
def gateway_service(tmp_path: Path, env: dict[str, str],
                    name: str = "gateway") -> Iterator[Service]:
    service = Service(name, ["serve"], env, free_port(), tmp_path / f"{name}.log")
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

    def unexpected(self) -> list[Attempt]:
        """Answers a client of this load must never get: a 5xx other than 503, a 503
        without Retry-After or with another code, anything but the purchase outcomes."""
        allowed = {(200, "OK"), (409, "IDEMPOTENT_CONFLICT"), (503, "UNAVAILABLE")}
        out = []
        for a in self.attempts:
            if a.status == 0:
                continue
            if (a.status, a.code) not in allowed or (a.status == 503 and not a.retry_after):
                out.append(a)
        return out
