"""Locust scenarios for the flash-sale gateway, each checking every answer against the contract.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 200 -r 100 -t 30s \\
        [FlashCrowd RetryStorm GreedyUser SkewedCrowd LateCrowd EarlyCrowd Abandoners QueueCrowd]

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
``EarlyCrowd`` (``--lt-early-users`` Locust users, each ``--lt-early-buyers`` buyers)
    Its own sale (``--lt-early-sku``), created with ``starts_at`` ``--lt-early-lead``
    seconds after the test starts. Every buyer takes a token and buys before the start:
    403 SALE_NOT_STARTED, with ``Retry-After`` (honoured: the buyer asks again when told)
    and ``starts_at``; then 200 OK, 409 ALREADY_PURCHASED or 410 SOLD_OUT. A 200 before
    ``starts_at`` or a SALE_NOT_STARTED well after it is a failure. After its 200, a buyer
    sends the same key to the main sale (invariant 8: a key admits one purchase across
    all sales, whatever their shard counts: ``--lt-early-shards`` sets another one):
    422 IDEMPOTENCY_KEY_REUSED, 410 SOLD_OUT or 409 ALREADY_PURCHASED.
``Abandoners`` (``--lt-abandon-users`` Locust users)
    Its own sale (``--lt-abandon-sku``), created with ``payment_ttl`` ``--lt-abandon-ttl``.
    New buyers buy again and again (units come back, so a 200 after SOLD_OUT is fine);
    after a 200 each waits for the order at the orders service and then, by
    ``--lt-abandon-mix``: pays at once (signed ``POST /payments/notify``: 200, state
    ``paid``), never pays (the service expires the order and releases its units at the
    gateway, and other buyers get them), pays late (after the deadline: 409
    ORDER_CLOSED, and the payment is listed by ``GET /refunds``) or cancels
    (``POST /orders/{no}/cancel``: 200).

``QueueCrowd`` (``--lt-queue-users`` Locust users, the crowd shared among them)
    Its own sale (``--lt-queue-sku``, stock ``--lt-queue-stock``) with a waiting room
    (``"waiting_room": {"admit_rate": --lt-queue-rate}``) and ``starts_at``
    ``--lt-queue-lead`` seconds after the test starts. ``--lt-queue-crowd`` buyers join
    (``POST /api/queue/{sku}``) at random moments before the start, ``--lt-queue-late``
    more in the ``--lt-queue-late-window`` seconds after it. Each polls its ticket
    (``GET /api/queue/{sku}/{ticket}``) when ``Retry-After`` says (never sooner than
    ``--lt-queue-poll-min``), and once ``ADMITTED`` takes a token and buys with its pass
    in ``X-Queue-Pass``: 200 OK, 410 SOLD_OUT, 409 ALREADY_PURCHASED. A 410 SOLD_OUT /
    SALE_ENDED on the queue ends its wait. Answers: 202 QUEUED with ``ticket``,
    ``position`` (a number or null), ``eta_s``, ``units_left`` and ``Retry-After``; 200
    ADMITTED with ``pass`` and ``expires_in``; the same ticket on every answer; a
    ``position`` that never grows. A share ``--lt-queue-sneak`` of the buyers also try
    to buy without a pass and with a forged one after the start, and with another
    buyer's pass once admitted: only 403 QUEUE_PASS_REQUIRED (or 410) may answer; after
    their purchase they poll once more (ADMITTED or 410, never QUEUED again). Every
    queue answer (with the send and receive times and its ``Date``) and every purchase
    with the pass it carried go to the record file, for the verifier's invariant 9.

The lifecycle scenarios skip themselves, with one clear log line, when the gateway
answers 400 to ``starts_at`` / ``payment_ttl`` / ``waiting_room`` (a gateway without sale
windows, payment deadlines or waiting rooms), and Abandoners when the orders service's
URL, token or payment secret is not given; their sales are then noted as
``unsupported`` in the record file.

Everywhere, 503 UNAVAILABLE and 429 RATE_LIMITED are allowed when they carry ``Retry-After``
(the contract's overload answers; they are counted in the outcome table); any other
status/code pair, a body that is not JSON with a ``code``, any 5xx other than 503, and a
connection error are failures. A 200 must name the SKU, the user, an order number and
exactly ``quantity`` distinct units in 1..stock; a unit seen in two orders (within one
Locust process) is a failure, except on a sale with a payment deadline (units come back).

The record file (``loadtest.records``; ``python -m loadtest.verify`` and
``loadtest.timeline`` read it) gets one JSON line per 200 OK (and per 200 original in a
409 conflict), per payment and cancel sent to the orders service, and per sale set up,
written with one ``O_APPEND`` ``write()`` per line so that several worker processes can
share it. It is emptied when the (master or local) runner starts, unless
``--lt-keep-record``.

At ``test_start`` the (master or local) runner creates the main sale through
``PUT /admin/sales/{sku}`` if ``GET`` does not find it (if it exists, its stock, limit
and shard count are used instead of the options), and the lifecycle scenarios' sales.
At the end an outcome table (scenario, SKU, status, code, count; summed over workers) is
logged and written to ``outcomes.json`` beside the record file.

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
--lt-early-sku         [SECKILL_LT_EARLY_SKU]       EarlyCrowd's sale (<sku>-early)
--lt-early-stock       [SECKILL_LT_EARLY_STOCK]     its stock (500)
--lt-early-shards      [SECKILL_LT_EARLY_SHARDS]    its shard count (0: the main sale's)
--lt-early-users       [SECKILL_LT_EARLY_USERS]     EarlyCrowd Locust users (10)
--lt-early-buyers      [SECKILL_LT_EARLY_BUYERS]    buyers per EarlyCrowd user (200)
--lt-early-lead        [SECKILL_LT_EARLY_LEAD]      seconds from the test's start to starts_at (8)
--lt-abandon-sku       [SECKILL_LT_ABANDON_SKU]     Abandoners' sale (<sku>-abandon)
--lt-abandon-stock     [SECKILL_LT_ABANDON_STOCK]   its stock (200)
--lt-abandon-users     [SECKILL_LT_ABANDON_USERS]   Abandoners Locust users (10)
--lt-abandon-ttl       [SECKILL_LT_ABANDON_TTL]     its payment_ttl, seconds (5)
--lt-abandon-mix       [SECKILL_LT_ABANDON_MIX]     pay=5,abandon=3,late=1,cancel=1
--lt-abandon-wait      [SECKILL_LT_ABANDON_WAIT]    Abandoners' think time, s (0.3)
--lt-orders-url        [SECKILL_LT_ORDERS_URL]      the orders service (Abandoners)
--lt-queue-sku         [SECKILL_LT_QUEUE_SKU]       QueueCrowd's sale (<sku>-queue)
--lt-queue-stock       [SECKILL_LT_QUEUE_STOCK]     its stock (2000)
--lt-queue-rate        [SECKILL_LT_QUEUE_RATE]      its admit_rate, per second (200)
--lt-queue-crowd       [SECKILL_LT_QUEUE_CROWD]     buyers who join before the start (1800)
--lt-queue-late        [SECKILL_LT_QUEUE_LATE]      buyers who join after it (400)
--lt-queue-users       [SECKILL_LT_QUEUE_USERS]     QueueCrowd Locust users (10)
--lt-queue-lead        [SECKILL_LT_QUEUE_LEAD]      seconds from the test's start to starts_at (12)
--lt-queue-late-window [SECKILL_LT_QUEUE_LATE_WINDOW] seconds after the start the late ones join in (4)
--lt-queue-sneak       [SECKILL_LT_QUEUE_SNEAK]     share of buyers who try without a pass (0.02)
--lt-queue-poll-min    [SECKILL_LT_QUEUE_POLL_MIN]  fewest seconds between two polls (0.25)
--lt-record            [SECKILL_LT_RECORD]          record file (loadtest/reports/admitted.jsonl)
--lt-keep-record       [SECKILL_LT_KEEP_RECORD]     append to the record file instead of emptying it
--lt-admin-token       [SECKILL_ADMIN_TOKEN]        bearer token for /admin/* (create the sales, LateCrowd)
--lt-orders-token      [SECKILL_ORDERS_TOKEN]       bearer token of the orders service (Abandoners)
--lt-payment-secret    [SECKILL_PAYMENT_SECRET]     payment notices' signing secret (Abandoners)
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

try:
    from loadtest import lifecycle, queueclient, records
except ImportError:  # run as ``locust -f loadtest/locustfile.py`` from outside the checkout's root
    import lifecycle  # type: ignore[no-redef]
    import queueclient  # type: ignore[no-redef]
    import records  # type: ignore[no-redef]

log = logging.getLogger("loadtest")

DEFAULT_RECORD = Path(__file__).resolve().parent / "reports" / "admitted.jsonl"
MAX_CONCURRENCY = 32
MAX_POLLS = 200  # an EarlyCrowd buyer gives up after this many answers that say "not yet"
MAX_QUEUE_WAIT = 900.0  # seconds a QueueCrowd buyer waits in the room at most
START_SLACK_MS = 1500  # clock skew and Retry-After rounding tolerated around starts_at
DELIVERY_TIMEOUT = 30.0  # seconds an Abandoner waits for its order at the orders service
EXPIRY_TIMEOUT = 15.0  # seconds past pay_by until the order must read expired

OK = (200, "OK")
SOLD_OUT = (410, "SOLD_OUT")
ALREADY = (409, "ALREADY_PURCHASED")
CONFLICT = (409, "IDEMPOTENT_CONFLICT")
NOT_STARTED = (403, "SALE_NOT_STARTED")
KEY_REUSED = (422, "IDEMPOTENCY_KEY_REUSED")
UNAVAILABLE = (503, "UNAVAILABLE")
RATE_LIMITED = (429, "RATE_LIMITED")
OVERLOAD = {UNAVAILABLE, RATE_LIMITED}
PASS_REQUIRED = (403, "QUEUE_PASS_REQUIRED")
SALE_ENDED, ADMITTED, QUEUED = queueclient.SALE_ENDED, queueclient.ADMITTED, queueclient.QUEUED


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
    early_sku: str = ""
    early_stock: int = 500
    early_shards: int = 0  # 0: as the main sale
    early_users: int = 10
    early_buyers: int = 200
    early_lead: float = 8.0
    abandon_sku: str = ""
    abandon_stock: int = 200
    abandon_users: int = 10
    abandon_ttl: int = 5
    abandon_mix: str = "pay=5,abandon=3,late=1,cancel=1"
    abandon_wait: float = 0.3
    queue_sku: str = ""
    queue_stock: int = 2000
    queue_rate: float = 200.0
    queue_crowd: int = 1800
    queue_late: int = 400
    queue_users: int = 10
    queue_lead: float = 12.0
    queue_late_window: float = 4.0
    queue_sneak: float = 0.02
    queue_poll_min: float = 0.25
    orders_url: str = ""
    record: str = str(DEFAULT_RECORD)
    keep_record: bool = False
    admin_token: str = ""
    orders_token: str = ""
    payment_secret: str = ""
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
    ("early_sku", "SECKILL_LT_EARLY_SKU", str, "EarlyCrowd: its sale (default <sku>-early)"),
    ("early_stock", "SECKILL_LT_EARLY_STOCK", int, "EarlyCrowd: its sale's stock"),
    ("early_shards", "SECKILL_LT_EARLY_SHARDS", int,
     "EarlyCrowd: its sale's shard count (0: the main sale's; another probes keys across shard counts)"),
    ("early_users", "SECKILL_LT_EARLY_USERS", int, "EarlyCrowd: Locust users"),
    ("early_buyers", "SECKILL_LT_EARLY_BUYERS", int, "EarlyCrowd: buyers per Locust user"),
    ("early_lead", "SECKILL_LT_EARLY_LEAD", float, "EarlyCrowd: seconds from the test's start to starts_at"),
    ("abandon_sku", "SECKILL_LT_ABANDON_SKU", str, "Abandoners: its sale (default <sku>-abandon)"),
    ("abandon_stock", "SECKILL_LT_ABANDON_STOCK", int, "Abandoners: its sale's stock"),
    ("abandon_users", "SECKILL_LT_ABANDON_USERS", int, "Abandoners: Locust users"),
    ("abandon_ttl", "SECKILL_LT_ABANDON_TTL", int, "Abandoners: the sale's payment_ttl, seconds"),
    ("abandon_mix", "SECKILL_LT_ABANDON_MIX", str, "Abandoners: weights of pay, abandon, late, cancel"),
    ("abandon_wait", "SECKILL_LT_ABANDON_WAIT", float, "Abandoners: think time, uniform 0..this, seconds"),
    ("orders_url", "SECKILL_LT_ORDERS_URL", str, "Abandoners: the orders service's URL"),
    ("queue_sku", "SECKILL_LT_QUEUE_SKU", str, "QueueCrowd: its sale (default <sku>-queue)"),
    ("queue_stock", "SECKILL_LT_QUEUE_STOCK", int, "QueueCrowd: its sale's stock"),
    ("queue_rate", "SECKILL_LT_QUEUE_RATE", float, "QueueCrowd: its waiting room's admit_rate, per second"),
    ("queue_crowd", "SECKILL_LT_QUEUE_CROWD", int, "QueueCrowd: buyers who join before the start"),
    ("queue_late", "SECKILL_LT_QUEUE_LATE", int, "QueueCrowd: buyers who join after the start"),
    ("queue_users", "SECKILL_LT_QUEUE_USERS", int, "QueueCrowd: Locust users (the buyers are shared among them)"),
    ("queue_lead", "SECKILL_LT_QUEUE_LEAD", float, "QueueCrowd: seconds from the test's start to starts_at"),
    ("queue_late_window", "SECKILL_LT_QUEUE_LATE_WINDOW", float,
     "QueueCrowd: seconds after the start in which the late buyers join"),
    ("queue_sneak", "SECKILL_LT_QUEUE_SNEAK", float, "QueueCrowd: share of buyers who also try without a pass"),
    ("queue_poll_min", "SECKILL_LT_QUEUE_POLL_MIN", float,
     "QueueCrowd: fewest seconds between two polls (Retry-After is honoured above it)"),
    ("record", "SECKILL_LT_RECORD", str, "record file of the run"),
]
_SECRETS = [  # (option, env var, help): not shown in the web UI
    ("admin_token", "SECKILL_ADMIN_TOKEN", "bearer token for /admin/*"),
    ("orders_token", "SECKILL_ORDERS_TOKEN", "bearer token of the orders service"),
    ("payment_secret", "SECKILL_PAYMENT_SECRET", "secret payment notices are signed with"),
    ("jwt_secret", "SECKILL_LT_JWT_SECRET", "authenticate with HS256 JWTs signed with this"),
]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("seckill load test")
    for name, env, kind, help_text in _OPTIONS:
        group.add_argument(f"--lt-{name.replace('_', '-')}", dest=f"lt_{name}", type=kind, env_var=env,
                           default=getattr(CONFIG, name), help=f"{help_text} [{env}]")
    group.add_argument("--lt-keep-record", dest="lt_keep_record", action="store_true",
                       env_var="SECKILL_LT_KEEP_RECORD", help="append to the record file instead of emptying it")
    for name, env, help_text in _SECRETS:
        parser.add_argument(f"--lt-{name.replace('_', '-')}", dest=f"lt_{name}", env_var=env, default="",
                            is_secret=True, help=f"{help_text} [{env}]")


def _configure(options: Any) -> None:
    for name, _env, kind, _help in _OPTIONS:
        value = getattr(options, f"lt_{name}", None)
        if value is not None:
            setattr(CONFIG, name, kind(value))
    CONFIG.keep_record = bool(getattr(options, "lt_keep_record", False))
    for name, _env, _help in _SECRETS:
        setattr(CONFIG, name, getattr(options, f"lt_{name}", "") or "")
    CONFIG.concurrency = max(1, min(CONFIG.concurrency, MAX_CONCURRENCY))
    CONFIG.early_sku = CONFIG.early_sku or f"{CONFIG.sku}-early"
    CONFIG.abandon_sku = CONFIG.abandon_sku or f"{CONFIG.sku}-abandon"
    CONFIG.queue_sku = CONFIG.queue_sku or f"{CONFIG.sku}-queue"
    if CONFIG.key_mode not in ("token", "client"):
        raise SystemExit("--lt-key-mode must be token or client")
    if CONFIG.user_max <= CONFIG.user_min:
        raise SystemExit("--lt-user-max must be above --lt-user-min")
    try:
        lifecycle.Mix.parse(CONFIG.abandon_mix)
    except ValueError as exc:
        raise SystemExit(f"--lt-abandon-mix: {exc}") from None
    EarlyCrowd.fixed_count = max(0, CONFIG.early_users)
    Abandoners.fixed_count = max(0, CONFIG.abandon_users)
    QueueCrowd.fixed_count = max(0, CONFIG.queue_users)
    if CONFIG.queue_rate <= 0:
        raise SystemExit("--lt-queue-rate must be above 0")


# -- the record file and the outcome table -------------------------------------------------

class Recorder:
    """Appends record lines (``loadtest.records``). One ``os.write`` of a whole line on an
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
        line = records.line(entry)
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                Path(CONFIG.record).parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(CONFIG.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            os.write(self._fd, line)


RECORDER = Recorder()
OUTCOMES: Counter = Counter()  # (scenario, sku, status, code) -> n; a worker's since its last report
TOTALS: Counter = Counter()  # the master's sum of its workers' reports
UNITS_SEEN: dict[tuple[str, int], str] = {}  # (sku, unit) -> order_no, this process's 200s


@events.report_to_master.add_listener
def _report(client_id: str, data: dict) -> None:
    data["lt_outcomes"] = [[*k, n] for k, n in OUTCOMES.items()]
    OUTCOMES.clear()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict) -> None:
    for scenario, sku, status, code, n in data.get("lt_outcomes", ()):
        TOTALS[(scenario, sku, status, code)] += n


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
    width = max((len(s) for (s, _, _, _), _ in rows), default=8)
    sku_width = max((len(k) for (_, k, _, _), _ in rows), default=4)
    lines = [f"{'scenario':<{width}}  {'sku':<{sku_width}}  status  {'code':<24} {'count':>8}"]
    lines += [f"{s:<{width}}  {k:<{sku_width}}  {st:>6}  {c:<24} {n:>8}" for (s, k, st, c), n in rows]
    log.info("outcomes of POST /api/seckill:\n%s", "\n".join(lines))
    path = Path(CONFIG.record).parent / "outcomes.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"scenario": s, "sku": k, "status": st, "code": c, "count": n}
                                    for (s, k, st, c), n in rows], indent=1))
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


