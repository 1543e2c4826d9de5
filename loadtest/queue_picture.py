"""The waiting room of a load run, as a PNG: admissions per second, and positions over time.

    python -m loadtest.queue_picture [RECORD] [--sku SKU] [--out PNG]

Drawn from the run's own record file only (``queue`` lines: every answer the clients got
to their joins and polls; ``queue_buy`` lines: their purchases). Two panels per
waiting-room sale, against seconds since its ``starts_at``:

* **admissions per second**: ``ADMITTED`` answers the clients got in each second (bars),
  purchases answered 200 (line), the admit rate R (dashed), and when the first ticket
  learnt the sale was sold out or over;
* **positions over time**: the ``position`` each answer reported, for a few tickets
  sampled along the admission order (thin lines, a dot where each was admitted), and
  the median and the 90th percentile of every waiting ticket's position in each second.

``make loadtest`` draws ``loadtest/reports/waiting-room.png``; ``make loadtest-queue``
(10,000 users) also ``docs/waiting-room.png``, the picture the READMEs show. The series
are built by pure functions (:func:`build`), tested from synthetic records.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loadtest import records, waitingroom
from loadtest.records import PASS_OWN, Record

DEFAULT_REPORTS = Path(__file__).resolve().parent / "reports"
SAMPLED = 12  # tickets drawn one by one
Sampled = tuple[int, list[tuple[float, int]], float | None]  # user, [(t, position)], admitted at (or None)


@dataclass(slots=True)
class RoomSeries:
    """One waiting-room sale's series, times in seconds since its start (or since the
    first answer, when the start is unknown)."""

    sku: str
    admit_rate: float
    origin: float  # unix seconds of t = 0
    has_start: bool
    admitted_per_s: dict[int, int] = field(default_factory=dict)  # second -> ADMITTED answers
    bought_per_s: dict[int, int] = field(default_factory=dict)  # second -> purchases answered 200
    tickets: list[Sampled] = field(default_factory=list)  # a few tickets' positions
    median: list[tuple[float, float]] = field(default_factory=list)  # (second, median position)
    p90: list[tuple[float, float]] = field(default_factory=list)
    sold_out_at: float | None = None  # first 410 on the queue
    gateway: list[tuple[float, int]] = field(default_factory=list)  # (t, the gateway's count): at least n by t
    joined: int = 0
    admitted: int = 0

    @property
    def empty(self) -> bool:
        return not self.admitted_per_s and not self.tickets


def room_skus(record: Record) -> list[tuple[str, float, int | None]]:
    """(sku, admit_rate, starts_at_ms) of each sale the run gave a waiting room."""
    out: dict[str, tuple[str, float, int | None]] = {}
    for note in record.sales:
        if note.admit_rate and note.usable:
            out[note.sku] = (note.sku, note.admit_rate, note.starts_at_ms)
    for q in record.queue:  # a room the record has answers of but no sale line for
        out.setdefault(q.sku, (q.sku, 0.0, None))
    return list(out.values())


def build(record: Record, sku: str, admit_rate: float, starts_at_ms: int | None,
          sampled: int = SAMPLED) -> RoomSeries:
    room = waitingroom.analyse(sku, admit_rate, starts_at_ms, record.queue_for(sku), record.queue_buys_for(sku),
                               record.queue_stats_for(sku))
    answers = [a for j in room.journeys.values() for a in j.answers]
    if starts_at_ms:
        origin, has_start = starts_at_ms / 1000, True
    else:
        origin, has_start = min((a.t0 for a in answers), default=0.0), False
    s = RoomSeries(sku, admit_rate, origin, has_start,
                   joined=sum(1 for j in room.journeys.values() if j.join is not None), admitted=len(room.admitted))
    for j in room.admitted:
        sec = math.floor(j.admission.ts - origin)  # type: ignore[union-attr]
        s.admitted_per_s[sec] = s.admitted_per_s.get(sec, 0) + 1
    for b in room.buys:
        if b.status == 200 and b.pass_kind == PASS_OWN:
            sec = math.floor(b.ts - origin)
            s.bought_per_s[sec] = s.bought_per_s.get(sec, 0) + 1
    gone = [a.ts for a in answers if a.gone]
    s.sold_out_at = min(gone) - origin if gone else None
    by_second: dict[int, list[int]] = defaultdict(list)
    for a in answers:
        if a.queued and a.position is not None:
            by_second[math.floor(a.ts - origin)].append(a.position)
    for sec in sorted(by_second):
        values = by_second[sec]
        s.median.append((sec + 0.5, waitingroom.percentile(values, 50) or 0.0))
        s.p90.append((sec + 0.5, waitingroom.percentile(values, 90) or 0.0))
    s.tickets = _sample(room, origin, sampled)
    s.gateway = [(q.ts - origin, q.admitted or 0) for q in sorted(room.stats, key=lambda q: q.ts)]
    return s


def gateway_per_second(points: Sequence[tuple[float, int]], span: float = 1.0,
                       start: float | None = None) -> list[tuple[float, float, float]]:
    """The gateway's admissions per second from its sampled count, as steps ``(from,
    to, rate)``: the growth between reads at least ``span`` seconds apart, spread over
    the time between them; from ``start`` on when the earlier read was before it with
    nothing admitted yet (the room admits nothing before its start: the verifier checks
    that, the picture need not smear the first second's admissions back over it)."""
    out: list[tuple[float, float, float]] = []
    if not points:
        return out
    t0, n0 = points[0]
    for t, n in points[1:]:
        if t - t0 >= span:
            since = start if start is not None and n0 == 0 and t0 < start < t else t0
            if since > t0:
                out.append((t0, since, 0.0))
            out.append((since, t, (n - n0) / (t - since)))
            t0, n0 = t, n
    return out


def _sample(room: waitingroom.Analysis, origin: float, n: int) -> list[Sampled]:
    """Tickets spread along the admission order (and the last joiner never admitted),
    each with the positions it was told."""
    if n <= 0:
        return []
    admitted = room.admitted
    picks: list[waitingroom.Journey] = []
    if admitted:
        step = max(1, len(admitted) // n)
        picks = [admitted[i] for i in range(0, len(admitted), step)][:n]
        if admitted[-1] not in picks:
            picks[-1] = admitted[-1]
    others = [j for j in room.journeys.values() if j.admission is None and j.join is not None]
    if others:
        picks.append(max(others, key=lambda j: j.join.ts))  # type: ignore[union-attr]
    out = []
    for j in picks:
        pts = [(a.ts - origin, a.position) for a in j.answers if a.queued and a.position is not None]
        adm = j.admission
        out.append((j.user_id, pts, adm.ts - origin if adm is not None else None))
    return out


# -- drawing ---------------------------------------------------------------------------------

def render(rooms: Sequence[RoomSeries], path: Path) -> Path:
    """Two panels per room into ``path`` (PNG; matplotlib's object API, Agg backend)."""
    if not rooms:
        raise ValueError("nothing to draw: no waiting-room answers in the record")
    fig = Figure(figsize=(10, 6.4 * len(rooms)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * len(rooms), 1, squeeze=False)[:, 0]
    for i, room in enumerate(rooms):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        bottom.sharex(top)
        _rates(top, room)
        _positions(bottom, room)
        if room.has_start:  # nothing to see long before the start
            left, right = top.get_xlim()
            top.set_xlim(max(left, -3.0), right)
    fig.suptitle("The waiting room, from the run's own record")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _since(room: RoomSeries) -> str:
    return "seconds since starts_at" if room.has_start else "seconds since the first answer"


def _marks(ax: Axes, room: RoomSeries) -> None:
    if room.has_start:
        ax.axvline(0, color="black", linewidth=0.8, linestyle=":", label="starts_at")
    if room.sold_out_at is not None:
        ax.axvline(room.sold_out_at, color="#d62728", linewidth=0.8, linestyle=":",
                   label=f"first 410 (t = {room.sold_out_at:.1f} s)")


def _rates(ax: Axes, room: RoomSeries) -> None:
    secs = sorted(room.admitted_per_s)
    ax.bar([s + 0.5 for s in secs], [room.admitted_per_s[s] for s in secs], width=0.9, color="#1f77b4",
           alpha=0.75, label=f"admitted ({room.admitted} of {room.joined} who joined)")
    bought = sorted(room.bought_per_s)
    if bought:
        ax.step([s + 0.5 for s in bought], [room.bought_per_s[s] for s in bought], where="mid", color="#2ca02c",
                linewidth=1.4, label=f"bought ({sum(room.bought_per_s.values())})")
    if room.admit_rate:
        ax.axhline(room.admit_rate, color="grey", linestyle="--", linewidth=1,
                   label=f"admit_rate R = {room.admit_rate:g}/s")
    rates = gateway_per_second(room.gateway, start=0.0 if room.has_start else None)
    if rates:
        xs = [x for a, b, _ in rates for x in (a, b)]
        ys = [r for _, _, r in rates for _ in (0, 1)]
        ax.plot(xs, ys, color="#ff7f0e", linewidth=1.6, label="the gateway's own count, per second")
    _marks(ax, room)
    top = max([*room.admitted_per_s.values(), *room.bought_per_s.values(), *(r for _, _, r in rates),
               room.admit_rate, 1])
    ax.set_ylim(0, top * 1.55)  # room for the legend above the bars
    if secs:
        _cumulative(ax, room, secs)
    ax.set_title(f"{room.sku}: admissions per second (ADMITTED answers, when the clients got them: at their "
                 f"next poll, up to a Retry-After late)", fontsize=9, loc="left")
    ax.set_ylabel("per second")
    ax.set_xlabel(_since(room))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)


def _cumulative(ax: Axes, room: RoomSeries, secs: list[int]) -> None:
    """Admissions seen so far against the contract's bound R·t + R (from the first
    second with one), on a second axis."""
    right = ax.twinx()
    xs, ys, total = [], [], 0
    for sec in range(secs[0], secs[-1] + 1):
        total += room.admitted_per_s.get(sec, 0)
        xs.append(sec + 1)
        ys.append(total)
    right.plot(xs, ys, color="#1f77b4", linewidth=1.6, label="admitted so far, as seen (right)")
    if room.gateway:
        right.step([t for t, _ in room.gateway], [n for _, n in room.gateway], where="post", color="#ff7f0e",
                   linewidth=1.2, linestyle="--", label="admitted so far, the gateway's count when read (right)")
    if room.admit_rate:
        start = 0 if room.has_start else secs[0]
        bound = [room.admit_rate * (x - start) + room.admit_rate for x in xs]
        right.plot(xs, bound, color="grey", linewidth=1.0, linestyle="-.", label="R·t + R: the most allowed (right)")
    right.set_ylim(0, max([*ys, *(n for _, n in room.gateway), 1]) * 1.55)
    right.set_ylabel("admitted so far")
    right.legend(loc="upper left", fontsize=8, framealpha=0.9)


def _positions(ax: Axes, room: RoomSeries) -> None:
    for i, (_user, pts, admitted_at) in enumerate(room.tickets):
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = "sampled tickets" if i == 0 else None
        ax.step(xs, ys, where="post", color="#7f7f7f", linewidth=0.8, alpha=0.8, label=label)
        if admitted_at is not None:  # not seen between the last QUEUED answer and the ADMITTED one
            ax.plot([xs[-1], admitted_at], [ys[-1], 0], color="#7f7f7f", linewidth=0.8, alpha=0.6, linestyle=":")
            ax.plot([admitted_at], [0], marker="o", markersize=3, color="#1f77b4")
        else:
            ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=5, color="#d62728")
    if room.median:
        ax.plot([p[0] for p in room.median], [p[1] for p in room.median], color="#ff7f0e", linewidth=1.8,
                label="median position of the waiting")
        ax.plot([p[0] for p in room.p90], [p[1] for p in room.p90], color="#9467bd", linewidth=1.4,
                linestyle="-.", label="90th percentile")
    _marks(ax, room)
    ax.set_title(f"{room.sku}: position over time (dot: admitted; x: never admitted)", fontsize=10, loc="left")
    ax.set_ylabel("position")
    ax.set_xlabel(_since(room))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)


def draw_run(record_path: Path, out: Path, skus: Sequence[str] = ()) -> Path | None:
    """The picture of a run's waiting rooms, or None when the record has no queue answers."""
    record = records.read_record(record_path)
    rooms = [build(record, sku, rate, starts) for sku, rate, starts in room_skus(record)
             if not skus or sku in skus]
    rooms = [r for r in rooms if not r.empty]
    return render(rooms, out) if rooms else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.queue_picture", description=__doc__.splitlines()[0])
    p.add_argument("record", nargs="?", type=Path, default=DEFAULT_REPORTS / "admitted.jsonl",
                   help="the run's record file [loadtest/reports/admitted.jsonl]")
    p.add_argument("--sku", action="append", default=[], help="only this sale (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_REPORTS / "waiting-room.png")
    args = p.parse_args(argv)
    path = draw_run(args.record, args.out, args.sku)
    if path is None:
        print(f"nothing to draw: {args.record} holds no waiting-room answers", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
