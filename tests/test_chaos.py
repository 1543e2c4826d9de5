"""Correct under resends, slow Redis and races: the chaos run (``loadtest.chaos``).

Purchases, unit moves, compensations (refused deliveries), sale creates and deletes go
through fault proxies in front of every Redis node while replies are held past the
client's socket timeout (redis-py then sends the command again, although it ran),
connections are reset and nodes stall; afterwards every invariant of the contract is
checked, with ``loadtest.verify`` and with the run's own record of every answer.

``test_chaos`` is the randomized run, bounded for CI: a fixed seed per backend (or
``CHAOS_SEED``), ``CHAOS_STEPS`` steps. The seed fixes the operations, their arguments
and the faults, step by step; timing does not repeat, so which of two racing calls wins
may differ from one run to the next. A failure prints the seed and the command that
replays it (``python -m loadtest.chaos --seed N --steps M --redis MODE``); ``make chaos``
runs many seeds for minutes.

The other tests are single scenarios in the same driver, given as steps rather than
drawn from a seed: each one of the defects the chaos run finds, made to happen on
purpose, so that its fix can be seen to work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import pytest

from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis
from loadtest.chaos import (
    FAULT_WEIGHTS,
    OP_WEIGHTS,
    SALES,
    ChaosConfig,
    ChaosReport,
    Fault,
    Op,
    Step,
    Target,
    cluster_target,
    plan,
    run_chaos,
    standalone_target,
)

A, B, C, D = (next(i for i, s in enumerate(SALES) if s.name == name) for name in "abcd")
NO_FAULT = Fault("none")
LATE = 0.6  # past the gateway's socket timeout in the chaos runs (0.3 s)
SLOW = 0.2  # within it


@pytest.fixture(scope="module", params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def chaos_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Redis behind fault proxies, for the tests of this module; on a Cluster the nodes
    announce the proxies (and stop announcing them afterwards: the session's cluster is
    left as it was). Each run clears the faults it made and uses keys of its own."""
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        with cluster_target(cluster) as target:
            yield target
        cluster.wait_until_healthy()
        return
    server: LocalRedis = request.getfixturevalue("standalone_redis")
    with standalone_target(server) as target:
        yield target


# Every scenario runs on both backends. Each of the defect scenarios below failed before
# its fix (its docstring names the defect); none is expected to fail now, so none is
# marked xfail: a regression fails the run.
on_both = pytest.mark.parametrize("chaos_target", [
    pytest.param("standalone", id="standalone"),
    pytest.param("cluster", marks=pytest.mark.cluster, id="cluster"),
], indirect=True, scope="module")


def failed(report: ChaosReport) -> str:
    return "\n" + report.render(limit=30)


# -- the plan ------------------------------------------------------------------------------------

def test_the_plan_is_a_function_of_the_seed_alone() -> None:
    """Same seed, same steps (a shorter run is a prefix of a longer one); another seed,
    other steps; and a few hundred steps use every operation and every fault."""
    first = list(zip(range(300), plan(42)))
    again = list(zip(range(100), plan(42)))
    assert again == first[:100]
    assert [s for _, s in zip(range(100), plan(43))] != [s for _, s in first[:100]]
    steps = [s for _, s in first]
    assert {op.kind for s in steps for op in s.ops} == {kind for kind, _ in OP_WEIGHTS}
    assert {s.fault.kind for s in steps} == {kind for kind, _ in FAULT_WEIGHTS}
    assert any(op.after for s in steps for op in s.ops)
    assert all(SALES[op.sale].churn for s in steps for op in s.ops if op.kind in ("create", "delete"))


# -- the randomized run ----------------------------------------------------------------------------

CHAOS_STEPS = int(os.environ.get("CHAOS_STEPS", "90"))
# Seeds that showed defects of the issue within 90 steps before their fixes (of 25 seeds
# tried on each backend): on standalone Redis a half-created sale (and a 503 that said
# nothing was admitted), on the Cluster units lost by a resent transfer_out (and, in some
# runs, an orphan order and a half-created sale). Timing varies: the same seed may show
# more or fewer from one run to the next.
CHAOS_SEEDS = {"standalone": 14, "cluster": 19}


@on_both
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chaos(chaos_target: Target) -> None:
    """A seeded mix of every operation and fault, then every invariant."""
    seed = int(os.environ.get("CHAOS_SEED", CHAOS_SEEDS[chaos_target.mode]))
    config = ChaosConfig(seed, steps=CHAOS_STEPS)
    report = await run_chaos(config, chaos_target)
    print(report.render(limit=30))
    assert report.ok, f"chaos seed {seed} failed; replay: {report.replay()}" + failed(report)


# -- each defect on purpose --------------------------------------------------------------------------

async def run_steps(target: Target, *steps: Step) -> ChaosReport:
    script = tuple(Step(i, s.ops, s.fault) for i, s in enumerate(steps))
    report = await run_chaos(ChaosConfig(0, script=script), target)
    print(report.render(limit=30))
    return report


def step(*ops: Op, fault: Fault = NO_FAULT) -> Step:
    return Step(0, ops, fault)


def buyers(sale: int, per_shard: int, shards: Iterable[int] | None = None) -> tuple[Op, ...]:
    """``per_shard`` new users in each of ``shards`` (default: all) buy one unit each:
    with the shard's units as ``per_shard``, they empty it without a move."""
    count = SALES[sale].shard_choices[0]
    return tuple(Op("buy", sale, user=(i + 1) * count + shard)
                 for shard in (range(count) if shards is None else shards) for i in range(per_shard))


