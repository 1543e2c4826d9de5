"""The verifier's waiting-room checks (invariant 9, ``loadtest.waitingroom``) on synthetic
records: a simulated room that keeps the contract passes; each seeded violation is named.

The simulation plays a gateway that lets users through at R per second from
``starts_at``, those who joined before it in a shuffled order and those after it first
in, first out, answering the clients' joins and polls as the contract says, and clients
that poll when ``Retry-After`` tells them and buy once admitted. Everything goes through
the record file's format (``loadtest.records``), as a load run writes it. No Redis, no
gateway, no Locust, no timing.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.models import Order, Purchase, Sale
from loadtest import records, verify, waitingroom
from loadtest.records import PASS_FORGED, PASS_NONE, PASS_OTHER, PASS_OWN
from loadtest.waitingroom import Tolerance
from tests.support.api import Api

T0 = 1_800_000_000.0
SKU = "wr"
LATENCY = 0.01


@dataclass
class Sim:
    """A simulated waiting room and its crowd; ``entries`` are the record's lines."""

    rate: float = 50.0
    pre: int = 300  # users who join before the start
    post: int = 100  # users who join after it
    lead: float = 10.0  # seconds from T0 to starts_at
    poll: float = 0.5  # Retry-After
    stock: int | None = None
    shuffle: bool = True
    fifo: bool = True
    speed: float = 1.0  # the gateway admits at speed × rate
    seed: int = 7
    stats_every: float = 0.0  # > 0: the gateway's count of admissions, sampled this often
    entries: list[dict] = field(default_factory=list)
    admitted_at: dict[int, float] = field(default_factory=dict)
    passes: dict[int, str] = field(default_factory=dict)

    @property
    def starts(self) -> float:
        return T0 + self.lead

    def run(self) -> Sim:
        rng = random.Random(self.seed)
        users = list(range(1, self.pre + self.post + 1))
        joins = {u: T0 + rng.uniform(0, self.lead - 2) if u <= self.pre
                 else self.starts + rng.uniform(0.5, 4) for u in users}
        pre = sorted(users[:self.pre], key=lambda u: joins[u])
        if self.shuffle:
            rng.shuffle(pre)
        post = sorted(users[self.pre:], key=lambda u: joins[u], reverse=not self.fifo)
        order = pre + post
        t = self.starts
        for k, u in enumerate(order):  # the gateway's admission moments
            t = max(t + (1 / (self.rate * self.speed) if k else 0), joins[u])
            self.admitted_at[u] = t
        sold_out_at = None
        if self.stock is not None and self.stock < len(order):
            sold_out_at = self.admitted_at[order[self.stock]]
            for u in order[self.stock:]:
                del self.admitted_at[u]
        self.entries.append(records.sale_entry(sku=SKU, scenario="QueueCrowd", outcome="created", ts=T0,
                                               stock=self.stock or len(order), per_user_limit=1, shards=16,
                                               starts_at_ms=int(self.starts * 1000), admit_rate=self.rate))
        for u in users:
            self.client(u, joins[u], order, sold_out_at)
        if self.stats_every > 0:
            moments = sorted(self.admitted_at.values())
            t, end = T0, (moments[-1] if moments else self.starts) + 3
            while t < end:
                gateway_t = t + LATENCY / 2
                self.entries.append(records.queue_stats_entry(
                    sku=SKU, t0=t, ts=t + LATENCY, admitted=bisect.bisect_right(moments, gateway_t),
                    joined=len(users), server_s=int(gateway_t)))
                t += self.stats_every
        return self

    def position(self, u: int, order: list[int], t: float) -> int | None:
        """1 + those ahead of ``u`` not yet let through (admission moments never decrease
        along ``order``)."""
        if t < self.starts:
            return None
        if getattr(self, "_order", None) is not order:
            self._order, self._index = order, {v: i for i, v in enumerate(order)}
            self._times = [self.admitted_at.get(v, float("inf")) for v in order]
        ahead = self._index[u]
        return ahead - min(ahead, bisect.bisect_right(self._times, t)) + 1

    def client(self, u: int, join: float, order: list[int], sold_out_at: float | None) -> None:
        ticket = f"tk-{u}"
        t0, step = join, records.JOIN
        while True:
            ts = t0 + LATENCY
            gateway_t = t0 + LATENCY / 2
            common = {"sku": SKU, "user_id": u, "step": step, "t0": t0, "ts": ts, "server_s": int(gateway_t),
                      "scenario": "QueueCrowd"}
            if self.admitted_at.get(u, float("inf")) <= gateway_t:
                self.passes[u] = f"pass-{u}"
                self.entries.append(records.queue_entry(status=200, code="ADMITTED", pass_=self.passes[u],
                                                        ticket=ticket, **common))
                self.entries.append(records.queue_buy_entry(sku=SKU, user_id=u, pass_kind=PASS_OWN, status=200,
                                                            code="OK", ts=ts + 0.02, t0=ts, ticket=ticket,
                                                            order_no=f"o-{u}", scenario="QueueCrowd"))
                return
            if sold_out_at is not None and gateway_t >= sold_out_at:
                self.entries.append(records.queue_entry(status=410, code="SOLD_OUT", ticket=ticket, **common))
                return
            self.entries.append(records.queue_entry(
                status=202, code="QUEUED", ticket=ticket, position=self.position(u, order, gateway_t),
                eta_s=1.0, units_left=10, retry_after=self.poll, **common))
            t0, step = ts + self.poll, records.POLL

    def record(self) -> records.Record:
        return records.parse_lines(records.line(e) for e in self.entries)

    def analysis(self) -> waitingroom.Analysis:
        rec = self.record()
        assert rec.errors == []
        return waitingroom.analyse(SKU, self.rate, int(self.starts * 1000), rec.queue_for(SKU),
                                   rec.queue_buys_for(SKU), rec.queue_stats_for(SKU))

    def orders(self) -> list[tuple[str, int]]:
        return [(f"o-{u}", u) for u in self.admitted_at]


