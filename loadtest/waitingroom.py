"""The waiting room of a load run, read back from what the clients saw: per user, when it
joined, every answer to its polls, when it was let through and what its purchase got;
and the contract's invariant 9 checked on that.

Pure functions on the record file's ``queue`` and ``queue_buy`` events
(``loadtest.records``), so that every check is tested from synthetic records without
Locust, Redis or a gateway. ``loadtest.verify`` calls :func:`check` and :func:`report`
for every sale with a waiting room; ``loadtest.queue_picture`` draws :func:`analyse`'s
series.

**When was a user admitted?** A client learns of its admission at a poll, not when the
gateway let it through. The moment is bounded: after the request of the user's previous
answer (which still said ``QUEUED``) left the client, and before the ``ADMITTED``
answer came back. So every admission is an interval ``[lo, hi]`` that surely holds it,
on the client's clock (``t0`` of the previous answer, ``ts`` of the admitting one) and,
when the answers carry a ``Date`` header, on the gateway's (``[server_s of the previous,
server_s + 1)``). The checks count only what the intervals prove:

(b) **Rate.** At most R admissions per second plus one second's burst: in any window of
    W seconds, the admissions whose whole interval lies inside it must number at most
    ``(R·W + max(R, 1))·(1 + tolerance)``, for W = 1, 2, 5, 10, 30 s and the whole run, on each
    clock the records allow [``admission_rate_exceeded``]. When the run sampled the
    gateway's own count of admissions (``queue_stats``, from ``GET /admin/sales/{sku}``),
    the count may grow between two samples by at most ``(R·T + max(R, 1))·(1 + tolerance)``,
    T the longest the time between them can have been (first request out to last
    answer in) [``admission_rate_exceeded``].
(c) **Order.** For users who joined after ``starts_at``, first in, first out: a user v
    *overtook* u when u surely joined before v (u before the start, or u's join answer
    came before v's first join request left: a join answered 503 may have taken the
    place all the same) and u was still answered ``QUEUED`` to a poll sent after
    v's ``ADMITTED`` came back. Each v may overtake at most ``order_slack`` users (the
    bound the gateway states: by default R/10 + max(R, 1), one admitter tick's
    admissions and one second's burst, for two admitters overlapping)
    [``admitted_out_of_order``]. Those who joined before the start must be shuffled:
    Spearman's rho between their join order and their admission order is reported and
    must stay within ±max(``rho_max``, 4/√(n−1)) (default 0.2; a random order's rho has
    a standard deviation of 1/√(n−1), so a fair shuffle fails with odds below 1 in
    10,000) [``not_shuffled``]. Nobody is let through before the start
    [``queue_admitted_before_start``].
(a) **No purchase without a pass.** A purchase sent without ``X-Queue-Pass``, with a
    forged one or with another user's must not be admitted [``purchase_without_pass``];
    when the run created the sale (every buyer is in the record), every order the sale
    holds belongs to a user the waiting room admitted [``order_without_admission``].
(d) A ticket's ``position`` never grows [``position_grew``].
(f) **The stock's news.** Once a ticket was told ``410`` (``SOLD_OUT`` / ``SALE_ENDED``),
    every waiting ticket learns it at its next poll: no ``QUEUED`` answer to a request
    sent more than ``news_slack_s`` (2 s: the admitter's tick, each process's refresh)
    after the first 410 came back, unless units came back to the sale (admission then
    resumes) [``queued_after_sold_out``].
(e) One user, one place: no user holds two tickets [``two_tickets``], no ticket or
    pass is given to two users [``ticket_shared``, ``pass_shared``], and a user once
    admitted is never put back in line to be let through again (a later answer
    ``QUEUED``) [``admitted_twice``]. A fresh pass on a later poll is not a second
    admission: a pass may carry its expiry.

It also measures: users joined (before / after the start), admitted, bought, told
``SOLD_OUT`` / ``SALE_ENDED``, still waiting; admissions per second (mean over the
admission phase, and the peak of the answers seen in any second); the wait from joining
(or from the start, for those who joined before it) to admission, as percentiles.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.records import PASS_OWN, QueueAnswer, QueueBuy, QueueStats

RATE_WINDOWS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds; the whole run is checked too
CLIENT, SERVER = "client", "server"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far the run may stray from the contract before it is a violation."""

    rate: float = 0.10  # relative, on top of R·W + max(R, 1)
    order_slack: int | None = None  # users one may overtake; None: the gateway's stated bound, R/10 + max(R, 1)
    rho_max: float = 0.2  # |Spearman rho| of the pre-start joiners' join vs admission order ...
    rho_sigmas: float = 4.0  # ... or this many standard deviations of a random order's, 1/√(n−1)
    rho_min_users: int = 30  # fewer pre-start admissions than this: rho is reported, not judged
    start_slack_s: float = 1.5  # clock skew allowed around starts_at
    news_slack_s: float = 2.0  # how long after a first 410 another process may still answer QUEUED

    def rho_limit(self, n: int) -> float:
        """The largest |rho| a shuffled order may show among n: ``rho_max``, or for small n
        ``rho_sigmas`` standard deviations (a random order's rho has about 1/√(n−1)), so
        that a fair shuffle fails with odds below 1 in 10,000."""
        return max(self.rho_max, self.rho_sigmas / math.sqrt(max(1, n - 1)))

    def slack(self, admit_rate: float) -> int:
        """The gateway's README: while two admitters overlap, a ticket can be overtaken by
        at most one tick's admissions, R/10 + one second's burst (at least one)."""
        if self.order_slack is not None:
            return self.order_slack
        return math.ceil(admit_rate / 10 + max(admit_rate, 1.0))


