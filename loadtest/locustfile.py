"""Locust scenarios for the flash-sale gateway, each checking every answer against the contract.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 200 -r 100 -t 30s \\
        [FlashCrowd RetryStorm GreedyUser SkewedCrowd LateCrowd]

(or ``python -m loadtest.run``, which also starts a local stack and runs the verifier).

User classes (pick some by name on the command line; default: all, by weight):

``FlashCrowd`` (weight 10)
    Each iteration is a new buyer: a random user id, ``GET /api/token``, one
    ``POST /api/seckill/{sku}``. Allowed: 200 OK, 409 ALREADY_PURCHASED (the id was drawn
    before), 410 SOLD_OUT.
``RetryStorm`` (weight 3)
    A new buyer sends one key ``--lt-retries`` times, ``--lt-concurrency`` at a time
    (a gevent pool inside the task). Allowed: 200 OK (at most one not marked
    ``Idempotent-Replayed``), 409 IDEMPOTENT_CONFLICT (with the original outcome, or
    ``null`` + ``Retry-After`` while in flight), 409 ALREADY_PURCHASED, 410 SOLD_OUT.
    All answers for the key must name one outcome and at most one order number.
``GreedyUser`` (weight 1)
    One user id per Locust user, for its whole life: fetches ``--lt-greedy-tokens`` tokens
    and fires them at once, quantity 1..limit, again and again. Allowed: 200 OK, 409
    ALREADY_PURCHASED, 410 SOLD_OUT; the units it is given must stay <= the per-user limit.
``SkewedCrowd`` (weight 5)
    Like FlashCrowd, but a share ``--lt-skew`` of the user ids are ≡ ``--lt-hot-shard``
    (mod shards), so one shard runs dry first and units must move to it (no false
    SOLD_OUT: the verifier's ``--expect-sold-out`` checks every unit was sold).
``LateCrowd`` (weight 2)
    Waits until ``GET /admin/sales/{sku}`` says the sale is sold out (without an admin
    token: ``--lt-late-delay`` seconds), then buys. Allowed: 410 SOLD_OUT, 409
    ALREADY_PURCHASED; a 200 after the sale was seen sold out is a failure (it can only be
    legitimate if a delivery was rejected and its units returned).

Everywhere, 503 UNAVAILABLE and 429 RATE_LIMITED are allowed when they carry ``Retry-After``
(the contract's overload answers; they are counted in the outcome table); any other
status/code pair, a body that is not JSON with a ``code``, any 5xx other than 503, and a
connection error are failures. A 200 must name the SKU, the user, an order number and
exactly ``quantity`` distinct units in 1..stock; a unit seen in two orders (within one
Locust process) is a failure.

Every 200 OK is appended to the record file as one JSON line (``order_no``, ``units``,
``user_id``, ``key``, ``sku``, ``status``, ``replayed``, ``scenario``, ``ts``), with one
``O_APPEND`` ``write()`` per line so that several worker processes can share the file;
the 200 original carried in a 409 IDEMPOTENT_CONFLICT body is recorded too (``status``
409). ``python -m loadtest.verify`` reads it. The file is emptied when the (master or
local) runner starts, unless ``--lt-keep-record``.

At ``test_start`` the (master or local) runner creates the sale through
``PUT /admin/sales/{sku}`` if ``GET`` does not find it; if it exists, its stock, limit
and shard count are used instead of the options. At the end an outcome table
(scenario, status, code, count; summed over workers) is logged and written to
``outcomes.json`` beside the record file.

Options (command line, or the environment variable in brackets, or the default):

--lt-sku               [SECKILL_LT_SKU]             sale SKU (default ``lt-sale``)
--lt-stock             [SECKILL_LT_STOCK]           stock when creating the sale (1000)
--lt-limit             [SECKILL_LT_LIMIT]           per-user limit when creating it (1)
--lt-shards            [SECKILL_LT_SHARDS]          shard count when creating it (16)
--lt-price             [SECKILL_LT_PRICE]           price in minor units (100)
--lt-user-min          [SECKILL_LT_USER_MIN]        lowest user id (1)
--lt-user-max          [SECKILL_LT_USER_MAX]        highest user id, exclusive (10000000)
--lt-hot-shard         [SECKILL_LT_HOT_SHARD]       SkewedCrowd's shard k (0)
--lt-skew              [SECKILL_LT_SKEW]            SkewedCrowd's share of ids ≡ k (0.9)
--lt-retries           [SECKILL_LT_RETRIES]         RetryStorm sends per key (8)
--lt-concurrency       [SECKILL_LT_CONCURRENCY]     RetryStorm sends in parallel (4, max 32)
--lt-greedy-tokens     [SECKILL_LT_GREEDY_TOKENS]   GreedyUser tokens per round (5)
--lt-late-delay        [SECKILL_LT_LATE_DELAY]      LateCrowd wait without admin token, s (10)
--lt-wait              [SECKILL_LT_WAIT]            think time, uniform 0..this, s (0.05)
--lt-key-mode          [SECKILL_LT_KEY_MODE]        ``token`` (GET /api/token) or ``client`` (own keys)
--lt-record            [SECKILL_LT_RECORD]          record file (loadtest/reports/admitted.jsonl)
--lt-keep-record       [SECKILL_LT_KEEP_RECORD]     append to the record file instead of emptying it
--lt-admin-token       [SECKILL_ADMIN_TOKEN]        bearer token for /admin/* (create the sale, LateCrowd)
--lt-jwt-secret        [SECKILL_LT_JWT_SECRET]      if set, authenticate with HS256 bearer tokens
                                                    (gateway in SECKILL_AUTH=jwt) instead of X-User-Id
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import requests
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("loadtest")

DEFAULT_RECORD = Path(__file__).resolve().parent / "reports" / "admitted.jsonl"
MAX_CONCURRENCY = 32

OK = (200, "OK")
SOLD_OUT = (410, "SOLD_OUT")
ALREADY = (409, "ALREADY_PURCHASED")
CONFLICT = (409, "IDEMPOTENT_CONFLICT")
UNAVAILABLE = (503, "UNAVAILABLE")
RATE_LIMITED = (429, "RATE_LIMITED")
OVERLOAD = {UNAVAILABLE, RATE_LIMITED}


@dataclass
class Config:
    sku: str = "lt-sale"
    stock: int = 1000
    limit: int = 1
    shards: int = 16
    price: int = 100
    user_min: int = 1
    user_max: int = 10_000_000
    hot_shard: int = 0
    skew: float = 0.9
    retries: int = 8
    concurrency: int = 4
    greedy_tokens: int = 5
    late_delay: float = 10.0
    wait: float = 0.05
    key_mode: str = "token"
    record: str = str(DEFAULT_RECORD)
    keep_record: bool = False
    admin_token: str = ""
    jwt_secret: str = ""


CONFIG = Config()

_OPTIONS = [  # (option, env var, type, help)
    ("sku", "SECKILL_LT_SKU", str, "sale SKU"),
    ("stock", "SECKILL_LT_STOCK", int, "stock when the sale is created"),
    ("limit", "SECKILL_LT_LIMIT", int, "per-user limit when the sale is created"),
    ("shards", "SECKILL_LT_SHARDS", int, "shard count when the sale is created"),
    ("price", "SECKILL_LT_PRICE", int, "price in minor units when the sale is created"),
    ("user_min", "SECKILL_LT_USER_MIN", int, "lowest user id"),
    ("user_max", "SECKILL_LT_USER_MAX", int, "highest user id (exclusive)"),
    ("hot_shard", "SECKILL_LT_HOT_SHARD", int, "SkewedCrowd: the shard most users are in"),
    ("skew", "SECKILL_LT_SKEW", float, "SkewedCrowd: share of users in the hot shard"),
    ("retries", "SECKILL_LT_RETRIES", int, "RetryStorm: sends per key"),
    ("concurrency", "SECKILL_LT_CONCURRENCY", int, "RetryStorm: sends in parallel"),
    ("greedy_tokens", "SECKILL_LT_GREEDY_TOKENS", int, "GreedyUser: tokens fired per round"),
    ("late_delay", "SECKILL_LT_LATE_DELAY", float, "LateCrowd: wait without an admin token, seconds"),
    ("wait", "SECKILL_LT_WAIT", float, "think time between iterations, uniform 0..this, seconds"),
    ("key_mode", "SECKILL_LT_KEY_MODE", str, "token (GET /api/token) or client (own keys)"),
    ("record", "SECKILL_LT_RECORD", str, "record file of the 200s"),
]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("seckill load test")
    for name, env, kind, help_text in _OPTIONS:
        group.add_argument(f"--lt-{name.replace('_', '-')}", dest=f"lt_{name}", type=kind, env_var=env,
                           default=getattr(CONFIG, name), help=f"{help_text} [{env}]")
    group.add_argument("--lt-keep-record", dest="lt_keep_record", action="store_true",
                       env_var="SECKILL_LT_KEEP_RECORD", help="append to the record file instead of emptying it")
    parser.add_argument("--lt-admin-token", dest="lt_admin_token", env_var="SECKILL_ADMIN_TOKEN", default="",
                       is_secret=True, help="bearer token for /admin/* [SECKILL_ADMIN_TOKEN]")
    parser.add_argument("--lt-jwt-secret", dest="lt_jwt_secret", env_var="SECKILL_LT_JWT_SECRET", default="",
                       is_secret=True, help="authenticate with HS256 JWTs signed with this [SECKILL_LT_JWT_SECRET]")


def _configure(options: Any) -> None:
    for name, _env, kind, _help in _OPTIONS:
        value = getattr(options, f"lt_{name}", None)
        if value is not None:
            setattr(CONFIG, name, kind(value))
    CONFIG.keep_record = bool(getattr(options, "lt_keep_record", False))
    CONFIG.admin_token = getattr(options, "lt_admin_token", "") or ""
    CONFIG.jwt_secret = getattr(options, "lt_jwt_secret", "") or ""
    CONFIG.concurrency = max(1, min(CONFIG.concurrency, MAX_CONCURRENCY))
    if CONFIG.key_mode not in ("token", "client"):
        raise SystemExit("--lt-key-mode must be token or client")
    if CONFIG.user_max <= CONFIG.user_min:
        raise SystemExit("--lt-user-max must be above --lt-user-min")


# -- the record file and the outcome table -------------------------------------------------

class Recorder:
    """Appends one JSON line per admitted purchase. One ``os.write`` of a whole line on an
    ``O_APPEND`` descriptor: lines from several processes never interleave."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def reset(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w"):
            pass

    def write(self, entry: dict) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                Path(CONFIG.record).parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(CONFIG.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            os.write(self._fd, line)


RECORDER = Recorder()
OUTCOMES: Counter = Counter()  # (scenario, status, code) -> n; a worker's since its last report
TOTALS: Counter = Counter()  # the master's sum of its workers' reports
UNITS_SEEN: dict[int, str] = {}  # unit -> order_no, this process's 200s


@events.report_to_master.add_listener
def _report(client_id: str, data: dict) -> None:
    data["lt_outcomes"] = [[*k, n] for k, n in OUTCOMES.items()]
    OUTCOMES.clear()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict) -> None:
    for scenario, status, code, n in data.get("lt_outcomes", ()):
        TOTALS[(scenario, status, code)] += n


