"""Chaos: purchases, unit moves, compensations, sale creates and deletes, all through
fault-injecting proxies, then every invariant of the contract checked.

    python -m loadtest.chaos --seed 7 [--steps 120] [--redis standalone|cluster|both] [--trace]
    python -m loadtest.chaos --duration 300 [--seed 1000]    # seeds 1000, 1001, ... for 300 s
    python -m loadtest.chaos --seed 7 --skip reuse           # the same plan, without one operation

It starts its own Redis (a private ``redis-server``, or a 3+3-node local Cluster), puts a
:mod:`devtools.faultproxy` proxy in front of every node (on a Cluster the nodes announce
the proxies' ports, so every client goes through them) and runs the gateway in this
process (``gateway.app.create_app``, over its HTTP API, with a short
``SECKILL_REDIS_TIMEOUT``: a reply held past it makes the client give up on a command
that did run, and redis-py may send it again).

A run is a sequence of *steps*. Each step runs one to six operations at once (most
often on the same sale, to make them race) and maybe injects one fault:

operations  ``buy`` (a new client key), ``resend`` (an earlier key again, same request),
            ``reuse`` (an earlier key on another sale: must be refused, 422), ``move``
            (``Rebalancer.move`` between two shards), ``compensate`` (the relay's path
            for a refused delivery: ``Returns.reject``), ``create`` and ``delete`` (the
            admin API, on the sales made for churn), ``sweep`` (finish half-done moves);
faults      ``slow`` (the next replies late, but within the timeout), ``slow_command``
            (the replies to one script or command late, within the timeout: the
            windows races need grow), ``late`` (the next replies late past the timeout),
            ``late_command`` (the reply to one script or command late past the timeout:
            redis-py resends it), ``cut`` (the reply to one script or command held, then
            the connection reset: it ran, the client hears a connection error),
            ``reset`` (every connection reset, at a random moment), ``pause`` (a node's
            proxy stops forwarding for up to 1.2 s); each on the node that owns a key
            the step uses.

Every answer is kept (what the client was told). Then the run settles: faults cleared,
admin calls that timed out sent again (a PUT or DELETE must finish what a failed one
left), failed compensations redone (the relay retries them), half-done moves swept,
every key that only ever got 503 sent again (the contract: the same key returns the
real outcome). Then the checks:

* ``loadtest.verify.check`` on every sale that exists (units conserved, none twice,
  per-user limit, one key one outcome, every 200 an order), the 200s it is given being
  those of the sale's current creation;
* the run's own ledger: one outcome per key across all sales (and never a second
  purchase with a key used on another sale), 200s whose order vanished although no
  delete came after, units twice among the 200s, users over the limit, 500s, a 404
  for a sale that exists, a PUT answered ``SALE_EXISTS`` for a sale that did not exist,
  a key whose outcome stays unknown;
* Redis itself: order records that no existing sale lists (orphans of a delete), keys
  left behind by a deleted sale, shards of another creation of the sale;
* no false ``SOLD_OUT``: fresh buyers (first in the shards that hold nothing) buy until
  the sale is empty; while any unit is free each of them must get 200; then the
  verifier again, expecting every unit sold.

Determinism: the seed fixes the sequence of steps (operations, their arguments, the
faults, where and when they strike); :func:`plan` draws them from
``random.Random(seed)`` alone, never from what happened. What happens still depends on
timing (which of two racing calls runs first, when a pause ends), so a replay runs the
same steps but may not interleave them the same way; a defect that needs a narrow race
may take a few replays (or neighbouring seeds) to show again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import random
import secrets
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from redis.crc import key_slot

from devtools.faultproxy import ProxiedCluster, ProxyFleet, ProxyHandle
from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis
from gateway.admission.moves import Rebalancer
from gateway.admission.returns import Returns
from gateway.admission.snapshot import read_sale, transfers_of
from gateway.app import Gateway, create_app
from gateway.config import Settings
from gateway.http.context import GATEWAY
from gateway.models import Order, Sale
from gateway.store.connection import is_redis_failure
from gateway.store.keys import shard_of_order
from gateway.store.scripts import Script
from gateway.store.scripts.compensate import Compensated
from gateway.store.store import Store
from loadtest.verify import Snapshot, Violation, check, collect_stable

__all__ = ["SALES", "ChaosConfig", "ChaosReport", "Fault", "Op", "Problem", "Step", "Target",
           "cluster_target", "plan", "run_chaos", "standalone_target"]

log = logging.getLogger("loadtest.chaos")
T = TypeVar("T")

REDIS_TIMEOUT = 0.3  # the gateway's socket timeout: a reply later than this is given up on
REQUEST_TIMEOUT = 2.0
HELD = 30.0  # a reply held this long never comes: the connection is reset first
DEFAULT_STEPS = 120
SETTLE_TRIES = 40  # sends of one key, or one admin call, while settling
RELAY_TRIES = 8  # a compensation is tried this often within its step, as the relay would
USERS = 300  # buyers are drawn from 1..USERS: the per-user limit is met often
FRESH_USERS = 1_000_000  # drain buyers: user ids from here on, never drawn by a step


# -- the sales ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SaleSpec:
    name: str
    stock: int
    shard_choices: tuple[int, ...]  # a creation takes one of these shard counts
    per_user_limit: int
    churn: bool  # created and deleted during the run; else created once, before it


# Small stocks over many shards: shards run short (units move), sales sell out and come
# back (compensations), so the sold-out decision is made often and under faults.
SALES = (
    SaleSpec("a", 24, (8,), 1, churn=False),
    SaleSpec("b", 60, (16,), 2, churn=False),
    SaleSpec("c", 12, (4,), 1, churn=True),
    SaleSpec("d", 30, (5,), 2, churn=True),
)
LIVE = tuple(i for i, s in enumerate(SALES) if not s.churn)
CHURN = tuple(i for i, s in enumerate(SALES) if s.churn)


# -- the plan: a function of the seed alone ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # buy, resend, reuse, move, compensate, create, delete, sweep
    sale: int  # index into SALES
    user: int = 0
    quantity: int = 1
    pick: float = 0.0  # resend/reuse: which earlier key; compensate: which order; move: donor
    pick2: float = 0.0  # move: receiver
    count: int = 0  # move: units wanted; create: which shard count
    after: float = 0.0  # seconds after the step starts

    def describe(self) -> str:
        sale = SALES[self.sale].name
        late = f"+{self.after:.2f}s" if self.after else ""
        if self.kind == "buy":
            return f"buy({sale} u{self.user} q{self.quantity}){late}"
        if self.kind in ("resend", "compensate"):
            return f"{self.kind}({self.pick:.2f}){late}"
        if self.kind == "reuse":
            return f"reuse({self.pick:.2f}->{sale}){late}"
        if self.kind == "move":
            return f"move({sale} {self.pick:.2f}->{self.pick2:.2f} x{self.count}){late}"
        if self.kind == "create":
            return f"create({sale} shards#{self.count}){late}"
        return f"{self.kind}({sale}){late}"


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str  # none, slow, late, late_command, reset, pause
    role: str = ""  # whose node: "op" (the step's first operation's key), "flag", "sale", "any"
    command: str = ""  # late_command: a script name (see SCRIPTS) or a Redis command
    count: int = 1  # replies held
    seconds: float = 0.0  # how late (slow, late, late_command) or how long (pause)
    at: float = 0.0  # seconds after the step's operations start
    pick: float = 0.0  # role "any": which node

    def describe(self) -> str:
        if self.kind == "none":
            return "-"
        what = {"slow": f"slow x{self.count}", "late": f"late x{self.count}",
                "late_command": f"late {self.command} x{self.count}",
                "slow_command": f"slow {self.command} x{self.count}",
                "cut": f"cut {self.command} x{self.count}", "reset": "reset",
                "pause": "pause"}[self.kind]
        return f"{what} {self.seconds:.2f}s @{self.at:.2f}s on {self.role}"


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    ops: tuple[Op, ...]
    fault: Fault

    def describe(self) -> str:
        return f"step {self.index} [{self.fault.describe()}] " + " ".join(o.describe() for o in self.ops)


SCRIPTS = ("purchase", "transfer_out", "transfer_in", "transfer_done", "compensate", "create_shard",
           "claim_sale", "sale_state", "close_shard", "claim_key", "mark_sold_out", "count_return")
FAULT_COMMANDS = (  # (command, weight): whose replies a late_command, slow_command or cut holds
    ("transfer_out", 6), ("transfer_in", 3), ("purchase", 3), ("compensate", 3),
    ("create_shard", 3), ("claim_sale", 4), ("close_shard", 3), ("sale_state", 2),
    ("count_return", 2), ("mark_sold_out", 1), ("DEL", 3), ("HMGET", 2), ("HGETALL", 1),
)
OP_WEIGHTS = (("buy", 40), ("resend", 12), ("reuse", 3), ("move", 9), ("compensate", 14),
              ("create", 6), ("delete", 5), ("sweep", 2))
FAULT_WEIGHTS = (("none", 24), ("slow", 7), ("slow_command", 12), ("late", 11),
                 ("late_command", 20), ("cut", 8), ("reset", 8), ("pause", 10))


def _weighted(rng: random.Random, table: Sequence[tuple[str, int]]) -> str:
    return rng.choices([name for name, _ in table], [weight for _, weight in table])[0]


def _sale(rng: random.Random) -> int:
    return rng.choices(range(len(SALES)), (4, 3, 2, 2))[0]


def _op(rng: random.Random, sale: int) -> Op:
    kind = _weighted(rng, OP_WEIGHTS)
    # Most operations start with the step; some a little later, into what the others
    # are doing (a compensation in the middle of a refill, a purchase in a delete).
    after = rng.uniform(0, 0.4) if rng.random() < 0.3 else 0.0
    if kind in ("create", "delete"):
        if not SALES[sale].churn:
            sale = CHURN[rng.randrange(len(CHURN))]
        return Op(kind, sale, count=rng.randrange(8), after=after)
    spec = SALES[sale]
    if kind == "buy":
        quantity = 1 if rng.random() < 0.75 else rng.randint(1, spec.per_user_limit)
        return Op(kind, sale, user=rng.randint(1, USERS), quantity=quantity, after=after)
    if kind == "move":
        return Op(kind, sale, pick=rng.random(), pick2=rng.random(), count=rng.randint(1, 6),
                  after=after)
    return Op(kind, sale, pick=rng.random(), after=after)


def _fault(rng: random.Random) -> Fault:
    kind = _weighted(rng, FAULT_WEIGHTS)
    role = rng.choices(("op", "flag", "sale", "any"), (6, 2, 1, 1))[0]
    pick = rng.random()
    if kind == "none":
        return Fault("none")
    if kind == "slow":  # late, but within the timeout: widens race windows, no error
        return Fault(kind, role, count=rng.randint(1, 4), seconds=rng.uniform(0.05, 0.25), pick=pick)
    if kind == "late":
        return Fault(kind, role, count=rng.randint(1, 3), seconds=rng.uniform(0.4, 1.0),
                     at=rng.choice((0.0, 0.0, rng.uniform(0, 0.05))), pick=pick)
    if kind == "late_command":
        command = _weighted(rng, FAULT_COMMANDS)
        return Fault(kind, role, command, count=rng.randint(1, 2), seconds=rng.uniform(0.4, 1.0),
                     pick=pick)
    if kind == "slow_command":  # every reply to it slow for the step: a read or a script
        command = _weighted(rng, FAULT_COMMANDS)
        return Fault(kind, role, command, count=rng.randint(1, 40), seconds=rng.uniform(0.05, 0.25),
                     pick=pick)
    if kind == "cut":  # the command runs, its reply is held, the connection is reset
        command = _weighted(rng, FAULT_COMMANDS)
        return Fault(kind, role, command, count=rng.randint(1, 3), seconds=rng.uniform(0.02, 0.25),
                     pick=pick)
    if kind == "reset":
        return Fault(kind, role, at=rng.uniform(0, 0.15), pick=pick)
    return Fault(kind, role, seconds=rng.uniform(0.2, 1.2), at=rng.uniform(0, 0.1), pick=pick)


def plan(seed: int) -> Iterator[Step]:
    """The steps of seed ``seed``, without end: drawn from ``random.Random(seed)`` only,
    so a run of N steps replays as the first N steps of any longer run."""
    rng = random.Random(seed)
    for index in itertools.count():
        focus = _sale(rng)
        ops = tuple(_op(rng, focus if rng.random() < 0.7 else _sale(rng))
                    for _ in range(rng.choice((1, 1, 2, 2, 3, 4, 6))))
        yield Step(index, ops, _fault(rng))


# -- where Redis is: behind the proxies ----------------------------------------------------------

@dataclass
class Target:
    """A Redis deployment behind fault proxies: the URL the gateway connects to, the
    proxies in front of the primaries (where faults go) and which one serves a key."""

    mode: str
    url: str
    proxies: list[ProxyHandle]
    route: Callable[[bytes], int]  # key -> index into proxies

    def proxy_for_key(self, key: str) -> ProxyHandle:
        return self.proxies[self.route(key.encode())]

    def clear(self) -> None:
        for proxy in self.proxies:
            proxy.clear()

    def internal_errors(self) -> int:
        return sum(proxy.stats.internal_errors for proxy in self.proxies)


@contextlib.contextmanager
def standalone_target(server: LocalRedis) -> Iterator[Target]:
    """A fault proxy in front of ``server``; the gateway connects to the proxy."""
    node = server.node
    assert node is not None, "server not started"
    with ProxyFleet() as fleet:
        proxy = fleet.add(node.host, node.port)
        try:
            yield Target("standalone", proxy.url, [proxy], lambda key: 0)
        finally:
            proxy.clear()


@contextlib.contextmanager
def cluster_target(cluster: LocalCluster) -> Iterator[Target]:
    """A proxy in front of every node, announced (``ProxiedCluster``); on exit the
    nodes announce their own ports again and the cluster is as it was."""
    with ProxiedCluster(cluster) as proxied:
        topology = cluster.topology()
        primaries = cluster.primary_nodes()
        ranges = [(lo, hi, i) for i, node in enumerate(primaries)
                  for lo, hi in topology[node.node_id]["slots"]]

        def route(key: bytes) -> int:
            slot = key_slot(key)
            return next(i for lo, hi, i in ranges if lo <= slot <= hi)

        try:
            yield Target("cluster", proxied.url, [proxied.proxy_for(n) for n in primaries], route)
        finally:
            proxied.clear_all()


# -- what happened: the ledger -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Problem:
    """A broken invariant: the verifier's (``Violation``) or one this run checks itself."""

    kind: str
    invariant: int | str
    message: str
    sku: str = ""
    source: str = "chaos"  # chaos, or verify (loadtest.verify), or verify-drained

    def __str__(self) -> str:
        where = f" {self.sku}" if self.sku else ""
        return f"[{self.invariant}] {self.kind}{where} ({self.source}): {self.message}"