@on_both
async def test_a_move_whose_reply_is_late_loses_no_unit(chaos_target: Target) -> None:
    """The donor's ``transfer_out`` runs, its reply comes after the socket timeout and
    the Cluster client sends it again with the same transfer id: the second run
    overwrites the first one's transfer record, so the units it took are nowhere. (The
    first move only loads the script on the donor's node: a NOSCRIPT is not a run.)"""
    move = Op("move", B, pick=0.0, pick2=0.5, count=1)  # shard 0 (3 units) to shard 8
    report = await run_steps(
        chaos_target,
        step(move),
        step(move, fault=Fault("late_command", "op", "transfer_out", count=1, seconds=LATE)))
    assert report.ok, failed(report)


@on_both
@pytest.mark.parametrize(("command", "role"), [("claim_sale", "sale"), ("create_shard", "op")])
async def test_a_create_that_timed_out_is_completed_by_the_next(
        chaos_target: Target, command: str, role: str) -> None:
    """A PUT whose sale record (SET NX) or first shard was written but not answered in
    time: the contract says the next PUT of the SKU completes or undoes it. Then every
    shard sells."""
    report = await run_steps(
        chaos_target,
        step(Op("create", C), fault=Fault("late_command", role, command, count=3, seconds=LATE)),
        step(Op("create", C)),
        step(*buyers(C, 1)))
    assert report.ok, failed(report)


@on_both
async def test_a_delete_racing_purchases_leaves_no_order(chaos_target: Target) -> None:
    """The delete reads the sale's order indexes, then deletes them and the orders they
    list; purchases admitted in between (their reply is a 200) leave order records that
    no sale lists."""
    d = SALES[D]
    shards = d.shard_choices[0]
    report = await run_steps(
        chaos_target,
        step(Op("create", D)),
        step(*buyers(D, 1)),
        step(Op("delete", D),
             *(Op("buy", D, user=(10 + i) * shards + i % shards, after=0.03 * (i + 1)) for i in range(4)),
             fault=Fault("slow_command", "op", "SMEMBERS", count=shards, seconds=SLOW)))
    assert report.ok, failed(report)


@on_both
async def test_a_sold_out_flag_never_outlives_units_that_came_back(chaos_target: Target) -> None:
    """Sale ``a`` is emptied without a move (no sold-out decision yet), shard 0 last. A
    buyer in shard 0 makes the refill read every shard twice (slowly: the replies are
    late, within the timeout), find nothing and set the sold-out flag; a compensation
    (of an order outside shard 0) in between gives a unit back and clears the flag
    before the refill sets it. Then the flag stands over a free unit: a buyer who needs
    a move hears SOLD_OUT."""
    a = SALES[A]
    shards = a.shard_choices[0]
    per_shard = a.stock // shards
    report = await run_steps(
        chaos_target,
        step(*buyers(A, per_shard, range(1, shards))),
        step(*buyers(A, per_shard, [0])),
        step(Op("buy", A, user=100 * shards),
             Op("compensate", A, pick=0.0, after=0.3),
             fault=Fault("slow_command", "any", "HMGET", count=40, seconds=SLOW)))
    assert report.ok, failed(report)


@on_both
async def test_a_sold_out_flag_set_after_a_delete_does_not_sell_out_the_next_sale(
        chaos_target: Target) -> None:
    """The refill decides SOLD_OUT from reads made before a delete and sets the flag
    after it: the flag outlives the sale, and the sale created next under the same SKU
    answers SOLD_OUT to buyers who need a move while its other shards hold units."""
    c = SALES[C]
    shards = c.shard_choices[0]
    report = await run_steps(
        chaos_target,
        step(Op("create", C)),
        step(*buyers(C, c.stock // shards)),
        step(Op("buy", C, user=100 * shards), Op("delete", C, after=0.1),
             fault=Fault("slow_command", "any", "HMGET", count=40, seconds=SLOW)),
        step(Op("create", C)),
        step(*(Op("buy", C, user=(200 + i) * shards) for i in range(c.stock // shards))))
    assert report.ok, failed(report)


@on_both
async def test_a_purchase_whose_connection_drops_is_not_said_to_have_failed(chaos_target: Target) -> None:
    """The purchase runs, its reply is held and the connection is reset: the gateway
    cannot know whether it was admitted, so its 503 must say ``outcome_unknown`` (a 503
    without it promises that nothing was admitted). The key, sent again, tells."""
    report = await run_steps(
        chaos_target,
        step(Op("buy", A, user=1)),  # the batcher's connection to the node is open
        step(Op("buy", A, user=2),
             fault=Fault("cut", "op", "purchase", count=1, seconds=0.1)))
    assert sum(n for k, n in report.answers.items() if k.startswith("buy 503")) == 1, failed(report)
    assert report.ok, failed(report)


@on_both
async def test_a_key_used_on_a_sale_with_another_shard_count_is_refused(chaos_target: Target) -> None:
    """Contract: a key admits at most one purchase across all sales, whatever their shard
    counts (422 on the second sale). Sales ``a`` (8 shards) and ``b`` (16): user 9 is in
    shard 1 of ``a`` and shard 9 of ``b``, whose idempotency records sit in other slots."""
    report = await run_steps(
        chaos_target,
        step(Op("buy", A, user=9)),
        step(Op("reuse", B, pick=0.0)))
    assert report.ok, failed(report)