def kinds(findings: list[waitingroom.Finding]) -> set[str]:
    return {f.kind for f in findings}


def findings(sim: Sim, tol: Tolerance = waitingroom.DEFAULT_TOLERANCE, **kw) -> list[waitingroom.Finding]:
    return waitingroom.check(sim.analysis(), tol, orders=sim.orders(), complete=True, **kw)


@pytest.fixture(scope="module")
def clean() -> Sim:
    return Sim().run()


# -- a room that keeps the contract -----------------------------------------------------------

def test_a_room_that_keeps_the_contract_passes(clean: Sim):
    assert findings(clean) == []
    r = waitingroom.report(clean.analysis())
    assert (r["joined"], r["joined_before_start"], r["joined_after_start"], r["admitted"]) == (400, 300, 100, 400)
    assert r["bought"] == 400 and r["outcomes"] == {"admitted": 400}
    assert abs(r["rho_before_start"]) < 0.2 and r["rho_after_start"] > 0.9
    assert 40 < r["admissions_per_s_mean"] < 60
    w = r["wait_s"]
    assert w["n"] == 400 and 0 < w["p50"] <= w["p90"] <= w["p99"] <= w["max"]
    assert r["overtaken_max"] == 0


def test_sold_out_tickets_learn_it_and_are_not_violations():
    sim = Sim(stock=250).run()
    assert findings(sim) == []
    r = waitingroom.report(sim.analysis())
    assert r["admitted"] == 250 and r["outcomes"] == {"admitted": 250, "SOLD_OUT": 150}


def test_the_gateway_clock_is_used_when_answers_carry_a_date(clean: Sim):
    a = clean.analysis()
    j = a.admitted[0]
    lo, hi = j.interval(waitingroom.SERVER)
    assert lo == int(lo) and hi == int(hi) and lo <= j.admission.ts < hi
    # without Date headers only the client's clock is used, and still nothing is found
    for e in clean.entries:
        if e.get("event") == records.QUEUE:
            e["server_s"] = None
    try:
        assert clean.analysis().admitted[0].interval(waitingroom.SERVER) is None
        assert findings(clean) == []
    finally:
        clean.entries.clear()
        clean.run()


# -- each violation, seeded --------------------------------------------------------------------

def test_catches_a_purchase_without_a_pass(clean: Sim):
    sim = Sim().run()
    for kind in (PASS_NONE, PASS_FORGED, PASS_OTHER):
        sim.entries.append(records.queue_buy_entry(sku=SKU, user_id=5, pass_kind=kind, status=200, code="OK",
                                                   ts=sim.starts + 1, order_no=f"x-{kind}"))
    found = [f for f in findings(sim) if f.kind == "purchase_without_pass"]
    assert len(found) == 3 and "'forged'" in found[1].message
    # refused (403) attempts are what the contract wants
    ok = Sim().run()
    ok.entries.append(records.queue_buy_entry(sku=SKU, user_id=5, pass_kind=PASS_NONE, status=403,
                                              code="QUEUE_PASS_REQUIRED", ts=ok.starts + 1))
    assert findings(ok) == []