@dataclass(slots=True)
class Send:
    """One POST of a key, and what the client was told."""

    step: int  # -1: while settling
    start: int  # ticks (a counter of events in this run)
    end: int
    status: int
    body: dict[str, Any]


@dataclass(eq=False)
class KeyUse:
    """One (user, key) sent for one sale and quantity; resends add sends."""

    user: int
    key: str
    sale: int
    sku: str
    quantity: int
    first_start: int
    step: int
    sends: list[Send] = field(default_factory=list)
    reused: bool = False  # a key first used on another sale


@dataclass(slots=True)
class AdminCall:
    kind: str  # create, delete
    step: int
    start: int
    end: int = 0
    status: int = 0
    shards: int = 0


@dataclass(eq=False)
class SaleState:
    spec: SaleSpec
    sku: str
    exists: bool | None = False  # definitely, or None: unknown (a call timed out, or raced)
    shards: int = 0  # of the latest creation asked for
    epoch: int = 0  # +1 at every start and end of an admin call
    in_flight: int = 0
    calls: list[AdminCall] = field(default_factory=list)

    def deleted_after(self, tick: int) -> bool:
        """A delete (of any outcome) ended after ``tick``: it may have removed what was
        made then."""
        return any(c.kind == "delete" and c.end > tick for c in self.calls)

    def last_delete_end(self) -> int:
        return max((c.end for c in self.calls if c.kind == "delete"), default=-1)