# -- the sales -------------------------------------------------------------------------------

@dataclass
class SaleSpec:
    """A sale a scenario buys from, and whether this gateway can hold it."""

    role: str  # main, early, abandon, queue
    scenario: str  # the scenario that owns it ("main": the five classic ones), for the record and the log
    sku: str
    stock: int
    limit: int = 1
    shards: int = 16
    price: int = 100
    starts_at_ms: int | None = None
    payment_ttl: int | None = None
    admit_rate: float | None = None  # a waiting room's
    active: bool = True
    skip_reason: str = ""

    def skip(self, reason: str) -> None:
        self.active = False
        self.skip_reason = reason
        log.warning("%s skipped: %s", self.scenario, reason)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"stock": self.stock, "per_user_limit": self.limit, "shards": self.shards,
                                "price": self.price}
        if self.starts_at_ms is not None:
            body["starts_at"] = records.rfc3339(self.starts_at_ms)
        if self.payment_ttl:
            body["payment_ttl"] = self.payment_ttl
        if self.admit_rate:
            body["waiting_room"] = {"admit_rate": self.admit_rate}
        return body

    def note(self, outcome: str, message: str = "") -> dict[str, Any]:
        return records.sale_entry(sku=self.sku, scenario=self.scenario, outcome=outcome, ts=time.time(),
                                  stock=self.stock, per_user_limit=self.limit, shards=self.shards,
                                  starts_at_ms=self.starts_at_ms, payment_ttl=self.payment_ttl,
                                  message=message, admit_rate=self.admit_rate)