def test_catches_an_order_of_a_user_never_admitted(clean: Sim):
    a = clean.analysis()
    orders = [*clean.orders(), ("o-ghost", 999_999)]
    found = waitingroom.check(a, orders=orders, complete=True)
    assert kinds(found) == {"order_without_admission"} and "999999" in found[0].message
    # not judged when others may have bought (the run did not create the sale)
    assert waitingroom.check(a, orders=orders, complete=False) == []


def test_catches_admissions_faster_than_the_rate():
    sim = Sim(speed=3.0).run()
    found = findings(sim)
    assert "admission_rate_exceeded" in kinds(found)
    assert "at R = 50/s" in next(f.message for f in found if f.kind == "admission_rate_exceeded")


def test_a_burst_of_one_second_is_allowed_but_not_two():
    sim = Sim(pre=200, post=0).run()
    start = sim.starts
    first = sorted(sim.admitted_at, key=sim.admitted_at.__getitem__)
    for u in first[:50]:  # one second's worth let through at once at the start: the burst
        sim.admitted_at[u] = start
    assert "admission_rate_exceeded" not in kinds(findings(_replay(sim)))
    for u in first[:120]:  # more than R·1 + R at once
        sim.admitted_at[u] = start
    assert "admission_rate_exceeded" in kinds(findings(_replay(sim)))


def _replay(sim: Sim) -> Sim:
    """The clients again, against ``sim.admitted_at`` as edited."""
    order = sorted(sim.admitted_at, key=lambda u: (sim.admitted_at[u], u))
    joins = {e["user_id"]: e["t0"] for e in sim.entries if e.get("event") == records.QUEUE and e["step"] == "join"}
    sale = [e for e in sim.entries if e.get("event") == records.SALE]
    sim.entries[:] = sale
    for u in order:
        sim.client(u, joins[u], order, None)
    return sim


def test_catches_late_joiners_let_through_out_of_order():
    found = findings(Sim(fifo=False).run())
    assert "admitted_out_of_order" in kinds(found)
    # within the stated bound it passes
    assert "admitted_out_of_order" not in kinds(findings(Sim(fifo=False).run(), Tolerance(order_slack=100)))


def test_catches_a_late_joiner_let_through_before_the_early_ones(clean: Sim):
    sim = Sim(pre=300, post=20).run()
    late = max(sim.admitted_at, key=sim.admitted_at.__getitem__)
    sim.admitted_at[late] = sim.starts + 1.0  # ahead of most who joined before the start
    sim.admitted_at = dict(sorted(sim.admitted_at.items(), key=lambda kv: kv[1]))
    found = [f for f in findings(_replay(sim)) if f.kind == "admitted_out_of_order"]
    assert len(found) == 1 and f"user {late} " in found[0].message


def test_catches_early_joiners_not_shuffled():
    found = findings(Sim(shuffle=False).run())
    assert "not_shuffled" in kinds(found)
    assert "Spearman rho +0.9" in next(f.message for f in found if f.kind == "not_shuffled")


def test_catches_an_admission_before_the_start(clean: Sim):
    sim = Sim(pre=100, post=0).run()
    first = min(sim.admitted_at, key=sim.admitted_at.__getitem__)
    sim.admitted_at[first] = sim.starts - 5
    assert "queue_admitted_before_start" in kinds(findings(_replay(sim)))


def test_catches_a_position_that_grows():
    sim = Sim().run()
    by_user: dict[int, list[dict]] = {}
    for e in sim.entries:
        if e.get("event") == records.QUEUE and e["position"] is not None:
            by_user.setdefault(e["user_id"], []).append(e)
    user, placed = next((u, es) for u, es in by_user.items() if len(es) >= 3)
    placed[1]["position"] = placed[0]["position"] + 3  # a later place than the answer before
    found = [f for f in findings(sim) if f.kind == "position_grew"]
    assert len(found) == 1 and f"user {user}," in found[0].message