def outcome_of(status: int, body: dict[str, Any]) -> tuple[Any, ...] | None:
    """The recorded outcome an answer tells, or None when it tells none (503, 404, 422...)."""
    code = body.get("code")
    if status == 200 and code == "OK":
        return ("OK", body.get("order_no"), tuple(body.get("units") or ()))
    if status == 409 and code == "IDEMPOTENT_CONFLICT":
        original = body.get("original")
        if not original:
            return None
        return outcome_of(int(original.get("status", 0)), original.get("body") or {})
    if status == 409 and code in ("ALREADY_PURCHASED", "INSUFFICIENT_STOCK"):
        return (code,)
    if status == 410 and code == "SOLD_OUT":
        return ("SOLD_OUT",)
    return None


EXPECTED_BUY = {(200, "OK"), (409, "IDEMPOTENT_CONFLICT"), (409, "ALREADY_PURCHASED"),
                (409, "INSUFFICIENT_STOCK"), (410, "SOLD_OUT"), (404, "SALE_NOT_FOUND"),
                (422, "IDEMPOTENCY_KEY_REUSED"), (503, "UNAVAILABLE")}


# -- the run -------------------------------------------------------------------------------------

@dataclass
class ChaosConfig:
    seed: int
    steps: int = DEFAULT_STEPS
    time_limit: float | None = None  # stop stepping after this many seconds (reported)
    redis_timeout: float = REDIS_TIMEOUT
    trace: bool = False  # print every step and its answers
    skip: frozenset[str] = frozenset()  # operation kinds not performed (the plan stays the same)
    script: tuple[Step, ...] | None = None  # these steps instead of the seed's plan
    record_dir: Path | None = None  # where the record files for the verifier go


@dataclass
class ChaosReport:
    seed: int
    mode: str
    steps_planned: int
    scripted: bool = False  # the steps were given, not drawn from the seed
    steps_run: int = 0
    seconds: float = 0.0
    settle_seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def replay(self) -> str:
        return (f"python -m loadtest.chaos --seed {self.seed} --steps {self.steps_run} "
                f"--redis {self.mode}")

    def headline(self) -> str:
        verdict = "OK" if self.ok else "FAILED " + ", ".join(
            f"{k} x{n}" for k, n in sorted(self.kinds().items()))
        what = "scripted steps" if self.scripted else f"seed {self.seed}"
        return (f"chaos {what} on {self.mode}: {self.steps_run}/{self.steps_planned} steps "
                f"in {self.seconds:.1f}s (+{self.settle_seconds:.1f}s settling): {verdict}")

    def render(self, limit: int = 12) -> str:
        lines = [self.headline()]
        lines.append("  faults: " + ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items())))
        top = sorted(self.answers.items(), key=lambda kv: -kv[1])
        lines.append("  answers: " + ", ".join(f"{k} {n}" for k, n in top))
        lines += [f"  note: {note}" for note in self.notes]
        shown: Counter[str] = Counter()
        for problem in self.problems:
            shown[problem.kind] += 1
            if shown[problem.kind] <= limit:
                lines.append(f"  {problem}")
            elif shown[problem.kind] == limit + 1:
                lines.append(f"  [{problem.invariant}] {problem.kind}: … "
                             f"{self.kinds()[problem.kind] - limit} more")
        if not self.ok and not self.scripted:
            lines.append(f"  replay: {self.replay()}")
        return "\n".join(lines)