DEFAULT_TOLERANCE = Tolerance()


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    message: str


@dataclass(slots=True)
class Journey:
    """One user's way through one sale's waiting room."""

    user_id: int
    answers: list[QueueAnswer] = field(default_factory=list)  # in the order the client got them
    buys: list[QueueBuy] = field(default_factory=list)

    @property
    def join(self) -> QueueAnswer | None:
        """The first join that was answered (not an overload answer)."""
        for a in self.answers:
            if a.step == "join" and (a.queued or a.admitted or a.gone):
                return a
        return None

    @property
    def join_started(self) -> float | None:
        """When the first join request left: an attempt answered 503 (outcome unknown)
        may still have taken the place, so the join happened between this and the first
        answered join's ``ts``."""
        times = [a.t0 for a in self.answers if a.step == "join"]
        return min(times) if times else None

    @property
    def tickets(self) -> set[str]:
        return {a.ticket for a in self.answers if a.ticket}

    @property
    def passes(self) -> set[str]:
        return {a.pass_ for a in self.answers if a.admitted and a.pass_}

    @property
    def admission_index(self) -> int | None:
        for i, a in enumerate(self.answers):
            if a.admitted:
                return i
        return None

    @property
    def admission(self) -> QueueAnswer | None:
        i = self.admission_index
        return None if i is None else self.answers[i]

    def interval(self, clock: str) -> tuple[float, float] | None:
        """When the gateway let this user through, surely: ``(lo, hi)`` on ``clock``;
        None if not admitted (or, on the server clock, without Date headers)."""
        i = self.admission_index
        if i is None:
            return None
        this = self.answers[i]
        before = self.answers[i - 1] if i > 0 else this
        if clock == CLIENT:
            return before.t0, this.ts
        if before.server_s is None or this.server_s is None:
            return None
        return float(before.server_s), float(this.server_s + 1)

    @property
    def last_queued_t0(self) -> float | None:
        """When the last request that was still answered ``QUEUED`` left the client."""
        times = [a.t0 for a in self.answers if a.queued]
        return max(times) if times else None

    @property
    def outcome(self) -> str:
        if self.admission is not None:
            return "admitted"
        gone = [a for a in self.answers if a.gone]
        if gone:
            return gone[-1].code or "410"
        return "waiting" if self.answers else "none"