def test_catches_two_tickets_a_shared_ticket_and_a_shared_pass():
    sim = Sim().run()
    answers = [e for e in sim.entries if e.get("event") == records.QUEUE]
    a, b = answers[3], next(e for e in answers if e["user_id"] != answers[3]["user_id"] and e["code"] == "QUEUED")
    second = dict(a, ticket="tk-other", step="poll", t0=a["t0"] + 0.1, ts=a["ts"] + 0.1)
    sim.entries.append(second)
    sim.entries.append(dict(b, ticket="tk-shared-1"))
    sim.entries.append(dict(a, ticket="tk-shared-1", user_id=a["user_id"] + 10_000))
    admitted = [e for e in answers if e["code"] == "ADMITTED"]
    sim.entries.append(dict(admitted[1], **{"pass": admitted[0]["pass"]}))  # user 2 gets user 1's pass too
    found = kinds(findings(sim))
    assert {"two_tickets", "ticket_shared", "pass_shared"} <= found


def test_a_fresh_pass_is_fine_but_back_in_line_after_admission_is_not():
    sim = Sim(pre=100, post=0).run()
    adm = next(e for e in sim.entries if e.get("code") == "ADMITTED")
    sim.entries.append(dict(adm, step="poll", t0=adm["ts"] + 1, ts=adm["ts"] + 1.01, **{"pass": "renewed"}))
    assert findings(sim) == []
    sim.entries.append(dict(adm, step="poll", t0=adm["ts"] + 2, ts=adm["ts"] + 2.01, status=202, code="QUEUED",
                            position=3, **{"pass": None}))
    found = [f for f in findings(sim) if f.kind == "admitted_twice"]
    assert len(found) == 1 and f"user {adm['user_id']} " in found[0].message


def test_catches_a_ticket_told_to_wait_after_the_sale_sold_out():
    sim = Sim(stock=250).run()
    r = waitingroom.report(sim.analysis())
    assert r["first_410"]["code"] == "SOLD_OUT" and r["first_410"]["told"] == 150
    assert "first 410" in "\n".join(waitingroom.report_lines(r))
    gone = min((e for e in sim.entries if e.get("status") == 410), key=lambda e: e["ts"])
    queued = next(e for e in sim.entries if e.get("code") == "QUEUED" and e["user_id"] != gone["user_id"])
    sim.entries.append(dict(queued, step="poll", t0=gone["ts"] + 3, ts=gone["ts"] + 3.01, position=1))
    found = [f for f in findings(sim) if f.kind == "queued_after_sold_out"]
    assert len(found) == 1 and "3.00 s after" in found[0].message
    # units came back (a refused delivery, a release): admission resumes, waiting is right
    assert "queued_after_sold_out" not in kinds(findings(sim, units_came_back=True))


def test_the_gateway_count_of_admissions_is_checked_and_reported():
    sim = Sim(stats_every=0.5).run()
    assert findings(sim) == []
    r = waitingroom.report(sim.analysis())
    g = r["gateway"]
    assert g["final"] == 400 and g["samples"] > 20
    assert 0 < g["by"]["50%"] < g["by"]["90%"] < g["by"]["100%"] < 400 / sim.rate + 5
    assert sim.rate * 0.8 < g["peak_per_s"] <= 2 * sim.rate
    assert "admitted (gateway)" in "\n".join(waitingroom.report_lines(r))
    # the count jumps by more than R·T + R between two samples: caught, though the
    # clients saw nothing wrong
    stats = [e for e in sim.entries if e.get("event") == records.QUEUE_STATS and e["admitted"] > 10]
    for e in stats[3:]:
        e["admitted"] += 300
    found = [f for f in findings(sim) if f.kind == "admission_rate_exceeded"]
    assert len(found) == 1 and "the gateway's count" in found[0].message
    assert kinds(findings(sim)) == {"admission_rate_exceeded"}


# -- the numbers --------------------------------------------------------------------------------

def test_spearman_and_percentiles():
    assert waitingroom.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert waitingroom.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert waitingroom.spearman([1, 2, 3], [5, 5, 5]) is None
    assert waitingroom.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert waitingroom.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5 ** 0.5)  # ties: mean ranks
    assert waitingroom.percentile([3, 1, 2, 4, 5], 50) == 3
    assert waitingroom.percentile([1, 2], 90) == pytest.approx(1.9)
    assert waitingroom.percentile([], 50) is None


def test_most_intervals_within_a_window():
    spans = [(0.0, 0.5), (0.2, 0.9), (0.4, 1.1), (1.0, 1.3), (3.0, 3.1)]
    assert waitingroom.most_within(spans, 1.1) == (3, 0.2)  # [0.2, 1.3] holds three
    assert waitingroom.most_within(spans, 0.1)[0] == 1
    assert waitingroom.most_within(spans, 10)[0] == 5
    assert waitingroom.most_within([], 1)[0] == 0