class Chaos:
    """One seeded run against one target: steps, settling, checks."""

    def __init__(self, config: ChaosConfig, target: Target) -> None:
        self.config = config
        self.target = target
        planned = len(config.script) if config.script is not None else config.steps
        self.report = ChaosReport(config.seed, target.mode, planned, scripted=config.script is not None)
        nonce = uuid.uuid4().hex[:6]
        self.prefix = f"chaos-{config.seed % 10**9}-{nonce}"
        self.admin_token = secrets.token_hex(12)
        self.settings = Settings(
            redis_url=target.url, redis_mode=target.mode, key_prefix=self.prefix,
            admin_token=self.admin_token, key_mode="client", relay=False,
            redis_timeout=config.redis_timeout, request_timeout=REQUEST_TIMEOUT,
            idempotency_ttl=3600)
        self.sales = [SaleState(spec, f"cs{nonce}-{spec.name}") for spec in SALES]
        self.uses: list[KeyUse] = []
        self.orders: dict[str, tuple[int, KeyUse]] = {}  # order_no -> (sale, first key use telling it)
        self.compensated: set[str] = set()
        self.stale_flags: set[str] = set()  # SKUs already found answering a false SOLD_OUT
        self.outlived: set[str] = set()  # SKUs whose flag was found set while they did not exist
        self.flag_since: dict[str, int] = {}  # SKU -> step after which its sold-out flag was first seen
        self.totals: dict[tuple[str, str], int] = {}  # (sku, generation) -> units counted last step
        self.unsure_compensations: dict[str, int] = {}  # order_no -> step
        self.not_found: list[tuple[KeyUse, str]] = []  # 404s to judge once the step is over
        self._tick = 0
        self._fresh = 0
        self.http: TestClient[Any, Any] | None = None
        self.gw: Gateway | None = None

    # -- bookkeeping --------------------------------------------------------------------------

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    def problem(self, kind: str, invariant: int | str, message: str, sku: str = "") -> None:
        self.report.problems.append(Problem(kind, invariant, message, sku))

    def trace(self, text: str) -> None:
        if self.config.trace:
            print(text, file=sys.stderr, flush=True)

    @property
    def store(self) -> Store:
        assert self.gw is not None, "gateway not running"
        return self.gw.store

    @property
    def rebalancer(self) -> Rebalancer:
        assert self.gw is not None, "gateway not running"
        return self.gw.rebalancer

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    # -- life ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running_gateway(self) -> AsyncIterator[None]:
        app = create_app(self.settings)
        async with TestClient(TestServer(app)) as client:
            self.http = client
            self.gw = app[GATEWAY]
            try:
                yield
            finally:
                self.target.clear()

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        async with self.running_gateway():
            await self.setup()
            await self.steps()
            self.report.seconds = time.monotonic() - started
            settled = time.monotonic()
            await self.settle()
            await self.check()
            self.report.settle_seconds = time.monotonic() - settled
        errors = self.target.internal_errors()
        if errors:
            self.report.notes.append(f"the fault proxies logged {errors} internal errors")
        return self.report

    async def setup(self) -> None:
        for index in LIVE:
            state = self.sales[index]
            status, body = await self.put_sale(state, state.spec.shard_choices[0])
            if status != 201:
                raise RuntimeError(f"cannot create sale {state.sku}: {status} {body}")
            state.exists, state.shards = True, state.spec.shard_choices[0]

    async def steps(self) -> None:
        started = time.monotonic()
        script = self.config.script
        steps = script if script is not None else itertools.islice(plan(self.config.seed), self.config.steps)
        for step in steps:
            limit = self.config.time_limit
            if limit is not None and time.monotonic() - started > limit:
                self.report.notes.append(f"stopped after {self.report.steps_run} steps: "
                                         f"time limit {limit:.0f}s")
                break
            await self.step(step)
            self.report.steps_run += 1

    # -- one step -----------------------------------------------------------------------------

    async def step(self, step: Step) -> None:
        bound = [self.bind(step, i, op) for i, op in enumerate(step.ops)]
        fault = step.fault
        self.report.faults[f"{fault.kind.split('_')[0]} {fault.command}" if fault.command else fault.kind] += 1
        results = await asyncio.gather(self.inject(step, bound),
                                       *(self.perform(step, op, b) for op, b in zip(step.ops, bound)))
        self.target.clear()
        self.trace(f"{step.describe()}\n    -> " + " | ".join(str(r) for r in results[1:]))
        if step.fault.kind != "none":
            await asyncio.sleep(0.05)  # commands a fault held back have run now
        await self.judge_not_found()
        for state in self.sales:
            await self.check_counters(state, step)
            await self.check_flag(state, step)

    async def judge_not_found(self) -> None:
        """404 SALE_NOT_FOUND while the sale exists (the last PUT said so, nothing deleted
        it since): because its buyer's shard is missing (a half-made sale), or because
        the gateway remembered the sale as missing (its cache of sales) past a PUT."""
        found, self.not_found = self.not_found, []
        for use, where in found:
            state = self.sales[use.sale]
            record = await self.calm(partial(self.store.sale_record, state.sku))
            if record is not None and record[1] != "ready":
                # A DELETE that answered 503 was cut off half-way (its record reads
                # "deleting" until the next DELETE finishes it, or its lease is over and
                # the next PUT does), or another creation is under way: a PUT meanwhile
                # answers 409 SALE_EXISTS, yet the sale is not for sale, and 404 is right.
                self.report.notes.append(f"{where}: user {use.user} got 404 for {state.sku} "
                                         f"while its record reads {record[1]!r} (not for sale)")
                continue
            told = state.calls[-1] if state.calls else None
            why = (f"the last PUT (step {told.step}) answered {told.status}"
                   if told and told.kind == "create" else "it was created before the run")
            sale = await self.calm(partial(self.store.get_sale, state.sku))
            shards = sale.shards if sale else state.shards or state.spec.shard_choices[0]
            shard = use.user % shards
            there = sale is not None and (await self.calm(partial(self.shard_generations, sale)))[shard]
            kind = "stale_sale_cache" if there else "sale_not_found_while_it_exists"
            self.problem(kind, "api", f"{where}: user {use.user} (shard {shard}) got 404 SALE_NOT_FOUND; "
                         f"the sale exists ({why}), nothing deleted it since, and that shard "
                         f"{'exists' if there else 'does not'}", use.sku)

    async def check_counters(self, state: SaleState, step: Step) -> None:
        """Between steps nothing runs: every unit is free, sold or in transfer, so the
        counters add up to the stock. Said at the step that changed the sum."""
        if state.exists is False:
            return
        sale = await self.calm(partial(self.store.get_sale, state.sku))
        if sale is None:
            return
        if None in await self.calm(partial(self.shard_generations, sale)):
            return  # half-created: said by the answers (404, 409) and at the end
        snap = await self.calm(partial(read_sale, self.store, sale))
        if not snap.consistent:
            self.report.notes.append(f"after step {step.index}: {state.sku} kept changing while read")
            return
        total = snap.remaining + snap.sold + snap.in_transfer
        key = (state.sku, sale.generation)
        previous = self.totals.get(key, sale.stock)
        self.totals[key] = total
        if total != previous:
            shards = ", ".join(f"{s.shard}: {s.remaining}/{s.sold}" + (f" xfer {len(s.transfers_out)}"
                                                                       if s.transfers_out else "")
                               for s in snap.states)
            self.problem("units_not_conserved", 1,
                         f"after step {step.index} ({step.describe()}): free + sold + in transfer = "
                         f"{snap.remaining} + {snap.sold} + {snap.in_transfer} = {total}, was {previous} "
                         f"(stock {sale.stock}; free/sold by shard: {shards})", state.sku)

    async def flag_set(self, sku: str) -> bool:
        """Whether the SKU is marked sold out (a mark of a sale being deleted counts)."""
        found = await self.store.sale_record(sku)
        return found is not None and (await self.store.sold_out_state(found[0])).sold_out

    async def check_flag(self, state: SaleState, step: Step) -> None:
        """Between steps nothing runs: a sold-out flag that is set while units are free
        was set after they came back (or its clearing is still to be retried). A new
        buyer who needs a move must not hear SOLD_OUT."""
        if not await self.calm(partial(self.flag_set, state.sku)):
            self.flag_since.pop(state.sku, None)
            self.stale_flags.discard(state.sku)
            return
        since = self.flag_since.setdefault(state.sku, step.index)
        if state.sku in self.stale_flags:
            return  # said already
        if state.exists is False:
            if state.sku not in self.outlived:
                self.outlived.add(state.sku)
                self.problem("sold_out_flag_outlives_sale", 4,
                             f"after step {step.index} ({step.describe()}): the sale is deleted, its "
                             f"sold-out flag is set (since step {since}); a new sale of this SKU starts "
                             f"with it", state.sku)
            return
        if state.exists is None:
            return
        sale = await self.calm(partial(self.store.get_sale, state.sku))
        if sale is None or any(self.orders[o][0] == self.sales.index(state)
                               for o in self.unsure_compensations):
            return  # the relay would retry that compensation, which clears the flag
        states = await self.calm(partial(self.store.shard_states, sale))
        free = {s.shard: s.remaining for s in states if s.remaining}
        empty = [s.shard for s in states if not s.remaining]
        if not free or not empty:
            return
        send = await self.probe(state, sale.shards, empty[0], step.index)
        if send.status == 410:
            self.stale_flags.add(state.sku)
            self.problem("false_sold_out", 4,
                         f"after step {step.index} ({step.describe()}): the sold-out flag is set (since step "
                         f"{since}) while {sum(free.values())} units are free (by shard: {free}); a new buyer "
                         f"in shard {empty[0]} got 410 SOLD_OUT", state.sku)

    async def probe(self, state: SaleState, shards: int, shard: int, step: int) -> Send:
        """One new buyer in ``shard`` buys one unit (its key kept like any other)."""
        self._fresh += 1
        user = (FRESH_USERS + self._fresh) * shards + shard
        use = KeyUse(user, f"probe-{self._fresh}-{self.config.seed % 10**6}", self.sales.index(state),
                     state.sku, 1, first_start=0, step=step)
        self.uses.append(use)
        return await self.resend_until_known(use, step)

    def bind(self, step: Step, i: int, op: Op) -> Any:
        """What an operation acts on, decided from the state before the step (the plan
        says "the 37th percentile of the keys so far", this says which key that is)."""
        state = self.sales[op.sale]
        if op.kind == "buy":
            use = KeyUse(op.user, f"key-{step.index}-{i}-{self.config.seed % 10**6}", op.sale,
                         state.sku, op.quantity, first_start=0, step=step.index)
            self.uses.append(use)
            return use
        if op.kind in ("resend", "reuse"):
            earlier = [u for u in self.uses if u.sends]
            if not earlier:
                return None
            use = earlier[int(op.pick * len(earlier))]
            if op.kind == "resend":
                return use
            other = op.sale if op.sale != use.sale else (use.sale + 1) % len(SALES)
            quantity = min(use.quantity, SALES[other].per_user_limit)  # else 400, before the key
            reuse = KeyUse(use.user, use.key, other, self.sales[other].sku, quantity,
                           first_start=0, step=step.index, reused=True)
            self.uses.append(reuse)
            return reuse
        if op.kind == "compensate":
            candidates = [o for o in self.orders if o not in self.compensated]
            return candidates[int(op.pick * len(candidates))] if candidates else None
        if op.kind == "move":
            shards = state.shards or state.spec.shard_choices[0]
            donor = int(op.pick * shards)
            receiver = int(op.pick2 * shards)
            if receiver == donor:
                receiver = (donor + 1) % shards
            return (donor, receiver)
        if op.kind == "create":
            return state.spec.shard_choices[op.count % len(state.spec.shard_choices)]
        return None

    def fault_key(self, step: Step, bound: list[Any]) -> str:
        """The key whose node the step's fault strikes."""
        assert self.gw is not None
        keys = self.gw.store.keys
        fault, op = step.fault, step.ops[0]
        state = self.sales[op.sale]
        shards = state.shards or state.spec.shard_choices[0]
        if fault.role == "flag":
            return keys.sale(state.sku)  # (the sold-out state lives in the sale's record)
        if fault.role == "sale":
            return keys.sale(state.sku)
        if fault.role == "any":
            return keys.shard(state.sku, int(fault.pick * 1024) % shards).stock
        target = bound[0]
        if isinstance(target, KeyUse):
            other = self.sales[target.sale]
            return keys.shard(target.sku, target.user % (other.shards or shards)).stock
        if op.kind == "compensate" and isinstance(target, str):
            return keys.order(target, shard_of_order(target) or 0)
        if op.kind == "move" and isinstance(target, tuple):
            return keys.shard(state.sku, target[0]).stock
        if op.kind in ("create", "delete"):
            return keys.shard(state.sku, int(fault.pick * shards)).stock
        return keys.shard(state.sku, int(fault.pick * shards)).stock

    async def inject(self, step: Step, bound: list[Any]) -> None:
        fault = step.fault
        if fault.kind == "none":
            return
        proxy = self.target.proxy_for_key(self.fault_key(step, bound))
        if fault.at:
            await asyncio.sleep(fault.at)
        if fault.kind in ("slow", "late"):
            proxy.delay_next_replies(fault.count, fault.seconds)
        elif fault.kind in ("late_command", "slow_command"):
            proxy.delay_reply_to(command_predicate(fault.command), fault.seconds, fault.count)
        elif fault.kind == "cut":
            proxy.delay_reply_to(command_predicate(fault.command), HELD, fault.count)
            await asyncio.sleep(fault.seconds)
            proxy.reset_all()
        elif fault.kind == "reset":
            proxy.reset_all()
        elif fault.kind == "pause":
            proxy.pause()
            try:
                await asyncio.sleep(fault.seconds)
            finally:
                proxy.resume()

    async def perform(self, step: Step, op: Op, bound: Any) -> str:
        if op.kind in self.config.skip:
            return f"{op.kind}: skipped"
        if op.after:
            await asyncio.sleep(op.after)
        try:
            if op.kind in ("buy", "resend", "reuse"):
                if bound is None:
                    return f"{op.kind}: no key yet"
                send = await self.send_key(bound, step.index)
                unknown = " outcome_unknown" if send.body.get("outcome_unknown") else ""
                label = f"{op.kind} {send.status} {send.body.get('code')}{unknown}"
                self.report.answers[label] += 1
                return f"{label} u{bound.user} {bound.sku[-1]}"
            if op.kind == "compensate":
                return await self.compensate(bound, step.index)
            if op.kind == "move":
                return await self.move(op, bound)
            if op.kind == "create":
                return await self.create(op, bound, step.index)
            if op.kind == "delete":
                return await self.delete(op, step.index)
            if op.kind == "sweep":
                return await self.sweep(op)
            raise AssertionError(op.kind)
        except Exception as exc:
            if is_redis_failure(exc):
                self.report.answers[f"{op.kind} redis {type(exc).__name__}"] += 1
                return f"{op.kind}: {type(exc).__name__}"
            self.problem("unexpected_error", 6, f"step {step.index} {op.describe()}: "
                         + "".join(traceback.format_exception_only(exc)).strip())
            log.exception("step %d %s failed", step.index, op.describe())
            return f"{op.kind}: {exc!r}"

    # -- operations ---------------------------------------------------------------------------

    async def send_key(self, use: KeyUse, step: int) -> Send:
        """POST the key's purchase once, judge the answer, keep it."""
        assert self.http is not None
        state = self.sales[use.sale]
        before = (state.exists, state.epoch, state.in_flight)
        start = self.tick()
        if not use.sends:
            use.first_start = start
        try:
            resp = await self.http.post(
                f"/api/seckill/{use.sku}", json={"quantity": use.quantity},
                headers={"X-User-Id": str(use.user), "X-Idempotency-Key": use.key})
            status, body = resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            status, body = 0, {"code": "CLIENT_ERROR", "message": repr(exc)}
        send = Send(step, start, self.tick(), status, body)
        use.sends.append(send)
        where = f"step {step}" if step >= 0 else "settling"
        if (status, body.get("code")) not in EXPECTED_BUY:
            self.problem("unexpected_answer", 6 if status >= 500 else "api",
                         f"{where}: user {use.user} key {use.key} got {status} {body}", use.sku)
        if status == 404 and before == (True, state.epoch, 0) and state.in_flight == 0:
            self.not_found.append((use, where))  # judged after the step, see judge_not_found
        outcome = outcome_of(status, body)
        if outcome is not None and outcome[0] == "OK" and outcome[1] not in self.orders:
            self.orders[outcome[1]] = (use.sale, use)
        return send

    async def compensate(self, order_no: str | None, step: int) -> str:
        """The relay's path for a refused delivery, retried as the relay retries it."""
        if order_no is None:
            return "compensate: no order yet"
        result = await self.reject(order_no, tries=RELAY_TRIES)
        if result is None:
            self.unsure_compensations[order_no] = step
        self.report.answers[f"compensate {result.name if result else 'unfinished'}"] += 1
        return f"compensate {order_no[:10]}: {result.name if result else 'unfinished'}"

    async def reject(self, order_no: str, tries: int) -> Compensated | None:
        assert self.gw is not None
        gw = self.gw
        for attempt in range(tries):
            try:
                order = await gw.store.get_order(order_no)
                if order is None:
                    return Compensated.NO_ORDER
                result = await Returns(gw.store, gw.sold_out).reject(order, "chaos: refused")
                if result in (Compensated.DONE, Compensated.ALREADY):
                    self.compensated.add(order_no)
                self.unsure_compensations.pop(order_no, None)
                return result
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        return None

    async def move(self, op: Op, shards: tuple[int, int]) -> str:
        assert self.gw is not None
        sale = await self.gw.store.get_sale(self.sales[op.sale].sku)
        if sale is None:
            return "move: no sale"
        donor, receiver = shards[0] % sale.shards, shards[1] % sale.shards
        if donor == receiver:
            return "move: one shard"
        moved = await self.gw.rebalancer.move(sale, donor, receiver, op.count)
        self.report.answers["move"] += 1
        return f"move {donor}->{receiver}: {moved}"

    async def sweep(self, op: Op) -> str:
        assert self.gw is not None
        sale = await self.gw.store.get_sale(self.sales[op.sale].sku)
        if sale is None:
            return "sweep: no sale"
        return f"sweep: {await self.gw.rebalancer.sweep(sale)}"

    async def put_sale(self, state: SaleState, shards: int) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        spec = state.spec
        try:
            resp = await self.http.put(
                f"/admin/sales/{state.sku}", headers=self.admin,
                json={"stock": spec.stock, "price": 100, "per_user_limit": spec.per_user_limit,
                      "shards": shards})
            return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return 0, {"code": "CLIENT_ERROR", "message": repr(exc)}

    async def delete_sale(self, state: SaleState) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        try:
            resp = await self.http.delete(f"/admin/sales/{state.sku}", headers=self.admin)
            body = await resp.json(content_type=None) if resp.status != 204 else {"code": "DELETED"}
            return resp.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return 0, {"code": "CLIENT_ERROR", "message": repr(exc)}

    async def admin_call(self, kind: str, state: SaleState, step: int, shards: int = 0
                         ) -> tuple[int, dict[str, Any]]:
        """A create or delete, with what it tells about the sale's existence."""
        before = state.exists if state.in_flight == 0 else None
        call = AdminCall(kind, step, self.tick(), shards=shards)
        state.calls.append(call)
        state.epoch += 1
        state.in_flight += 1
        state.exists = None
        if kind == "create":
            state.shards = shards
            status, body = await self.put_sale(state, shards)
        else:
            status, body = await self.delete_sale(state)
        call.end, call.status = self.tick(), status
        state.in_flight -= 1
        state.epoch += 1
        raced = any(c.start < call.end and (c.end == 0 or c.end > call.start)
                    for c in state.calls if c is not call)
        where = f"step {step}" if step >= 0 else "settling"
        if kind == "create":
            if status == 201:
                state.exists = True
            elif status == 409 and body.get("code") == "SALE_EXISTS":
                if before is False and not raced:
                    self.problem("create_refused_for_missing_sale", "api",
                                 f"{where}: PUT answered 409 SALE_EXISTS, but the sale did not exist "
                                 f"(deleted or never created, nothing else on it meanwhile)", state.sku)
                state.exists = True
            elif status != 503:
                self.problem("unexpected_answer", 6 if status >= 500 else "api",
                             f"{where}: PUT answered {status} {body}", state.sku)
        else:
            if status == 204:
                state.exists = False
            elif status == 404:
                if before is True and not raced:
                    self.problem("delete_missed_existing_sale", "api",
                                 f"{where}: DELETE answered 404, but the sale existed", state.sku)
                state.exists = False
            elif status != 503:
                self.problem("unexpected_answer", 6 if status >= 500 else "api",
                             f"{where}: DELETE answered {status} {body}", state.sku)
        if raced or state.in_flight:
            state.exists = None
        self.report.answers[f"{kind} {status} {body.get('code')}"] += 1
        return status, body

    async def create(self, op: Op, shards: int, step: int) -> str:
        status, body = await self.admin_call("create", self.sales[op.sale], step, shards)
        return f"create {SALES[op.sale].name}/{shards}: {status} {body.get('code')}"

    async def delete(self, op: Op, step: int) -> str:
        status, body = await self.admin_call("delete", self.sales[op.sale], step)
        return f"delete {SALES[op.sale].name}: {status} {body.get('code')}"

    # -- settling -----------------------------------------------------------------------------

    async def settle(self) -> None:
        """No faults any more: finish whatever the faults left unfinished, as the
        contract says a client, an admin, the relay and the sweep would."""
        assert self.gw is not None
        self.target.clear()
        await asyncio.sleep(0.5)  # replies held by the proxies are out; stale commands ran
        for state in self.sales:
            await self.settle_sale(state)
        for order_no in list(self.unsure_compensations):
            if await self.reject(order_no, tries=SETTLE_TRIES) is None:
                self.problem("compensation_never_done", 5,
                             f"order {order_no}: compensation still failing without faults")
        await self.sweep_all()
        await self.judge_not_found()
        for use in list(self.uses):
            if use.sends and not any(outcome_of(s.status, s.body) for s in use.sends) \
                    and any(s.status == 503 for s in use.sends):
                await self.resend_until_known(use)
        await self.sweep_all()

    async def settle_sale(self, state: SaleState) -> None:
        """A PUT or DELETE that timed out is sent again until it answers for sure (the
        contract: the next PUT completes or undoes a failed one); a sale whose calls
        raced is looked up."""
        last = state.calls[-1] if state.calls else None
        if last is not None and last.status not in (201, 204, 404, 409):
            for _ in range(SETTLE_TRIES):
                status, _ = await self.admin_call(last.kind, state, -1, last.shards)
                if status in (201, 204, 404, 409):
                    break
                await asyncio.sleep(0.1)
            else:
                self.problem("admin_call_never_answered", 6,
                             f"{last.kind} still failing without faults", state.sku)
        if state.exists is None:
            assert self.http is not None
            resp = await self.http.get(f"/admin/sales/{state.sku}", headers=self.admin)
            state.exists = resp.status == 200
            if state.exists:
                sale = await self.calm(partial(self.store.get_sale, state.sku))
                state.shards = sale.shards if sale else state.shards

    async def calm(self, call: Callable[[], Awaitable[T]]) -> T:
        """A Redis call while settling or checking. No faults any more, but a pooled
        connection that a fault broke fails once when next used (the gateway's standalone
        client does not retry): try again."""
        for attempt in itertools.count(1):
            try:
                return await call()
            except Exception as exc:
                if not is_redis_failure(exc) or attempt >= SETTLE_TRIES:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def sweep_all(self) -> None:
        assert self.gw is not None
        for state in self.sales:
            sale = await self.calm(partial(self.store.get_sale, state.sku))
            if sale is not None:
                await self.calm(partial(self.rebalancer.sweep, sale))

    async def resend_until_known(self, use: KeyUse, step: int = -1) -> Send:
        """Send the key (again) until the answer is not 503."""
        send = await self.send_key(use, step)
        for _ in range(SETTLE_TRIES):
            if send.status != 503:
                break
            await asyncio.sleep(0.1)
            send = await self.send_key(use, step)
        if send.status == 503:
            self.problem("outcome_never_known", 3,
                         f"user {use.user} key {use.key}: still 503 without faults", use.sku)
        return send

    # -- checking -----------------------------------------------------------------------------

    async def check(self) -> None:
        await self.judge_not_found()
        self.check_keys()
        await self.check_orders()
        existing = [s for s in self.sales if s.exists]
        for state in existing:
            await self.check_shards(state)
            await self.verify(state, drained=False)
        await self.check_leftovers()
        for state in existing:
            await self.drain(state)
            await self.verify(state, drained=True)
        self.check_ledger_units()
        await self.judge_not_found()

    def uses_by_key(self) -> dict[tuple[int, str], list[KeyUse]]:
        by_key: dict[tuple[int, str], list[KeyUse]] = defaultdict(list)
        for use in self.uses:
            by_key[(use.user, use.key)].append(use)
        return by_key

    def check_keys(self) -> None:
        """One key, one outcome, across every sale it was sent to. A SOLD_OUT may come
        first (the contract lets a process that knows the sale is empty record nothing),
        never after another outcome. And a 503 without ``outcome_unknown`` promised that
        nothing was admitted: a later send of the key must not find a purchase."""
        for (user, key), uses in self.uses_by_key().items():
            sends = sorted(((s, u) for u in uses for s in u.sends), key=lambda su: su[0].end)
            told = [(outcome, u, s) for s, u in sends if (outcome := outcome_of(s.status, s.body))]
            first = next(((o, u, s) for o, u, s in told if o[0] != "SOLD_OUT"), None)
            if first is not None:
                # A plain 410 for the key sent to *another* sale is the sold-out fast path
                # (a process that knows that sale is empty answers from memory, before it
                # looks at the key, and records nothing): no outcome of this key. Recorded,
                # it would be 422, since the key is bound to its first sale.
                others = {o for o, u, s in told[told.index(first):]
                          if o != first[0] and not (o[0] == "SOLD_OUT" and u.sku != first[1].sku
                                                    and s.body.get("code") == "SOLD_OUT")}
                if others:
                    sales = sorted({f"{u.sku}{' (reused)' if u.reused else ''}" for u in uses})
                    self.problem("key_two_outcomes", 3 if len(sales) == 1 else 8,
                                 f"user {user} key {key} (steps {sorted({u.step for u in uses})}, "
                                 f"sales {', '.join(sales)}): {_short(first[0])} then "
                                 f"{', '.join(_short(o) for o in others)}", first[1].sku)
            definite = [(s, u) for s, u in sends if outcome_of(s.status, s.body)]
            if not definite:
                continue
            send, use = definite[0]
            outcome = outcome_of(send.status, send.body)
            if send.body.get("code") != "IDEMPOTENT_CONFLICT" or not outcome or outcome[0] != "OK":
                continue
            before = [s for s, _ in sends if s is not send and s.start < send.end]
            if before and all(s.status == 503 and not s.body.get("outcome_unknown") for s in before):
                self.problem("admitted_after_503_said_nothing", 6,
                             f"user {user} key {key}: step(s) {sorted({s.step for s in before})} answered "
                             f"503 without outcome_unknown ({before[0].body.get('message')!r}), yet the "
                             f"key holds order {outcome[1]} (told at step {send.step})", use.sku)

    async def check_orders(self) -> None:
        """Every 200 is an order, unless a delete of its sale may have come after; and no
        order record outlives its sale (the delete takes all its keys)."""
        store = self.store
        indexed: dict[str, set[str]] = {}
        for state in self.sales:
            indexed[state.sku] = await self.calm(partial(self.order_index, state))
        for order_no, (sale_index, use) in self.orders.items():
            state = self.sales[sale_index]
            order = await self.calm(partial(store.get_order, order_no))
            told = next(o for s in use.sends
                        if (o := outcome_of(s.status, s.body)) and o[0] == "OK" and o[1] == order_no)
            if order is None:
                if not state.deleted_after(use.first_start):
                    self.problem("admitted_order_missing", 5,
                                 f"order {order_no} (user {use.user}, key {use.key}, step {use.step}) "
                                 f"was answered 200 and is gone; no delete of its sale came after",
                                 state.sku)
            elif order.user_id != use.user or tuple(order.units) != told[2]:
                self.problem("admitted_mismatch", 5,
                             f"order {order_no}: answered user {use.user} units {list(told[2])}, "
                             f"Redis has user {order.user_id} units {list(order.units)}", state.sku)
        for order in await self.calm(self.every_order):
            if order.order_no in indexed.get(order.sku, set()):
                continue
            known = self.orders.get(order.order_no)
            owner = next((s for s in self.sales if s.sku == order.sku), None)
            history = ""
            if owner is not None and owner.calls:
                history = "; admin calls on its sale: " + ", ".join(
                    f"{c.kind}@step{c.step}={c.status}" for c in owner.calls)
            origin = (f"answered 200 to user {known[1].user} at step {known[1].step}"
                      if known else "never answered 200 (its purchase's answer was 503 or lost)")
            self.problem("orphan_order", 1,
                         f"order {order.order_no} ({order.status}, units {list(order.units)}) is in Redis "
                         f"but no existing sale lists it: {origin}{history}", order.sku)

    async def order_index(self, state: SaleState) -> set[str]:
        sale = await self.store.get_sale(state.sku) if state.exists else None
        names: set[str] = set()
        if sale is not None:
            pipe = self.store.client.pipeline(transaction=False)
            for shard in range(sale.shards):
                pipe.smembers(self.store.keys.shard(state.sku, shard).order_index)
            for members in await pipe.execute():
                names.update(members)
        return names

    async def every_order(self) -> list[Order]:
        """Every order record under this run's key prefix, whatever lists it."""
        client = self.store.client
        keys = [key async for key in client.scan_iter(match=f"{{{self.prefix}:*}}:order:*", count=1000)]
        orders = []
        for key in keys:
            record: dict[str, str] = await client.hgetall(key)  # type: ignore[assignment]
            if record:
                orders.append(Order.from_record(record))
        return orders

    async def check_leftovers(self) -> None:
        """A deleted sale leaves no key behind (but the expiring tombstones of its closed
        shards, which keep a creator still at work from bringing a shard back)."""
        client = self.store.client
        tombstone_ms = 2 * self.store.creation_lease_ms
        for state in self.sales:
            if state.exists or not state.calls:
                continue

            async def scan(sku: str = state.sku) -> list[str]:
                found = [k async for k in client.scan_iter(match=f"*{self.prefix}*:{sku}", count=1000)]
                return sorted([k for k in found if ":closed:" not in k
                               or not 0 < await client.pttl(k) <= tombstone_ms])

            left = await self.calm(scan)
            if left:
                self.problem("deleted_sale_left_keys", "api",
                             f"{len(left)} keys after DELETE: {', '.join(left[:6])}", state.sku)

    async def check_shards(self, state: SaleState) -> None:
        """Every shard of an existing sale exists and is of this creation of it."""
        store = self.store
        sale = await self.calm(lambda: store.get_sale(state.sku))
        if sale is None:
            self.problem("sale_missing", 0, "the sale answered 200/201 but has no record", state.sku)
            return

        found = await self.calm(partial(self.shard_generations, sale))
        missing = [i for i, g in enumerate(found) if g is None]
        other = [i for i, g in enumerate(found) if g is not None and g != sale.generation]
        calls = ", ".join(f"{c.kind}@step{c.step}={c.status}" for c in state.calls)
        if missing:
            self.problem("sale_half_created", "api",
                         f"shards {missing} of {sale.shards} do not exist (admin calls: {calls})", state.sku)
        if other:
            self.problem("shard_of_another_creation", 1,
                         f"shards {other} carry another generation than the sale's own (admin calls: {calls})",
                         state.sku)

    async def shard_generations(self, sale: Sale) -> list[str | None]:
        """The generation each shard of ``sale`` was created for (None: no such shard)."""
        pipe = self.store.client.pipeline(transaction=False)
        for shard in range(sale.shards):
            pipe.hget(self.store.keys.shard(sale.sku, shard).stock, "generation")
        return list(await pipe.execute())

    def record_file(self, state: SaleState) -> Path:
        """The 200s of the sale's current creation, as the load scenarios record them."""
        directory = self.config.record_dir or Path(tempfile.gettempdir())
        path = directory / f"{self.prefix}-{state.spec.name}.jsonl"
        since = state.last_delete_end()
        index = self.sales.index(state)
        with open(path, "w") as fh:
            for use in self.uses:
                if use.sale != index or use.first_start <= since:
                    continue
                for send in use.sends:
                    outcome = outcome_of(send.status, send.body)
                    if outcome is None or outcome[0] != "OK":
                        continue
                    fh.write(json.dumps({
                        "sku": state.sku, "order_no": outcome[1], "units": list(outcome[2]),
                        "user_id": use.user, "key": use.key, "status": send.status,
                        "scenario": f"step {send.step}"}) + "\n")
        return path

    async def verify(self, state: SaleState, *, drained: bool) -> None:
        record = self.record_file(state)
        snap = await self.calm(lambda: collect_stable(self.store, state.sku, admitted=record))
        violations: list[Violation] = check(snap, expect_sold_out=drained)
        lost = lost_units(snap)
        if lost and not any(v.kind == "unit_lost" for v in violations):
            # loadtest.verify, given no orders DB, takes a rejected order's missing units
            # for units the DB kept for another order (UNIT_TAKEN) and reports only the
            # counters; no compensation in this run keeps any unit.
            violations.append(Violation("unit_lost", 1, f"units neither free, sold nor in transfer: "
                                        f"{', '.join(map(str, lost[:8]))} (of rejected orders)"))
        if self.config.record_dir is None:
            record.unlink(missing_ok=True)
        source = "verify-drained" if drained else "verify"
        seen = {(p.kind, p.sku) for p in self.report.problems if p.source.startswith("verify")}
        for v in violations:
            if drained and (v.kind, state.sku) in seen:
                continue  # already reported before the drain
            self.report.problems.append(Problem(v.kind, v.invariant, v.message, state.sku, source))
        self.report.notes += [f"{state.sku}: {note}" for note in snap.notes if "torn" in note]

    async def drain(self, state: SaleState) -> None:
        """No false SOLD_OUT: fresh buyers, first in the shards that hold nothing (they
        need a move), buy one unit each while any unit is free: each must get 200. Once
        no unit is left, the next one gets 410."""
        store = self.store
        sale = await self.calm(lambda: store.get_sale(state.sku))
        if sale is None:
            return
        for n in range(sale.stock + 2):
            states = await self.calm(lambda: store.shard_states(sale))
            free = sum(s.remaining for s in states)
            moving = sum(t.count for s in states for t in transfers_of(s))
            empty = [s.shard for s in states if s.remaining == 0] or [s.shard for s in states]
            shard = empty[n % len(empty)]
            send = await self.probe(state, sale.shards, shard, -1)
            code = send.body.get("code")
            if free + moving == 0:
                if send.status != 410:
                    self.problem("empty_sale_not_sold_out", 4,
                                 f"no unit free, yet a new buyer got {send.status} {code}", state.sku)
                return
            if send.status != 200:
                where = {s.shard: s.remaining for s in states if s.remaining}
                flag = await self.calm(lambda: self.flag_set(state.sku))
                kind = "false_sold_out" if send.status == 410 else "free_unit_refused"
                self.problem(kind, 4,
                             f"a new buyer in shard {shard} got {send.status} {code} while {free} units "
                             f"are free (by shard: {where}) and {moving} in transfer; the sold-out flag "
                             f"is {'set' if flag else 'not set'}", state.sku)
                return
        self.problem("drain_did_not_end", 4, f"{sale.stock + 2} buyers and still not sold out", state.sku)

    def check_ledger_units(self) -> None:
        """From the answers alone, for each existing sale's current creation: no unit in
        two live orders, no user over the limit (compensated orders gave theirs back)."""
        for index, state in enumerate(self.sales):
            if not state.exists:
                continue
            since = state.last_delete_end()
            orders: dict[str, tuple[int, tuple[int, ...]]] = {}
            for use in self.uses:
                if use.sale != index or use.first_start <= since:
                    continue
                for send in use.sends:
                    outcome = outcome_of(send.status, send.body)
                    if outcome and outcome[0] == "OK" and outcome[1] not in self.compensated:
                        orders[outcome[1]] = (use.user, outcome[2])
            holders: dict[int, list[str]] = defaultdict(list)
            held: Counter[int] = Counter()
            for order_no, (user, units) in orders.items():
                held[user] += len(units)
                for unit in units:
                    holders[unit].append(order_no)
            for unit, names in sorted(holders.items()):
                if len(names) > 1:
                    self.problem("answered_unit_twice", 1,
                                 f"unit {unit} was answered 200 to {len(names)} live orders: "
                                 f"{', '.join(names)}", state.sku)
            for user, count in sorted(held.items()):
                if count > state.spec.per_user_limit:
                    self.problem("answered_over_limit", 2,
                                 f"user {user} was answered 200 for {count} units "
                                 f"(limit {state.spec.per_user_limit})", state.sku)