def main_sale() -> SaleSpec:
    return SaleSpec("main", "main", CONFIG.sku, CONFIG.stock, CONFIG.limit, CONFIG.shards, CONFIG.price)


def lifecycle_sales(now_s: float) -> dict[str, SaleSpec]:
    early = SaleSpec("early", "EarlyCrowd", CONFIG.early_sku, CONFIG.early_stock, 1,
                     CONFIG.early_shards or CONFIG.shards, CONFIG.price,
                     starts_at_ms=lifecycle.starts_at_ms(now_s, CONFIG.early_lead))
    abandon = SaleSpec("abandon", "Abandoners", CONFIG.abandon_sku, CONFIG.abandon_stock, 1, CONFIG.shards,
                       CONFIG.price, payment_ttl=CONFIG.abandon_ttl)
    queue = SaleSpec("queue", "QueueCrowd", CONFIG.queue_sku, CONFIG.queue_stock, 1, CONFIG.shards, CONFIG.price,
                     starts_at_ms=lifecycle.starts_at_ms(now_s, CONFIG.queue_lead), admit_rate=CONFIG.queue_rate)
    return {"early": early, "abandon": abandon, "queue": queue}


def sales_of(environment: Environment) -> dict[str, SaleSpec]:
    """This run's sales by role, kept on the Environment (set at ``test_start``)."""
    sales = getattr(environment, "lt_sales", None)
    if sales is None:
        sales = {"main": main_sale(), **lifecycle_sales(time.time())}
        environment.lt_sales = sales  # type: ignore[attr-defined]
    return sales


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
            if create:
                RECORDER.write(main_sale().note("exists"))
            return
        if got.status_code != 404:
            raise RuntimeError(f"GET {url}: {got.status_code} {got.text[:200]}")
        if not create:
            time.sleep(0.5)
            continue
        put = requests.put(url, headers=_admin_headers(), timeout=10, json=main_sale().body())
        if put.status_code == 201:
            log.info("created sale %s: stock %d, limit %d, %d shards", CONFIG.sku, CONFIG.stock,
                     CONFIG.limit, CONFIG.shards)
            RECORDER.write(main_sale().note("created"))
            return
        if put.status_code != 409:
            raise RuntimeError(f"PUT {url}: {put.status_code} {put.text[:200]}")
    raise RuntimeError(f"sale {CONFIG.sku} not found at {host}")