def test_record_lines_read_back():
    e = records.queue_entry(sku="s", user_id=3, step="poll", status=202, code="QUEUED", t0=1.0, ts=1.5,
                            ticket="t", position=None, eta_s=2.5, units_left=7, retry_after=1.0,
                            server_s=1, scenario="QueueCrowd")
    b = records.queue_buy_entry(sku="s", user_id=3, pass_kind=PASS_OTHER, status=403,
                                code="QUEUE_PASS_REQUIRED", ts=2.0, ticket="t")
    rec = records.parse_lines([records.line(e), records.line(b), b'{"event":"queue_buy","sku":"s","user_id":1,'
                               b'"pass_kind":"stolen","status":200,"ts":1}\n'])
    (q,), (buy,) = rec.queue, rec.queue_buys
    assert (q.step, q.position, q.units_left, q.retry_after, q.server_s, q.queued) == ("poll", None, 7, 1.0, 1, True)
    assert (buy.pass_kind, buy.status, buy.code) == (PASS_OTHER, 403, "QUEUE_PASS_REQUIRED")
    assert len(rec.errors) == 1 and "stolen" in rec.errors[0]
    assert records.http_date_s("Mon, 30 Nov 2026 06:00:00 GMT") == 1_796_018_400
    assert records.http_date_s("yesterday") is None and records.http_date_s(None) is None


# -- through the verifier ------------------------------------------------------------------------

def _snapshot(sim: Sim, tmp_path: Path) -> verify.Snapshot:
    path = tmp_path / "record.jsonl"
    path.write_bytes(b"".join(records.line(e) for e in sim.entries))
    snap = verify.Snapshot(sku=SKU, sale=Sale(sku=SKU, stock=1000, admit_rate=sim.rate))
    snap.orders = {no: Order(Purchase(no, SKU, u, (u,), 1, 0, 0), "delivered") for no, u in sim.orders()}
    verify._take_record(snap, records.read_record(path))
    return snap


def test_the_verifier_reports_the_room_and_its_violations(clean: Sim, tmp_path: Path):
    snap = _snapshot(clean, tmp_path)
    assert snap.window.admit_rate == clean.rate and snap.created_by_run
    assert verify.check_waiting_room(snap) == []
    table = verify.render(snap, [])
    for row in ("waiting room", "joined", "admitted", "admissions/s", "wait to admission", "Spearman rho"):
        assert row in table
    assert "p90" in table and "p99" in table
    summary = verify.summary(snap)["waiting_room"]
    assert summary["admitted"] == 400
    broken = Sim(speed=3.0, shuffle=False).run()
    violations = verify.check_waiting_room(_snapshot(broken, tmp_path))
    assert {v.kind for v in violations} >= {"admission_rate_exceeded", "not_shuffled"}
    assert {v.invariant for v in violations} == {9}


def test_a_sale_without_a_waiting_room_is_not_judged(clean: Sim, tmp_path: Path):
    snap = _snapshot(clean, tmp_path)
    snap.window = verify.SaleWindow(starts_at_ms=snap.window.starts_at_ms)
    assert verify.queue_analysis(snap) is None and verify.check_waiting_room(snap) == []
    assert "waiting room" not in verify.render(snap, [])


def test_the_rate_comes_from_the_stored_sale_when_the_record_has_none():
    note = records.SaleNote(line=1, sku=SKU, scenario="QueueCrowd", outcome="exists")
    assert verify.SaleWindow.of(note, {"admit_rate": 200.0}).admit_rate == 200.0
    assert verify.SaleWindow.of(None, {"admit_rate": None}).admit_rate is None


def test_a_join_answered_503_may_have_taken_the_place():
    """A user whose join before the start was answered 503 (outcome unknown) and who
    joined again after it, let in at once: it may hold a place from before the start,
    so it is not judged as a late joiner that overtook the early ones."""
    sim = Sim(pre=200, post=0).run()
    first = min(sim.admitted_at, key=sim.admitted_at.__getitem__)
    mine = [e for e in sim.entries if e.get("user_id") == first and e.get("event") == records.QUEUE]
    sim.entries = [e for e in sim.entries if e not in mine]
    sim.entries.append(records.queue_entry(sku=SKU, user_id=first, step="join", status=503, code="UNAVAILABLE",
                                           t0=sim.starts - 3, ts=sim.starts - 2, retry_after=1.0))
    sim.entries.append(records.queue_entry(sku=SKU, user_id=first, step="join", status=200, code="ADMITTED",
                                           t0=sim.starts + 0.2, ts=sim.starts + 0.25, pass_="p-first"))
    a = sim.analysis()
    assert first not in {j.user_id for j in a.post} | {j.user_id for j in a.pre}  # when it joined is not known
    assert findings(sim) == []
    # the same user, had its first join come after the start, would have overtaken the crowd
    sim.entries[-2] = dict(sim.entries[-2], t0=sim.starts + 0.1, ts=sim.starts + 0.15)
    assert "admitted_out_of_order" in kinds(findings(sim))