def lost_units(snap: Snapshot) -> list[int]:
    """Units of the sale that are nowhere: not in a free range, not in an admitted or
    delivered order, not in a transfer the receiver has not applied."""
    if snap.sale is None:
        return []
    found: set[int] = set()
    applied = {tid for shard in snap.shards for tid in shard.transfers_in}
    ranges = [r for shard in snap.shards for r in shard.free_ranges]
    for shard in snap.shards:
        for transfer_id, record in shard.transfers_out.items():
            if transfer_id not in applied:
                ranges.append(record.split("|")[1])
    for text in ranges:
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            found.update(range(int(lo), int(hi or lo) + 1))
    found.update(u for o in snap.orders.values() if o.status in ("admitted", "delivered") for u in o.units)
    return [u for u in range(1, snap.sale.stock + 1) if u not in found]


def command_predicate(command: str) -> Callable[[Sequence[bytes]], bool]:
    """Matches a Redis command by name, or a script's EVALSHA by the script's name."""
    if command in SCRIPTS:
        sha = Script.load(command).sha.encode()
        return lambda args: len(args) > 1 and args[0].upper() == b"EVALSHA" and args[1] == sha
    name = command.upper().encode()
    return lambda args: bool(args) and args[0].upper() == name


def _short(outcome: tuple[Any, ...]) -> str:
    if outcome[0] == "OK":
        return f"OK {outcome[1]} units {list(outcome[2])}"
    return str(outcome[0])