@dataclass(slots=True)
class Analysis:
    """A sale's waiting room as the clients saw it."""

    sku: str
    admit_rate: float
    starts_at_s: float | None
    journeys: dict[int, Journey]
    pre: list[Journey] = field(default_factory=list)  # joined surely before the start
    post: list[Journey] = field(default_factory=list)  # joined surely after it
    admitted: list[Journey] = field(default_factory=list)  # in the order their ADMITTED came
    stats: list[QueueStats] = field(default_factory=list)  # the gateway's counts, sampled

    @property
    def buys(self) -> list[QueueBuy]:
        return [b for j in self.journeys.values() for b in j.buys]


def analyse(sku: str, admit_rate: float, starts_at_ms: int | None, answers: Iterable[QueueAnswer],
            buys: Iterable[QueueBuy] = (), stats: Iterable[QueueStats] = ()) -> Analysis:
    journeys: dict[int, Journey] = {}
    for a in answers:
        if a.sku == sku:
            journeys.setdefault(a.user_id, Journey(a.user_id)).answers.append(a)
    for b in buys:
        if b.sku == sku:
            journeys.setdefault(b.user_id, Journey(b.user_id)).buys.append(b)
    for j in journeys.values():
        j.answers.sort(key=lambda a: (a.t0, a.ts, a.line))
        j.buys.sort(key=lambda b: (b.ts, b.line))
    starts = starts_at_ms / 1000 if starts_at_ms else None
    out = Analysis(sku, admit_rate, starts, journeys)
    for j in journeys.values():
        join, began = j.join, j.join_started
        if join is None or began is None:
            continue
        if starts is None or began > starts:
            out.post.append(j)
        elif join.ts < starts:
            out.pre.append(j)
    out.stats = sorted((q for q in stats if q.sku == sku and q.admitted is not None), key=lambda q: (q.t0, q.line))
    out.admitted = sorted((j for j in journeys.values() if j.admission is not None),
                          key=lambda j: (j.admission.ts, j.user_id))  # type: ignore[union-attr]
    return out


# -- numbers ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None for fewer than 3 pairs or a constant series."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def rho(journeys: Sequence[Journey]) -> float | None:
    """Join order against admission order, over the admitted among ``journeys``."""
    pairs = [(j.join.ts, j.admission.ts) for j in journeys  # type: ignore[union-attr]
             if j.join is not None and j.admission is not None]
    return spearman([p[0] for p in pairs], [p[1] for p in pairs])


def most_within(intervals: Sequence[tuple[float, float]], width: float) -> tuple[int, float]:
    """The most intervals lying wholly inside one window ``[t, t + width]``, and its ``t``
    (the best window starts at some interval's start)."""
    ordered = sorted(intervals)
    ends: list[float] = []
    best, best_t = 0, ordered[0][0] if ordered else 0.0
    for lo, hi in reversed(ordered):  # ends of the intervals starting at or after lo
        bisect.insort(ends, hi)
        n = bisect.bisect_right(ends, lo + width + 1e-9)
        if n > best:
            best, best_t = n, lo
    return best, best_t


def rate_limit(admit_rate: float, width: float, tolerance: float) -> float:
    """At most R per second plus one second's burst (at least one admission), within
    the tolerance."""
    return (admit_rate * width + max(admit_rate, 1.0)) * (1 + tolerance)


def waits(a: Analysis) -> list[float]:
    """Seconds from joining (or from the start, for who joined before it) to admission."""
    out = []
    for j in a.admitted:
        join, adm = j.join, j.admission
        if join is None or adm is None:
            continue
        since = max(join.ts, a.starts_at_s) if a.starts_at_s is not None else join.ts
        out.append(max(0.0, adm.ts - since))
    return out


def admissions_per_second(a: Analysis) -> tuple[float | None, int]:
    """Mean admissions per second from the first to the last ADMITTED answer, and the
    most ADMITTED answers the clients got in any one second (what they saw)."""
    times = sorted(j.admission.ts for j in a.admitted)  # type: ignore[union-attr]
    if not times:
        return None, 0
    span = times[-1] - times[0]
    mean = len(times) / span if span > 0 else None
    peak, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        peak = max(peak, hi - lo + 1)
    return mean, peak