def _wanted(spec: SaleSpec) -> str:
    if spec.admit_rate:
        return "waiting_room"
    return "starts_at" if spec.starts_at_ms is not None else "payment_ttl"


def _feature(spec: SaleSpec) -> str:
    return {"waiting_room": "waiting rooms", "starts_at": "sale windows"}.get(_wanted(spec), "payment deadlines")


def create_lifecycle_sale(host: str, spec: SaleSpec) -> None:
    """PUT the sale with its window or deadline (master/local). A 400 means this gateway
    does not take them yet: the scenario is skipped, and the record says so."""
    url = f"{host.rstrip('/')}/admin/sales/{spec.sku}"
    if not CONFIG.admin_token:
        spec.skip(f"no admin token (SECKILL_ADMIN_TOKEN) to create sale {spec.sku} with {_wanted(spec)}")
        RECORDER.write(spec.note("failed", spec.skip_reason))
        return
    put = requests.put(url, headers=_admin_headers(), timeout=10, json=spec.body())
    answer = lifecycle.json_or_empty(put.text)
    if put.status_code == 201:
        log.info("created sale %s for %s: %s", spec.sku, spec.scenario, json.dumps(spec.body()))
        RECORDER.write(spec.note("created"))
        return
    if put.status_code == 400:
        spec.skip(f"the gateway answered 400 to {_wanted(spec)} ({answer.get('message', put.text[:160])}): "
                  f"it does not support {_feature(spec)} yet")
        RECORDER.write(spec.note("unsupported", spec.skip_reason))
        return
    if put.status_code == 409:
        adopt_lifecycle_sale(host, spec)
        RECORDER.write(spec.note("exists" if spec.active else "failed", spec.skip_reason))
        return
    spec.skip(f"PUT {url}: {put.status_code} {put.text[:160]}")
    RECORDER.write(spec.note("failed", spec.skip_reason))


def adopt_lifecycle_sale(host: str, spec: SaleSpec) -> None:
    """Take the existing sale's settings (a worker; or a SKU created before). Without the
    window or deadline the scenario needs, it is skipped."""
    url = f"{host.rstrip('/')}/admin/sales/{spec.sku}"
    got = requests.get(url, headers=_admin_headers(), timeout=10) if CONFIG.admin_token else None
    if got is None or got.status_code != 200:
        status = "no admin token" if got is None else f"{got.status_code}"
        spec.skip(f"sale {spec.sku} is not there ({status}; the master could not create it: see its log)")
        return
    sale = got.json()
    spec.stock = int(sale.get("stock", spec.stock))
    spec.shards = len(sale.get("shards", ())) or spec.shards
    spec.starts_at_ms = records.epoch_ms(sale.get("starts_at")) or spec.starts_at_ms
    ttl = sale.get("payment_ttl")
    spec.payment_ttl = int(ttl) if isinstance(ttl, int) and ttl > 0 else spec.payment_ttl
    room = sale.get("waiting_room")
    if isinstance(room, dict) and room.get("admit_rate"):
        spec.admit_rate = float(room["admit_rate"])
    if spec.role in ("early", "queue") and "starts_at" not in sale:
        spec.skip(f"sale {spec.sku} exists without starts_at")
    elif spec.role == "queue" and not (isinstance(room, dict) and room.get("admit_rate")):
        spec.skip(f"sale {spec.sku} exists without a waiting room")
    elif spec.role == "abandon" and "payment_ttl" not in sale:
        spec.skip(f"sale {spec.sku} exists without payment_ttl")