# -- a real room, through the gateway's API ---------------------------------------------------------

async def test_a_room_through_the_api_keeps_invariant_9(api: Api, sku: str, tmp_path: Path):
    """30 buyers join a room (R = 100/s, stock 25) before its start, poll, buy with their
    pass; every tenth also tries without one after the start (403). Recorded as QueueCrowd
    records, the verifier finds every invariant kept and reports the room; a pass-less
    200 seeded into the record is then caught."""
    rate, stock = 100, 25
    rng = random.Random(sku)
    starts = (int(time.time()) + 2) * 1000
    await api.create_sale(sku, stock, shards=4, starts_at=records.rfc3339(starts),
                          waiting_room={"admit_rate": rate})
    lines = [records.sale_entry(sku=sku, scenario="QueueCrowd", outcome="created", ts=time.time(), stock=stock,
                                per_user_limit=1, shards=4, starts_at_ms=starts, admit_rate=rate)]

    async def ask(user: int, ticket: str | None) -> tuple[int, dict]:
        t0 = time.time()
        if ticket is None:
            resp = await api.client.post(f"/api/queue/{sku}", headers={"X-User-Id": str(user)})
        else:
            resp = await api.client.get(f"/api/queue/{sku}/{ticket}", headers={"X-User-Id": str(user)})
        body = await resp.json()
        lines.append(records.queue_entry(
            sku=sku, user_id=user, step="join" if ticket is None else "poll", status=resp.status, code=body["code"],
            t0=t0, ts=time.time(), ticket=body.get("ticket") or ticket, position=body.get("position"),
            units_left=body.get("units_left"), pass_=body.get("pass"),
            server_s=records.http_date_s(resp.headers.get("Date")), scenario="QueueCrowd"))
        return resp.status, body

    async def purchase(user: int, ticket: str | None, pass_: str | None, kind: str) -> int:
        t0 = time.time()
        status, body, _ = await api.buy(sku, user, await api.token(user), 1,
                                        headers={"X-Queue-Pass": pass_} if pass_ else None)
        lines.append(records.queue_buy_entry(sku=sku, user_id=user, pass_kind=kind, status=status, code=body["code"],
                                             ts=time.time(), t0=t0, ticket=ticket, order_no=body.get("order_no")))
        return status

    async def buyer(user: int) -> None:
        ticket = None
        status, body = await ask(user, None)
        while status in (202, 503):
            ticket = body.get("ticket", ticket)
            await asyncio.sleep(rng.uniform(0.05, 0.25))  # at random moments: not in join order
            status, body = await ask(user, ticket)
        if status == 200:
            if user % 10 == 0:  # admitted, so after the start: first without the pass
                assert await purchase(user, ticket, None, PASS_NONE) == 403
            assert await purchase(user, ticket, body["pass"], PASS_OWN) in (200, 410)

    await asyncio.gather(*(buyer(u) for u in range(1, 31)))
    path = tmp_path / "record.jsonl"
    path.write_bytes(b"".join(records.line(e) for e in lines))
    snap = await verify.collect(api.gateway.store, sku, admitted=path)
    assert snap.window.admit_rate == rate and len(snap.queue) > 30
    assert verify.check(snap, expect_sold_out=True) == []
    room = verify.summary(snap)["waiting_room"]
    admitted = {e["user_id"] for e in lines if e.get("code") == "ADMITTED"}
    assert room["joined_before_start"] == 30 and room["admitted"] >= stock and room["bought"] == stock
    assert room["purchases"]["none 403 QUEUE_PASS_REQUIRED"] == sum(1 for u in (10, 20, 30) if u in admitted)

    with open(path, "ab") as fh:  # a purchase without a pass that the gateway let through
        fh.write(records.line(records.queue_buy_entry(sku=sku, user_id=7, pass_kind=PASS_NONE, status=200,
                                                      code="OK", ts=time.time(), order_no="x")))
    snap = await verify.collect(api.gateway.store, sku, admitted=path)
    assert {v.kind for v in verify.check(snap)} == {"purchase_without_pass"}