# -- the checks ------------------------------------------------------------------------------

def check_rate(a: Analysis, tol: Tolerance) -> list[Finding]:
    out: list[Finding] = []
    for clock in (CLIENT, SERVER):
        spans = [iv for j in a.admitted if (iv := j.interval(clock)) is not None]
        if not spans or (clock == SERVER and len(spans) < len(a.admitted)):
            continue  # the gateway's clock only when every admission carries it
        whole = max(hi for _, hi in spans) - min(lo for lo, _ in spans)
        for width in (*[w for w in RATE_WINDOWS if w < whole], whole):
            n, t = most_within(spans, width)
            limit = rate_limit(a.admit_rate, width, tol.rate)
            if n > limit:
                out.append(Finding("admission_rate_exceeded",
                                   f"{n} admissions within {width:.1f} s from t={t:.3f} ({clock} clock), "
                                   f"more than R·W + max(R, 1) = {a.admit_rate * width + max(a.admit_rate, 1):.0f} "
                                   f"(+{tol.rate:.0%}: {limit:.0f}) at R = {a.admit_rate:g}/s"))
                break  # one window per clock says it
    return out


def check_gateway_rate(a: Analysis, tol: Tolerance) -> list[Finding]:
    """The gateway's own count of admissions, sampled: between two samples it grows by
    at most R per second of the longest time that can lie between them, plus R."""
    samples = a.stats
    worst: tuple[float, QueueStats, QueueStats] | None = None
    for i, first in enumerate(samples):
        for later in samples[i + 1:]:
            if later.t0 <= first.ts:
                continue  # not surely later
            grew = (later.admitted or 0) - (first.admitted or 0)
            limit = rate_limit(a.admit_rate, later.ts - first.t0, tol.rate)
            if grew > limit and (worst is None or grew / limit > worst[0]):
                worst = (grew / limit, first, later)
    if worst is None:
        return []
    _, first, later = worst
    return [Finding("admission_rate_exceeded",
                    f"the gateway's count of admissions grew from {first.admitted} to {later.admitted} within at "
                    f"most {later.ts - first.t0:.2f} s (t={first.t0:.3f}..{later.ts:.3f}): more than R·T + max(R, 1) "
                    f"(+{tol.rate:.0%}) at R = {a.admit_rate:g}/s")]


def gateway_progress(a: Analysis) -> dict[str, Any]:
    """From the gateway's sampled count: its final value; by when (the answer's arrival,
    seconds since the start, or since the first sample) it had let half, 90 % and all
    of them through; and the most admissions per second over any second or more (pairs
    of samples at least 1 s apart, by their mid-times). The tail is slow by design on
    a sold-out sale: the room lets more through only as units stay unsold."""
    samples = a.stats
    out: dict[str, Any] = {"samples": len(samples), "final": None, "by": {}, "peak_per_s": None}
    if not samples:
        return out
    origin = a.starts_at_s if a.starts_at_s is not None else samples[0].t0
    final = max(q.admitted or 0 for q in samples)
    out["final"] = final
    for label, share in (("50%", 0.5), ("90%", 0.9), ("100%", 1.0)):
        reached = next((q for q in samples if (q.admitted or 0) >= share * final), None)
        out["by"][label] = None if reached is None or final == 0 else reached.ts - origin
    mids = [((q.t0 + q.ts) / 2, q.admitted or 0) for q in samples]
    for i, (t, n) in enumerate(mids):
        for u, m in mids[i + 1:]:
            if u - t >= 1.0:
                rate = (m - n) / (u - t)
                out["peak_per_s"] = rate if out["peak_per_s"] is None else max(out["peak_per_s"], rate)
    return out