def _selected(environment: Environment, name: str) -> bool:
    return any(cls.__name__ == name for cls in environment.user_classes)


def orders_service_missing() -> list[str]:
    """What Abandoners lacks to pay and cancel at the orders service."""
    return [name for name, value in (("--lt-orders-url", CONFIG.orders_url),
                                     ("SECKILL_ORDERS_TOKEN", CONFIG.orders_token),
                                     ("SECKILL_PAYMENT_SECRET", CONFIG.payment_secret)) if not value]


def set_up_lifecycle_sale(environment: Environment, host: str, spec: SaleSpec, worker: bool) -> None:
    if not _selected(environment, spec.scenario):
        spec.active = False
    elif spec.role == "abandon" and orders_service_missing():
        spec.skip(f"it pays and cancels at the orders service: set {', '.join(orders_service_missing())}")
        if not worker:
            RECORDER.write(spec.note("failed", spec.skip_reason))
    elif worker:
        adopt_lifecycle_sale(host, spec)
    else:
        create_lifecycle_sale(host, spec)


@events.test_start.add_listener
def _test_start(environment: Environment, **_kw: Any) -> None:
    host = environment.host or ""
    if environment.parsed_options is not None:
        _configure(environment.parsed_options)  # a worker gets the master's options with the spawn
    worker = isinstance(environment.runner, WorkerRunner)
    try:
        ensure_sale(host, create=not worker)
        sales = {"main": main_sale(), **lifecycle_sales(time.time())}
        environment.lt_sales = sales  # type: ignore[attr-defined]
        for spec in (sales["early"], sales["abandon"], sales["queue"]):
            set_up_lifecycle_sale(environment, host, spec, worker)
    except (requests.RequestException, RuntimeError, KeyError, ValueError) as exc:
        log.error("cannot set up sale %s at %s: %s", CONFIG.sku, host, exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn_later(0.1, environment.runner.quit)  # not from inside its own start()


def sale_sold_out(client: Any, name: str) -> bool:
    with client.get(f"/admin/sales/{CONFIG.sku}", headers=_admin_headers(), name=name,
                    catch_response=True) as resp:
        if resp.status_code in (429, 503) and resp.headers.get("Retry-After"):
            resp.success()  # overloaded, as the contract allows everywhere: not known yet
            return False
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
    retry_after: float | None = None


class Buyer(FastHttpUser):
    """Shared machinery; not run itself."""

    abstract = True
    concurrency = MAX_CONCURRENCY
    scenario = "Buyer"
    role = "main"  # which sale of the run it buys from
    allowed: frozenset = frozenset()

    def wait_time(self) -> float:
        return random.uniform(0, CONFIG.wait)

    @property
    def sale(self) -> SaleSpec:
        return sales_of(self.environment)[self.role]

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

    def buy(self, user_id: int, key: str, quantity: int = 1, allowed: frozenset | None = None,
            sale: SaleSpec | None = None, name: str | None = None,
            extra_headers: dict[str, str] | None = None) -> Answer | None:
        allowed = self.allowed if allowed is None else allowed
        sale = sale or self.sale
        headers = {**self.identity(user_id), "X-Idempotency-Key": key, "Content-Type": "application/json",
                   **(extra_headers or {})}
        with self.client.post(f"/api/seckill/{sale.sku}", data=json.dumps({"quantity": quantity}),
                              headers=headers, name=name or f"/api/seckill/[sku] {self.scenario}",
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
                OUTCOMES[(self.scenario, sale.sku, status, "-")] += 1
                return None
            OUTCOMES[(self.scenario, sale.sku, status, str(code))] += 1
            headers_in = resp.headers or {}
            replayed = (headers_in.get("Idempotent-Replayed") or "").lower() == "true"
            answer = Answer(status, code, body, replayed, lifecycle.retry_after(headers_in.get("Retry-After")))
            problem = self.problem(answer, headers_in, allowed, user_id, key, quantity, sale)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
            return answer

    def problem(self, answer: Answer, headers: Any, allowed: frozenset, user_id: int, key: str, quantity: int,
                sale: SaleSpec) -> str | None:
        status, code, body = answer.status, answer.code, answer.body
        if (status, code) == OK:  # recorded whether allowed here or not
            problem = self.admitted(body, user_id, key, quantity, answer.replayed, 200, sale)
            if problem or OK in allowed:
                return problem or self.timing_problem(answer, sale)
        if (status, code) == CONFLICT and CONFLICT not in allowed:
            original = body.get("original")
            if isinstance(original, dict) and original.get("status") == 200:
                self.admitted(original.get("body") or {}, user_id, key, quantity, True, 409, sale)
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
                return self.admitted(original["body"], user_id, key, quantity, True, 409, sale)
        return self.timing_problem(answer, sale)

    def timing_problem(self, answer: Answer, sale: SaleSpec) -> str | None:
        """Checks of an answer against the sale's window (EarlyCrowd); none here."""
        return None

    def admitted(self, body: dict, user_id: int, key: str, quantity: int, replayed: bool,
                 status: int, sale: SaleSpec) -> str | None:
        order_no, units = body.get("order_no"), body.get("units")
        if not isinstance(order_no, str) or not order_no or not isinstance(units, list):
            return f"admitted without order_no/units: {json.dumps(body)[:160]}"
        RECORDER.write(records.admitted_entry(sku=sale.sku, order_no=order_no, units=units, user_id=user_id,
                                              key=key, status=status, replayed=replayed,
                                              scenario=self.scenario, ts=time.time()))
        if body.get("sku") != sale.sku or body.get("user_id") != user_id:
            return f"order {order_no} names sku {body.get('sku')} user {body.get('user_id')}"
        if len(units) != quantity or len(set(units)) != quantity:
            return f"order {order_no}: {len(units)} units {units} for quantity {quantity}"
        bad = [u for u in units if not isinstance(u, int) or not 1 <= u <= sale.stock]
        if bad:
            return f"order {order_no}: units {bad} outside 1..{sale.stock}"
        if sale.payment_ttl:
            return None  # units come back and are sold again: the verifier checks them
        for unit in units:
            holder = UNITS_SEEN.setdefault((sale.sku, unit), order_no)
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


class Idler(Buyer):
    """A lifecycle scenario whose sale this gateway cannot hold: it waits, quietly."""

    abstract = True

    def idle(self) -> None:
        gevent.sleep(1.0)


class EarlyCrowd(Idler):
    """Thousands of buyers polling before ``starts_at``, honouring ``Retry-After``, then
    buying at the start: nothing admitted early, all the stock sold after."""

    fixed_count = 10
    scenario = "EarlyCrowd"
    role = "early"
    allowed = frozenset({OK, SOLD_OUT, ALREADY, NOT_STARTED})
    probe_allowed = frozenset({KEY_REUSED, SOLD_OUT, ALREADY})

    def on_start(self) -> None:
        self.done = False

    @task
    def crowd(self) -> None:
        if self.done or not self.sale.active:
            self.idle()
            return
        pool = gevent.pool.Pool(max(1, CONFIG.early_buyers))
        pool.map(lambda _: self.one_buyer(), range(CONFIG.early_buyers))
        self.done = True

    def one_buyer(self) -> None:
        user_id = self.random_user()
        key = self.new_key(user_id)
        if key is None:
            return
        for _ in range(MAX_POLLS):
            answer = self.buy(user_id, key)
            if answer is None:
                return
            if (answer.status, answer.code) == NOT_STARTED or (answer.status, answer.code) in OVERLOAD:
                gevent.sleep(lifecycle.poll_delay(answer.retry_after))
                continue
            if answer.status == 200:
                self.probe_key(user_id, key)
            return
        self.check_failed("EarlyCrowd start", f"user {user_id}: still not admitted after {MAX_POLLS} polls")

    def probe_key(self, user_id: int, key: str) -> None:
        """The key that bought here, sent to the main sale: it must not buy there too."""
        main = sales_of(self.environment)["main"]
        self.buy(user_id, key, allowed=self.probe_allowed, sale=main, name="/api/seckill/[sku] EarlyCrowd key probe")

    def timing_problem(self, answer: Answer, sale: SaleSpec) -> str | None:
        if sale.role != "early":
            return None
        status, code, body = answer.status, answer.code, answer.body
        now_ms = time.time() * 1000
        if (status, code) == NOT_STARTED:
            starts = records.epoch_ms(body.get("starts_at"))
            if answer.retry_after is None:
                return "403 SALE_NOT_STARTED without Retry-After"
            if starts is None:
                return f"403 SALE_NOT_STARTED without starts_at: {json.dumps(body)[:160]}"
            sale.starts_at_ms = sale.starts_at_ms or starts
            # By the gateway's own clock when it says (a request that queued past the
            # start was still answered before it); else by ours, with some slack.
            server_ms = records.epoch_ms(body.get("server_time"))
            if server_ms is not None and server_ms >= starts:
                return f"403 SALE_NOT_STARTED at server_time {server_ms}, not before starts_at {starts}"
            if server_ms is None and now_ms > starts + START_SLACK_MS:
                return f"403 SALE_NOT_STARTED {(now_ms - starts) / 1000:.1f} s after starts_at"
        if status == 200 and sale.starts_at_ms and now_ms < sale.starts_at_ms - START_SLACK_MS:
            return f"200 OK {(sale.starts_at_ms - now_ms) / 1000:.1f} s before starts_at"
        return None


class Abandoners(Idler):
    """Buyers of a sale with a payment deadline: some pay, some never pay (the orders
    service expires the order and releases its units, which others buy), some pay too
    late (409 ORDER_CLOSED, due for refund), some cancel."""

    fixed_count = 10
    scenario = "Abandoners"
    role = "abandon"
    allowed = COMMON

    def wait_time(self) -> float:
        return random.uniform(0, CONFIG.abandon_wait)

    def on_start(self) -> None:
        self.followups = gevent.pool.Group()
        self.mix = lifecycle.Mix.parse(CONFIG.abandon_mix)

    def on_stop(self) -> None:
        self.followups.kill(block=False)

    @task
    def buy_and_decide(self) -> None:
        if not self.sale.active:
            self.idle()
            return
        user_id = self.random_user()
        key = self.new_key(user_id)
        answer = self.buy(user_id, key) if key is not None else None
        if answer is not None and answer.status == 200:
            self.followups.spawn(self.follow_up, answer.body["order_no"], self.mix.choose())

    # at the orders service

    @property
    def orders_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CONFIG.orders_token}"}

    def orders(self, path: str) -> str:
        return CONFIG.orders_url.rstrip("/") + path

    def follow_up(self, order_no: str, fate: str) -> None:
        order = self.delivered(order_no)
        if order is None or fate == lifecycle.ABANDON:
            return
        if fate == lifecycle.PAY:
            self.pay(order, late=False)
        elif fate == lifecycle.CANCEL:
            self.cancel(order)
        elif fate == lifecycle.LATE:
            self.pay_late(order)

    def get_order(self, order_no: str) -> tuple[int, dict[str, Any]]:
        with self.client.get(self.orders(f"/orders/{order_no}"), headers=self.orders_auth,
                             name="orders: GET /orders/[no]", catch_response=True) as resp:
            data = lifecycle.json_or_empty(resp.text)
            if resp.status_code in (200, 404):
                resp.success()  # 404: not delivered yet
            else:
                resp.failure(f"{resp.status_code}: {(resp.text or '')[:160]}")
            return resp.status_code, data

    def delivered(self, order_no: str) -> dict[str, Any] | None:
        """The order at the orders service, once the relay delivered it."""
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            status, data = self.get_order(order_no)
            if status == 200:
                return data
            if status != 404:
                return None
            gevent.sleep(0.25)
        self.check_failed("Abandoners delivery", f"order {order_no} not delivered in {DELIVERY_TIMEOUT:.0f} s")
        return None

    def pay(self, order: dict[str, Any], *, late: bool) -> str | None:
        """Send a signed notice; the answer's code (None when there was none)."""
        notify_id = f"lt-{uuid.uuid4().hex}"
        body, headers = lifecycle.notice(CONFIG.payment_secret, notify_id, order["order_no"],
                                         int(order["amount"]), time.time())
        name = f"orders: POST /payments/notify {'late' if late else 'on time'}"
        with self.client.post(self.orders("/payments/notify"), data=body, headers=headers, name=name,
                              catch_response=True) as resp:
            data = lifecycle.json_or_empty(resp.text)
            code = str(data.get("code", "-"))
            RECORDER.write(records.payment_entry(
                sku=self.sale.sku, order_no=order["order_no"], notify_id=notify_id, amount=int(order["amount"]),
                late=late, status=resp.status_code, code=code, state=str(data.get("state") or ""),
                scenario=self.scenario, ts=time.time()))
            problem = self.payment_problem(order, resp.status_code, code, data, late)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
        return code

    def payment_problem(self, order: dict[str, Any], status: int, code: str, data: dict[str, Any],
                        late: bool) -> str | None:
        if late:
            return None if (status, code) == (409, "ORDER_CLOSED") else \
                f"late payment answered {status} {code}, not 409 ORDER_CLOSED"
        if (status, code) == (200, "OK"):
            return None if data.get("state") == "paid" else f"paid, but the order reads {data.get('state')}"
        past_deadline = order.get("pay_by") is not None and time.time() * 1000 >= int(order["pay_by"])
        if (status, code) == (409, "ORDER_CLOSED") and past_deadline:
            return None  # delivered so late that the deadline had passed
        return f"payment answered {status} {code}: {json.dumps(data)[:160]}"

    def pay_late(self, order: dict[str, Any]) -> None:
        """Wait past the deadline until the order reads expired, pay, and find the
        payment among the refunds."""
        if order.get("pay_by") is None:
            self.check_failed("Abandoners deadline", f"order {order['order_no']} has no pay_by: the sale's "
                              "payment_ttl did not reach the orders service")
            return
        pay_by_s = int(order["pay_by"]) / 1000
        gevent.sleep(max(0.0, pay_by_s - time.time()) + 0.5)
        while True:
            status, data = self.get_order(order["order_no"])
            if status == 200 and data.get("state") != "pending":
                break
            if time.time() > pay_by_s + EXPIRY_TIMEOUT:
                self.check_failed("Abandoners expiry", f"order {order['order_no']} still {data.get('state')} "
                                  f"{EXPIRY_TIMEOUT:.0f} s after its pay_by")
                return
            gevent.sleep(0.5)
        if data.get("state") != "expired":
            self.check_failed("Abandoners expiry", f"order {order['order_no']} reads {data.get('state')} after "
                              "its deadline, unpaid: expected expired")
            return
        if self.pay(order, late=True) == "ORDER_CLOSED":
            self.find_refund(order["order_no"])

    def find_refund(self, order_no: str) -> None:
        with self.client.get(self.orders("/refunds"), headers=self.orders_auth, name="orders: GET /refunds",
                             catch_response=True) as resp:
            refunds = lifecycle.json_or_empty(resp.text).get("refunds") or []
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {(resp.text or '')[:160]}")
            elif not any(r.get("order_no") == order_no for r in refunds if isinstance(r, dict)):
                resp.failure(f"the late payment for {order_no} is not listed as due for refund")
            else:
                resp.success()

    def cancel(self, order: dict[str, Any]) -> None:
        order_no = order["order_no"]
        with self.client.post(self.orders(f"/orders/{order_no}/cancel"), headers=self.orders_auth,
                              name="orders: POST /orders/[no]/cancel", catch_response=True) as resp:
            data = lifecycle.json_or_empty(resp.text)
            code = str(data.get("code", "-"))
            RECORDER.write(records.cancel_entry(sku=self.sale.sku, order_no=order_no, status=resp.status_code,
                                                code=code, scenario=self.scenario, ts=time.time()))
            if resp.status_code == 200 and data.get("state") == "cancelled":
                resp.success()
            elif resp.status_code == 409 and data.get("state") == "expired":
                resp.success()  # the deadline passed first
            else:
                resp.failure(f"cancel answered {resp.status_code} {code} ({data.get('state')})")


RECENT_PASSES: list[tuple[int, str]] = []  # (user, pass) of recent admissions in this process
STATS_EVERY = 0.5  # seconds between two reads of the room's counts at the admin API


class RoomWatch:
    """One greenlet per process reading ``GET /admin/sales/{sku}``'s waiting-room counts
    while this process's crowds are in the room: the gateway's own count of admissions
    for the verifier and the picture (``queue_stats`` lines)."""

    crowds = 0
    started = False
    silent = False  # the gateway gives no counts: stop asking




class QueueCrowd(Idler):
    """A crowd in a sale's waiting room: joins before (and some after) the start, polls
    when told, buys with its pass once admitted; a few try without one."""

    fixed_count = 10
    concurrency = 64  # connections per Locust user: its buyers share them
    scenario = "QueueCrowd"
    role = "queue"
    allowed = frozenset({OK, SOLD_OUT, ALREADY})  # a purchase with the buyer's own pass
    refused = frozenset({PASS_REQUIRED, SOLD_OUT, SALE_ENDED, NOT_STARTED})  # without one

    def on_start(self) -> None:
        self.done = False

    @task
    def crowd(self) -> None:
        if self.done or not self.sale.active or self.sale.starts_at_ms is None:
            self.idle()
            return
        users = max(1, QueueCrowd.fixed_count)
        early = queueclient.share(CONFIG.queue_crowd, users)
        late = queueclient.share(CONFIG.queue_late, users)
        plan = [False] * early + [True] * late
        RoomWatch.crowds += 1
        if not RoomWatch.started and CONFIG.admin_token:
            RoomWatch.started = True
            gevent.spawn(self.watch_room)
        try:
            pool = gevent.pool.Pool(max(1, len(plan)))
            pool.map(lambda is_late: self.one_buyer(is_late, random.random() < CONFIG.queue_sneak), plan)
        finally:
            RoomWatch.crowds -= 1
        self.done = True

    def watch_room(self) -> None:
        sku = self.sale.sku
        while RoomWatch.crowds > 0 and not RoomWatch.silent:
            t0 = time.time()
            with self.client.get(f"/admin/sales/{sku}", headers=_admin_headers(), catch_response=True,
                                 name="/admin/sales/[sku] QueueCrowd counts") as resp:
                ts = time.time()
                room = lifecycle.json_or_empty(resp.text).get("waiting_room")
                if resp.status_code == 200 and isinstance(room, dict):
                    resp.success()
                    if queueclient.integer(room.get("admitted")) is None:
                        log.warning("GET /admin/sales/%s gives no waiting-room counts (%s): the run records "
                                    "the clients' view only", sku, json.dumps(room)[:120])
                        RoomWatch.silent = True
                    else:
                        sold_out = room.get("sold_out")
                        RECORDER.write(records.queue_stats_entry(
                            sku=sku, t0=t0, ts=ts, admitted=queueclient.integer(room.get("admitted")),
                            joined=queueclient.integer(room.get("joined")),
                            units_left=queueclient.integer(room.get("units_left")),
                            sold_out=sold_out if isinstance(sold_out, bool) else None,
                            server_s=records.http_date_s((resp.headers or {}).get("Date"))))
                elif resp.status_code in (429, 503):
                    resp.success()  # overloaded: ask again
                else:
                    resp.failure(f"{resp.status_code}: {(resp.text or '')[:120]}")
            gevent.sleep(STATS_EVERY)

    # one buyer's way through the room

    def one_buyer(self, late: bool, sneaky: bool) -> None:
        starts = (self.sale.starts_at_ms or 0) / 1000
        if late:
            gevent.sleep(max(0.0, starts - time.time()) + random.uniform(0.3, max(0.4, CONFIG.queue_late_window)))
        else:
            gevent.sleep(random.uniform(0, max(0.2, starts - time.time() - 5.0)))  # all in well before the start
        user_id = random.randrange(1 << 40, 1 << 62)  # one place per buyer: ids never drawn twice
        ticket: str | None = None
        last_position: int | None = None
        sneaked = False
        deadline = time.monotonic() + MAX_QUEUE_WAIT
        while time.monotonic() < deadline:
            reply = self.queue_call(user_id, ticket, last_position)
            if reply is None:
                return
            if reply.pair in OVERLOAD:
                gevent.sleep(lifecycle.poll_delay(reply.retry_after))
                continue
            if reply.pair == ADMITTED:
                self.admitted_buyer(user_id, ticket, str(reply.body.get("pass") or ""), sneaky)
                return
            if reply.pair != QUEUED:
                return  # 410: sold out or over (or a failure already counted)
            ticket = str(reply.body["ticket"])
            last_position = reply.body.get("position", last_position)
            if sneaky and not sneaked and time.time() > starts + 0.5:
                sneaked = True
                self.try_without_pass(user_id, ticket)
            told = reply.retry_after if reply.retry_after is not None else 1.0
            gevent.sleep(max(told, CONFIG.queue_poll_min) * random.uniform(1.0, 1.1))
        self.check_failed("QueueCrowd wait", f"user {user_id} still queued after {MAX_QUEUE_WAIT:.0f} s")

    def admitted_buyer(self, user_id: int, ticket: str | None, pass_: str, sneaky: bool) -> None:
        if sneaky:
            others = [p for u, p in RECENT_PASSES[-50:] if u != user_id]
            if others:
                self.attempt(user_id, ticket, random.choice(others), records.PASS_OTHER)
        RECENT_PASSES.append((user_id, pass_))
        del RECENT_PASSES[:-200]
        self.attempt(user_id, ticket, pass_, records.PASS_OWN)
        if sneaky and ticket is not None:  # once more: still admitted (or over), never back in line
            self.queue_call(user_id, ticket, None, allowed={ADMITTED, SOLD_OUT, SALE_ENDED})

    def try_without_pass(self, user_id: int, ticket: str) -> None:
        self.attempt(user_id, ticket, None, records.PASS_NONE)
        self.attempt(user_id, ticket, f"{int(time.time()) + 60:x}.{uuid.uuid4().hex[:22]}", records.PASS_FORGED)

    def attempt(self, user_id: int, ticket: str | None, pass_: str | None, kind: str) -> None:
        """A purchase carrying ``pass_`` (``kind`` says whose); recorded with its answer."""
        own = kind == records.PASS_OWN
        for _ in range(5):
            key = self.new_key(user_id)
            if key is None:
                return
            t0 = time.time()
            answer = self.buy(user_id, key, allowed=self.allowed if own else self.refused,
                              name=f"/api/seckill/[sku] QueueCrowd pass {kind}",
                              extra_headers={"X-Queue-Pass": pass_} if pass_ else None)
            if answer is None:
                return
            RECORDER.write(records.queue_buy_entry(
                sku=self.sale.sku, user_id=user_id, pass_kind=kind, status=answer.status, code=answer.code,
                ts=time.time(), t0=t0, ticket=ticket, order_no=answer.body.get("order_no"),
                scenario=self.scenario))
            if (answer.status, answer.code) not in OVERLOAD:
                return
            gevent.sleep(lifecycle.poll_delay(answer.retry_after))

    def queue_call(self, user_id: int, ticket: str | None, last_position: int | None,
                   allowed: set[tuple[int, str]] | None = None) -> queueclient.QueueReply | None:
        """Join (no ticket yet) or poll; checks the answer against the contract and
        records it."""
        sku = self.sale.sku
        step = records.JOIN if ticket is None else records.POLL
        path = f"/api/queue/{sku}" if ticket is None else f"/api/queue/{sku}/{ticket}"
        name = "/api/queue/[sku] join" if ticket is None else "/api/queue/[sku]/[ticket] poll"
        call = self.client.post if ticket is None else self.client.get
        t0 = time.time()
        with call(path, headers=self.identity(user_id), name=name, catch_response=True) as resp:
            ts = time.time()
            status = resp.status_code
            if not status:
                resp.failure(f"no answer: {getattr(resp, 'error', None)!r}")
                return None
            try:
                body = resp.json()
                code = str(body["code"])
            except (ValueError, TypeError, KeyError):
                resp.failure(f"{status}: not JSON with a code: {(resp.text or '')[:120]!r}")
                OUTCOMES[(f"{self.scenario} {step}", sku, status, "-")] += 1
                return None
            OUTCOMES[(f"{self.scenario} {step}", sku, status, code)] += 1
            headers = resp.headers or {}
            reply = queueclient.QueueReply(status, code, body, lifecycle.retry_after(headers.get("Retry-After")))
            position = body.get("position")
            RECORDER.write(records.queue_entry(
                sku=sku, user_id=user_id, step=step, status=status, code=code, t0=t0, ts=ts,
                ticket=body.get("ticket") or ticket, position=position if isinstance(position, int) else None,
                eta_s=queueclient.number(body.get("eta_s")), units_left=queueclient.integer(body.get("units_left")),
                retry_after=reply.retry_after, pass_=body.get("pass"),
                server_s=records.http_date_s(headers.get("Date")), scenario=self.scenario))
            problem = queueclient.queue_problem(reply, headers, ticket, last_position, allowed)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
            return reply