async def run_chaos(config: ChaosConfig, target: Target) -> ChaosReport:
    """One seeded run against ``target``; the report lists every broken invariant."""
    return await Chaos(config, target).run()


# -- command line --------------------------------------------------------------------------------

@contextlib.contextmanager
def local_target(mode: str, stack: contextlib.ExitStack) -> Iterator[Target]:
    if mode == "standalone":
        server = stack.enter_context(LocalRedis())
        with standalone_target(server) as target:
            yield target
    else:
        cluster = stack.enter_context(LocalCluster(primaries=3, replicas_per_primary=1))
        with cluster_target(cluster) as target:
            yield target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="the seed (default: a random one, printed); "
                   "with --duration the first of consecutive seeds")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per seed [{DEFAULT_STEPS}]")
    p.add_argument("--duration", type=float, help="run consecutive seeds for this many seconds")
    p.add_argument("--redis", choices=("standalone", "cluster", "both"), default="cluster",
                   help="what Redis to start [cluster]; both: alternate")
    p.add_argument("--skip", action="append", default=[], choices=[k for k, _ in OP_WEIGHTS],
                   help="do not perform this kind of operation (the plan stays the same); repeatable")
    p.add_argument("--trace", action="store_true", help="print every step and its answers")
    p.add_argument("--record-dir", type=Path, help="keep the record files of the 200s here")
    p.add_argument("-v", "--verbose", action="store_true", help="the gateway's warnings too")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the Redis servers this started are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    first = args.seed if args.seed is not None else random.randrange(1, 10**6)
    modes = ("standalone", "cluster") if args.redis == "both" else (args.redis,)
    print(f"[chaos] seeds from {first}, {args.steps} steps each, on {', '.join(modes)}"
          + (f", for {args.duration:.0f}s" if args.duration else ""), flush=True)
    failed: list[ChaosReport] = []
    runs = 0
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        targets = {mode: stack.enter_context(local_target(mode, stack)) for mode in modes}
        for seed in itertools.count(first):
            for mode in modes:
                config = ChaosConfig(seed, steps=args.steps, trace=args.trace, record_dir=args.record_dir,
                                     skip=frozenset(args.skip))
                print(f"[chaos] seed {seed} on {mode} ...", flush=True)
                report = asyncio.run(run_chaos(config, targets[mode]))
                runs += 1
                print(report.render() if not report.ok or args.trace else report.headline(), flush=True)
                if not report.ok:
                    failed.append(report)
            if args.duration is None or time.monotonic() - started >= args.duration:
                break
    print(f"[chaos] {runs} runs, {len(failed)} failed, {time.monotonic() - started:.0f}s", flush=True)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for report in failed:
        for kind in sorted(report.kinds()):
            by_kind[kind].append(f"{report.seed}/{report.mode}")
    for kind, seeds in sorted(by_kind.items()):
        print(f"[chaos] {kind}: seeds {', '.join(seeds)}", flush=True)
    skip = "".join(f" --skip {k}" for k in args.skip)
    for report in failed:
        print(f"[chaos] replay: {report.replay()}{skip}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