def overtakes(a: Analysis) -> list[tuple[Journey, int]]:
    """For each admitted user who joined after the start: how many users who surely
    joined before it were still waiting after it was surely admitted."""
    pre_waiting = sorted(t for j in a.pre if (t := j.last_queued_t0) is not None)
    late = [j for j in a.post if j.join is not None and j.join_started is not None]
    by_join_end = sorted(late, key=lambda j: j.join.ts)  # type: ignore[union-attr]
    result: list[tuple[Journey, int]] = []
    still_waiting: list[float] = []  # last QUEUED t0 of the late joiners surely before v
    k = 0
    for v in sorted(late, key=lambda j: j.join_started):  # type: ignore[arg-type,return-value]
        began = v.join_started
        assert began is not None
        while k < len(by_join_end) and by_join_end[k].join.ts < began:  # type: ignore[union-attr]
            t = by_join_end[k].last_queued_t0
            if t is not None:
                bisect.insort(still_waiting, t)
            k += 1
        iv = v.interval(CLIENT)
        if iv is None:
            continue
        admitted_by = iv[1]
        n = len(pre_waiting) - bisect.bisect_right(pre_waiting, admitted_by)
        n += len(still_waiting) - bisect.bisect_right(still_waiting, admitted_by)
        result.append((v, n))
    return result


def check_order(a: Analysis, tol: Tolerance) -> list[Finding]:
    out: list[Finding] = []
    slack = tol.slack(a.admit_rate)
    worst = sorted(((n, v) for v, n in overtakes(a) if n > slack), key=lambda p: (-p[0], p[1].user_id))
    for n, v in worst[:20]:
        out.append(Finding("admitted_out_of_order",
                           f"user {v.user_id} (joined after the start, at t={v.join.ts:.3f}) was admitted "  # type: ignore[union-attr]
                           f"while {n} users who joined before it still waited (bound {slack})"))
    if len(worst) > 20:
        out.append(Finding("admitted_out_of_order", f"… and {len(worst) - 20} more users overtook more than "
                                                    f"{slack}"))
    r = rho(a.pre)
    n_pre = sum(1 for j in a.pre if j.admission is not None)
    if r is not None and n_pre >= tol.rho_min_users and abs(r) > tol.rho_limit(n_pre):
        out.append(Finding("not_shuffled",
                           f"the {n_pre} users admitted after joining before the start came in with Spearman rho "
                           f"{r:+.3f} between join and admission order (|rho| ≤ {tol.rho_limit(n_pre):.3f} "
                           f"expected: shuffled)"))
    if a.starts_at_s is not None:
        early = [j for j in a.admitted if (iv := j.interval(CLIENT)) and iv[1] < a.starts_at_s - tol.start_slack_s]
        for j in early[:20]:
            out.append(Finding("queue_admitted_before_start",
                               f"user {j.user_id} was admitted at t={j.admission.ts:.3f}, "  # type: ignore[union-attr]
                               f"{a.starts_at_s - j.admission.ts:.1f} s before starts_at"))  # type: ignore[union-attr]
    return out


def check_passes(a: Analysis, orders: Iterable[tuple[str, int]] = (), *, complete: bool = False) -> list[Finding]:
    """(a): no purchase admitted without the buyer's own pass; with ``complete`` (every
    buyer of the sale is in the record), every order (``(order_no, user_id)``) is a user's
    the waiting room admitted."""
    out: list[Finding] = []
    for b in a.buys:
        if b.status == 200 and b.pass_kind != PASS_OWN:
            out.append(Finding("purchase_without_pass",
                               f"user {b.user_id}: a purchase with pass '{b.pass_kind}' was admitted "
                               f"(200, order {b.order_no})"))
    if complete:
        let_in = {j.user_id for j in a.admitted}
        for order_no, user_id in orders:
            if user_id not in let_in:
                out.append(Finding("order_without_admission",
                                   f"order {order_no} of user {user_id}: the waiting room never admitted "
                                   f"that user"))
    return out