@events.init.add_listener
def _init(environment: Environment, **_kw: Any) -> None:
    if environment.parsed_options is not None:
        _configure(environment.parsed_options)
    if not isinstance(environment.runner, WorkerRunner) and not CONFIG.keep_record:
        RECORDER.reset(CONFIG.record)


@events.quitting.add_listener
def _quitting(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    totals = TOTALS if isinstance(environment.runner, MasterRunner) else OUTCOMES
    rows = sorted(totals.items())
    width = max((len(s) for (s, _, _), _ in rows), default=8)
    lines = [f"{'scenario':<{width}}  status  {'code':<22} {'count':>8}"]
    lines += [f"{s:<{width}}  {st:>6}  {c:<22} {n:>8}" for (s, st, c), n in rows]
    log.info("outcomes of POST /api/seckill:\n%s", "\n".join(lines))
    path = Path(CONFIG.record).parent / "outcomes.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"scenario": s, "status": st, "code": c, "count": n}
                                    for (s, st, c), n in rows], indent=1))
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


# -- the sale --------------------------------------------------------------------------------

def _admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {CONFIG.admin_token}"}


def ensure_sale(host: str, create: bool) -> None:
    """Create the sale if missing (master/local); adopt the existing sale's parameters."""
    if not CONFIG.admin_token:
        log.warning("no admin token (SECKILL_ADMIN_TOKEN): the sale %s must exist already, with "
                    "stock %d, limit %d and %d shards as given", CONFIG.sku, CONFIG.stock, CONFIG.limit,
                    CONFIG.shards)
        return
    url = f"{host.rstrip('/')}/admin/sales/{CONFIG.sku}"
    for _ in range(3):
        got = requests.get(url, headers=_admin_headers(), timeout=10)
        if got.status_code == 200:
            sale = got.json()
            changed = (sale["stock"], sale.get("per_user_limit", CONFIG.limit), len(sale["shards"])) != (
                CONFIG.stock, CONFIG.limit, CONFIG.shards)
            CONFIG.stock = int(sale["stock"])
            CONFIG.limit = int(sale.get("per_user_limit", CONFIG.limit))
            CONFIG.shards = len(sale["shards"])
            if changed and create:
                log.warning("sale %s exists: stock %d, limit %d, %d shards (options ignored)",
                            CONFIG.sku, CONFIG.stock, CONFIG.limit, CONFIG.shards)
            return
        if got.status_code != 404:
            raise RuntimeError(f"GET {url}: {got.status_code} {got.text[:200]}")
        if not create:
            time.sleep(0.5)
            continue
        put = requests.put(url, headers=_admin_headers(), timeout=10, json={
            "stock": CONFIG.stock, "per_user_limit": CONFIG.limit, "shards": CONFIG.shards,
            "price": CONFIG.price})
        if put.status_code == 201:
            log.info("created sale %s: stock %d, limit %d, %d shards", CONFIG.sku, CONFIG.stock,
                     CONFIG.limit, CONFIG.shards)
            return
        if put.status_code != 409:
            raise RuntimeError(f"PUT {url}: {put.status_code} {put.text[:200]}")
    raise RuntimeError(f"sale {CONFIG.sku} not found at {host}")