def check_positions(a: Analysis) -> list[Finding]:
    out: list[Finding] = []
    for j in a.journeys.values():
        last: dict[str, tuple[int, float]] = {}
        for ans in j.answers:
            if ans.ticket is None or ans.position is None:
                continue
            before = last.get(ans.ticket)
            if before is not None and ans.position > before[0]:
                out.append(Finding("position_grew",
                                   f"user {j.user_id}, ticket {ans.ticket}: position {before[0]} at "
                                   f"t={before[1]:.3f}, then {ans.position} at t={ans.ts:.3f}"))
            last[ans.ticket] = (ans.position, ans.ts)
    return out


def check_places(a: Analysis) -> list[Finding]:
    out: list[Finding] = []
    holders: dict[str, set[int]] = defaultdict(set)
    pass_holders: dict[str, set[int]] = defaultdict(set)
    for j in a.journeys.values():
        if len(j.tickets) > 1:
            out.append(Finding("two_tickets", f"user {j.user_id} holds {len(j.tickets)} tickets: "
                                              f"{', '.join(sorted(j.tickets))[:160]}"))
        first = j.admission
        if first is not None:
            again = next((x for x in j.answers if x.queued and x.t0 > first.ts), None)
            if again is not None:
                out.append(Finding("admitted_twice",
                                   f"user {j.user_id} was admitted at t={first.ts:.3f}, then answered QUEUED "
                                   f"(position {again.position}) at t={again.ts:.3f}: back in line"))
        for t in j.tickets:
            holders[t].add(j.user_id)
        for p in j.passes:
            pass_holders[p].add(j.user_id)
    for ticket, users in holders.items():
        if len(users) > 1:
            out.append(Finding("ticket_shared", f"ticket {ticket} was given to users {sorted(users)[:10]}"))
    for pass_, users in pass_holders.items():
        if len(users) > 1:
            out.append(Finding("pass_shared", f"pass {pass_[:24]}… was given to users {sorted(users)[:10]}"))
    return out


def first_gone(a: Analysis) -> QueueAnswer | None:
    """The first 410 (SOLD_OUT or SALE_ENDED) the room answered, by when it came back."""
    gone = [x for j in a.journeys.values() for x in j.answers if x.gone]
    return min(gone, key=lambda x: (x.ts, x.line)) if gone else None


def check_news(a: Analysis, tol: Tolerance, *, units_came_back: bool = False) -> list[Finding]:
    """After the first 410, nobody is told to keep waiting (unless units came back)."""
    first = first_gone(a)
    if first is None or (units_came_back and first.code == "SOLD_OUT"):
        return []
    late = sorted((x for j in a.journeys.values() for x in j.answers
                   if x.queued and x.t0 > first.ts + tol.news_slack_s), key=lambda x: x.t0)
    out = [Finding("queued_after_sold_out",
                   f"user {x.user_id} was answered QUEUED (position {x.position}) to a poll sent "
                   f"{x.t0 - first.ts:.2f} s after another ticket was told 410 {first.code}")
           for x in late[:20]]
    if len(late) > 20:
        out.append(Finding("queued_after_sold_out", f"… and {len(late) - 20} more QUEUED answers"))
    return out


def check(a: Analysis, tol: Tolerance = DEFAULT_TOLERANCE, *, orders: Iterable[tuple[str, int]] = (),
          complete: bool = False, units_came_back: bool = False) -> list[Finding]:
    """Invariant 9 on a sale's waiting room, as findings (empty: kept)."""
    return (check_passes(a, orders, complete=complete) + check_rate(a, tol) + check_gateway_rate(a, tol)
            + check_order(a, tol) + check_positions(a) + check_places(a)
            + check_news(a, tol, units_came_back=units_came_back))


# -- the report ------------------------------------------------------------------------------

def report(a: Analysis, tol: Tolerance = DEFAULT_TOLERANCE) -> dict[str, Any]:
    outcomes = Counter(j.outcome for j in a.journeys.values() if j.join is not None)
    wait = waits(a)
    mean, peak = admissions_per_second(a)
    tries = Counter(f"{b.pass_kind} {b.status} {b.code}" for b in a.buys)
    sizes = [n for _, n in overtakes(a)]
    gateway = gateway_progress(a)
    gone = first_gone(a)
    return {
        "admit_rate": a.admit_rate,
        "starts_at_s": a.starts_at_s,
        "joined": sum(1 for j in a.journeys.values() if j.join is not None),
        "joined_before_start": len(a.pre), "joined_after_start": len(a.post),
        "admitted": len(a.admitted),
        "outcomes": dict(outcomes),
        "bought": sum(1 for b in a.buys if b.status == 200 and b.pass_kind == PASS_OWN),
        "purchases": dict(tries),
        "admissions_per_s_mean": mean, "admissions_per_s_peak_seen": peak,
        "gateway": gateway,
        "first_410": None if gone is None else {
            "code": gone.code, "after_start_s": gone.ts - a.starts_at_s if a.starts_at_s is not None else None,
            "told": sum(1 for j in a.journeys.values() if j.admission is None and any(x.gone for x in j.answers))},
        "wait_s": {"n": len(wait), "p50": percentile(wait, 50), "p90": percentile(wait, 90),
                   "p99": percentile(wait, 99), "max": max(wait) if wait else None},
        "rho_before_start": rho(a.pre), "rho_after_start": rho(a.post),
        "overtaken_max": max(sizes) if sizes else None, "order_slack": tol.slack(a.admit_rate),
        "polls": sum(1 for j in a.journeys.values() for x in j.answers if x.step == "poll"),
    }


def _s(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _gone_lines(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return []
    return [f"  {'first 410':<22}{_s(g['after_start_s'], '.2f'):>10}   s after the start ({g['code']}); "
            f"{g['told']} waiting tickets were told so"]


def _gateway_lines(g: dict[str, Any]) -> list[str]:
    if not g.get("samples"):
        return []
    by = g["by"]
    return [f"  {'admitted (gateway)':<22}{g['final']:>10}   by its own count ({g['samples']} reads): half by "
            f"{_s(by.get('50%'), '.1f')} s, 90 % by {_s(by.get('90%'), '.1f')} s, all by {_s(by.get('100%'), '.1f')} s"
            f" after the start; most {_s(g['peak_per_s'], '.0f')}/s over 1 s or more"]


def report_lines(r: dict[str, Any]) -> list[str]:
    """The waiting room's rows of the verifier's table."""
    w = r["wait_s"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
    tries = ", ".join(f"{k}: {v}" for k, v in sorted(r["purchases"].items()))
    return [
        f"  {'waiting room':<22}{r['admit_rate']:>10g}   admissions/s allowed (R)",
        f"  {'joined':<22}{r['joined']:>10}   ({r['joined_before_start']} before the start, "
        f"{r['joined_after_start']} after; {r['polls']} polls)",
        f"  {'admitted':<22}{r['admitted']:>10}   ({outcomes or 'no outcomes'})",
        *_gone_lines(r.get("first_410")),
        f"  {'bought with a pass':<22}{r['bought']:>10}   purchases: {tries or 'none'}",
        f"  {'admissions/s':<22}{_s(r['admissions_per_s_mean'], '.1f'):>10}   mean from first to last; "
        f"peak seen in one second {r['admissions_per_s_peak_seen']}",
        *_gateway_lines(r.get("gateway") or {}),
        f"  {'wait to admission':<22}{_s(w['p50']):>10}   s p50; p90 {_s(w['p90'])} s, p99 {_s(w['p99'])} s, "
        f"max {_s(w['max'])} s (n {w['n']}; from joining, or from the start)",
        f"  {'order':<22}{_s(r['rho_before_start'], '+.3f'):>10}   Spearman rho, joined before the start "
        f"(shuffled: near 0); after: {_s(r['rho_after_start'], '+.3f')}; most overtaken by one "
        f"{_s(r['overtaken_max'], 'd') if r['overtaken_max'] is not None else '-'} (bound {r['order_slack']})",
    ]