@events.test_start.add_listener
def _test_start(environment: Environment, **_kw: Any) -> None:
    host = environment.host or ""
    if environment.parsed_options is not None:
        _configure(environment.parsed_options)  # a worker gets the master's options with the spawn
    try:
        ensure_sale(host, create=not isinstance(environment.runner, WorkerRunner))
    except (requests.RequestException, RuntimeError, KeyError, ValueError) as exc:
        log.error("cannot set up sale %s at %s: %s", CONFIG.sku, host, exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn_later(0.1, environment.runner.quit)  # not from inside its own start()


def sale_sold_out(client: Any, name: str) -> bool:
    with client.get(f"/admin/sales/{CONFIG.sku}", headers=_admin_headers(), name=name,
                    catch_response=True) as resp:
        if resp.status_code != 200:
            resp.failure(f"{resp.status_code}: {(resp.text or '')[:120]}")
            return False
        data = resp.json()
        return bool(data.get("sold_out", data["remaining"] == 0 and data.get("in_transfer", 0) == 0))


# -- one purchase ----------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    code: str
    body: dict
    replayed: bool


class Buyer(FastHttpUser):
    """Shared machinery; not run itself."""

    abstract = True
    concurrency = MAX_CONCURRENCY
    scenario = "Buyer"
    allowed: frozenset = frozenset()

    def wait_time(self) -> float:
        return random.uniform(0, CONFIG.wait)

    # user ids and identity

    def random_user(self) -> int:
        return random.randrange(CONFIG.user_min, CONFIG.user_max)

    def user_in_shard(self, shard: int) -> int:
        n = CONFIG.shards
        first = CONFIG.user_min + (shard - CONFIG.user_min) % n
        count = max(1, (CONFIG.user_max - first + n - 1) // n)
        return first + n * random.randrange(count)

    def identity(self, user_id: int) -> dict[str, str]:
        if CONFIG.jwt_secret:
            import jwt

            token = jwt.encode({"sub": str(user_id), "exp": int(time.time()) + 3600}, CONFIG.jwt_secret,
                               algorithm="HS256")
            return {"Authorization": f"Bearer {token}"}
        return {"X-User-Id": str(user_id)}

    def new_key(self, user_id: int) -> str | None:
        """A purchase key: a token from the gateway, or (client mode) our own."""
        if CONFIG.key_mode == "client":
            return uuid.uuid4().hex
        with self.client.get("/api/token", headers=self.identity(user_id), name="/api/token",
                             catch_response=True) as resp:
            try:
                body = resp.json()
            except (ValueError, TypeError):
                resp.failure(f"{resp.status_code}: not JSON: {(resp.text or '')[:120]!r}")
                return None
            if resp.status_code != 200 or body.get("code") != "OK" or not body.get("token"):
                resp.failure(f"{resp.status_code} {body.get('code')}: no token")
                return None
            return body["token"]

    # the purchase and its contract checks

    def buy(self, user_id: int, key: str, quantity: int = 1, allowed: frozenset | None = None) -> Answer | None:
        allowed = self.allowed if allowed is None else allowed
        headers = {**self.identity(user_id), "X-Idempotency-Key": key, "Content-Type": "application/json"}
        with self.client.post(f"/api/seckill/{CONFIG.sku}", data=json.dumps({"quantity": quantity}),
                              headers=headers, name=f"/api/seckill/[sku] {self.scenario}",
                              catch_response=True) as resp:
            status = resp.status_code
            if not status:
                resp.failure(f"no answer: {getattr(resp, 'error', None)!r}")
                return None
            try:
                body = resp.json()
                code = body["code"]
            except (ValueError, TypeError, KeyError):
                resp.failure(f"{status}: not JSON with a code: {(resp.text or '')[:120]!r}")
                OUTCOMES[(self.scenario, status, "-")] += 1
                return None
            OUTCOMES[(self.scenario, status, str(code))] += 1
            headers_in = resp.headers or {}
            replayed = (headers_in.get("Idempotent-Replayed") or "").lower() == "true"
            problem = self.problem(status, code, body, headers_in, allowed, user_id, key, quantity, replayed)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
            return Answer(status, code, body, replayed)

    def problem(self, status: int, code: str, body: dict, headers: Any, allowed: frozenset, user_id: int,
                key: str, quantity: int, replayed: bool) -> str | None:
        if (status, code) == OK:  # recorded whether allowed here or not
            problem = self.admitted(body, user_id, key, quantity, replayed, 200)
            if problem or OK in allowed:
                return problem
        if (status, code) == CONFLICT and CONFLICT not in allowed:
            original = body.get("original")
            if isinstance(original, dict) and original.get("status") == 200:
                self.admitted(original.get("body") or {}, user_id, key, quantity, True, 409)
        if (status, code) not in allowed and (status, code) not in OVERLOAD:
            if (status, code) == CONFLICT:
                return (f"{self.scenario}: 409 IDEMPOTENT_CONFLICT for a key sent once (did the gateway "
                        f"run the purchase twice?): {json.dumps(body.get('original'))[:120]}")
            return f"{self.scenario}: {status} {code} is not an allowed answer here: {json.dumps(body)[:160]}"
        if (status, code) in OVERLOAD and not headers.get("Retry-After"):
            return f"{status} {code} without Retry-After"
        if (status, code) == ALREADY and "order_no" not in body:
            return "409 ALREADY_PURCHASED without order_no"
        if (status, code) == CONFLICT:
            original = body.get("original", "missing")
            if original is None:
                return None if headers.get("Retry-After") else "in-flight 409 without Retry-After"
            if not isinstance(original, dict) or "status" not in original or "body" not in original:
                return f"409 IDEMPOTENT_CONFLICT without its original outcome: {json.dumps(body)[:160]}"
            if original["status"] == 200:
                return self.admitted(original["body"], user_id, key, quantity, True, 409)
        return None

    def admitted(self, body: dict, user_id: int, key: str, quantity: int, replayed: bool,
                 status: int) -> str | None:
        order_no, units = body.get("order_no"), body.get("units")
        if not isinstance(order_no, str) or not order_no or not isinstance(units, list):
            return f"admitted without order_no/units: {json.dumps(body)[:160]}"
        RECORDER.write({"ts": round(time.time(), 3), "sku": CONFIG.sku, "order_no": order_no, "units": units,
                        "user_id": user_id, "key": key, "status": status, "replayed": replayed,
                        "scenario": self.scenario})
        if body.get("sku") != CONFIG.sku or body.get("user_id") != user_id:
            return f"order {order_no} names sku {body.get('sku')} user {body.get('user_id')}"
        if len(units) != quantity or len(set(units)) != quantity:
            return f"order {order_no}: {len(units)} units {units} for quantity {quantity}"
        bad = [u for u in units if not isinstance(u, int) or not 1 <= u <= CONFIG.stock]
        if bad:
            return f"order {order_no}: units {bad} outside 1..{CONFIG.stock}"
        for unit in units:
            holder = UNITS_SEEN.setdefault(unit, order_no)
            if holder != order_no:
                return f"unit {unit} given to {holder} and to {order_no}"
        return None

    def check_failed(self, name: str, message: str) -> None:
        """A failed cross-request check, in Locust's failure table."""
        self.environment.events.request.fire(
            request_type="CHECK", name=name, response_time=0, response_length=0,
            exception=AssertionError(message), context={})


# -- the scenarios -----------------------------------------------------------------------------

COMMON = frozenset({OK, SOLD_OUT, ALREADY})


class FlashCrowd(Buyer):
    """A new buyer per iteration: token, then buy once."""

    weight = 10
    scenario = "FlashCrowd"
    allowed = COMMON

    def pick_user(self) -> int:
        return self.random_user()

    @task
    def buy_once(self) -> None:
        user_id = self.pick_user()
        key = self.new_key(user_id)
        if key is not None:
            self.buy(user_id, key)


class SkewedCrowd(FlashCrowd):
    """Most buyers in one shard: ids ≡ hot shard (mod shards)."""

    weight = 5
    scenario = "SkewedCrowd"

    def pick_user(self) -> int:
        if random.random() < CONFIG.skew:
            return self.user_in_shard(CONFIG.hot_shard % CONFIG.shards)
        return self.random_user()


class RetryStorm(Buyer):
    """One key sent many times, several at once: one outcome, at most one order."""

    weight = 3
    scenario = "RetryStorm"
    allowed = frozenset({OK, SOLD_OUT, ALREADY, CONFLICT})

    @task
    def storm(self) -> None:
        user_id = self.random_user()
        key = self.new_key(user_id)
        if key is None:
            return
        pool = gevent.pool.Pool(CONFIG.concurrency)
        answers = [a for a in pool.imap_unordered(lambda _: self.buy(user_id, key), range(CONFIG.retries)) if a]
        outcomes: set[str] = set()
        orders: set[str] = set()
        fresh_ok = 0
        for a in answers:
            if (a.status, a.code) in OVERLOAD or a.status >= 500:
                continue  # nothing recorded (a 500 is a failure of its own)
            if (a.status, a.code) == CONFLICT:
                original = a.body.get("original")
                if not original:
                    continue  # still in flight
                outcomes.add(str(original["body"].get("code")))
                if original["body"].get("order_no") and original["status"] == 200:
                    orders.add(original["body"]["order_no"])
                continue
            outcomes.add(a.code)
            if a.status == 200:
                orders.add(a.body.get("order_no", ""))
                fresh_ok += not a.replayed
        if len(outcomes) > 1 or len(orders) > 1 or fresh_ok > 1:
            self.check_failed("RetryStorm one key, one outcome",
                              f"user {user_id}: outcomes {sorted(outcomes)}, orders {sorted(orders)}, "
                              f"{fresh_ok} fresh 200s")


class GreedyUser(Buyer):
    """One user, many tokens at once, again and again: never more than the limit."""

    weight = 1
    scenario = "GreedyUser"
    allowed = COMMON

    def on_start(self) -> None:
        self.user_id = self.random_user()
        self.held: dict[str, int] = {}  # order_no -> units

    @task
    def grab(self) -> None:
        keys = [k for k in (self.new_key(self.user_id) for _ in range(CONFIG.greedy_tokens)) if k]
        pool = gevent.pool.Pool(len(keys) or 1)
        answers = pool.map(lambda k: self.buy(self.user_id, k, random.randint(1, CONFIG.limit)), keys)
        for a in answers:
            if a is not None and a.status == 200:
                self.held[a.body["order_no"]] = len(a.body.get("units", ()))
        total = sum(self.held.values())
        if total > CONFIG.limit:
            self.check_failed("GreedyUser per-user limit",
                              f"user {self.user_id} was given {total} units (limit {CONFIG.limit}) in "
                              f"{sorted(self.held)}")


class LateCrowd(Buyer):
    """Arrives after the sale sold out: SOLD_OUT (or ALREADY_PURCHASED), nothing else."""

    weight = 2
    scenario = "LateCrowd"
    allowed = frozenset({SOLD_OUT, ALREADY})

    def on_start(self) -> None:
        self.confirmed = False
        if not CONFIG.admin_token:
            gevent.sleep(CONFIG.late_delay)
            return
        while not sale_sold_out(self.client, "/admin/sales/[sku] LateCrowd wait"):
            gevent.sleep(0.5)
        self.confirmed = True

    @task
    def buy_once(self) -> None:
        user_id = self.random_user()
        key = self.new_key(user_id)
        if key is None:
            return
        # Without an admin token we cannot know the sale is sold out: then a 200 is allowed.
        self.buy(user_id, key, allowed=self.allowed if self.confirmed else self.allowed | {OK})
