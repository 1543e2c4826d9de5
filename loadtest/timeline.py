"""Units sold, released and sold again over a load run, as a PNG.

    python -m loadtest.timeline [--record FILE] [--database-url URL] [--out PNG]

Drawn from the run's own data only: the record file (when each ``200 OK`` arrived and
which units it carried) and the orders store (when the gateway acknowledged each
release: ``releases.done_at``). A unit's first sale counts as *sold*; a later sale of
the same unit of the same SKU as *sold again*; *released* counts the units of expired
and cancelled orders once their release landed. One panel per sale, cumulative units
against seconds since the run's first event, the sale's stock as a dashed line.

The series are built by pure functions (:func:`build_timelines`), so the picture can be
tested from a synthetic record without Locust or a database.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loadtest import records
from loadtest.ordersdb import DbMissing, read_db, release_times
from loadtest.records import Record

DEFAULT_REPORTS = Path(__file__).resolve().parent / "reports"
SOLD, RESOLD, RELEASED = "sold", "sold again", "released"
KINDS = (SOLD, RELEASED, RESOLD)
COLOURS = {SOLD: "#1f77b4", RELEASED: "#d62728", RESOLD: "#2ca02c"}


@dataclass(frozen=True, slots=True)
class ReleasePoint:
    """Units an order gave back, and when the gateway acknowledged it (unix seconds)."""

    t: float
    units: int


@dataclass(slots=True)
class Timeline:
    """One sale's cumulative units over time: ``points[kind]`` is a list of
    (unix seconds, cumulative units), one point per change."""

    sku: str
    scenario: str = ""
    stock: int | None = None
    points: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def total(self, kind: str) -> int:
        series = self.points[kind]
        return series[-1][1] if series else 0

    def add(self, kind: str, t: float, units: int) -> None:
        self.points[kind].append((t, self.total(kind) + units))

    @property
    def start(self) -> float | None:
        times = [t for series in self.points.values() for t, _ in series]
        return min(times) if times else None

    @property
    def end(self) -> float | None:
        times = [t for series in self.points.values() for t, _ in series]
        return max(times) if times else None


def _first_answers(record: Record, sku: str) -> list[records.Admission]:
    """Each order once, at the first time a client learnt of it."""
    first: dict[str, records.Admission] = {}
    for a in record.admissions_for(sku):
        if a.ts is None:
            continue
        if a.order_no not in first or a.ts < (first[a.order_no].ts or 0):
            first[a.order_no] = a
    return sorted(first.values(), key=lambda a: (a.ts or 0, a.order_no))


def _sale_skus(record: Record) -> list[str]:
    skus = [s.sku for s in record.sales if s.usable]
    skus += [a.sku for a in record.admissions if a.sku is not None]
    return list(dict.fromkeys(skus))


def build_timeline(record: Record, sku: str, releases: Iterable[ReleasePoint] = ()) -> Timeline:
    note = record.sale(sku)
    line = Timeline(sku, note.scenario if note else "", note.stock if note else None)
    events: list[tuple[float, str, int]] = []
    seen: set[int] = set()
    for answer in _first_answers(record, sku):
        fresh = [u for u in answer.units if u not in seen]
        seen.update(answer.units)
        assert answer.ts is not None
        if fresh:
            events.append((answer.ts, SOLD, len(fresh)))
        if len(fresh) < len(answer.units):
            events.append((answer.ts, RESOLD, len(answer.units) - len(fresh)))
    events += [(r.t, RELEASED, r.units) for r in releases]
    for t, kind, units in sorted(events):
        line.add(kind, t, units)
    return line


def build_timelines(record: Record, releases: Mapping[str, Sequence[ReleasePoint]]) -> list[Timeline]:
    """A timeline per sale of the record (sales that sold nothing are left out)."""
    lines = [build_timeline(record, sku, releases.get(sku, ())) for sku in _sale_skus(record)]
    return [line for line in lines if line.start is not None]


# -- the orders store's timestamps -----------------------------------------------------------

async def read_releases(database_url: str, skus: Iterable[str]) -> dict[str, list[ReleasePoint]]:
    """When each sale's released orders were acknowledged by the gateway, from the store."""
    out: dict[str, list[ReleasePoint]] = {}
    for sku in skus:
        try:
            db = await read_db(database_url, sku)
        except DbMissing:
            continue
        quantity = {o.order_no: len(o.units) or o.quantity for o in db.orders}
        out[sku] = [ReleasePoint(ms / 1000, quantity.get(order_no, 0)) for order_no, ms in release_times(db)]
    return out


# -- drawing ---------------------------------------------------------------------------------

def render(lines: Sequence[Timeline], path: Path, *, title: str = "Units sold, released and sold again") -> Path:
    """Draw the timelines (one panel each) into ``path`` as a PNG. Uses matplotlib's
    object API (no pyplot): no global figure state, safe to call from anywhere."""
    if not lines:
        raise ValueError("nothing to draw: no sale sold anything")
    start = min(line.start for line in lines if line.start is not None)
    end = max(line.end for line in lines if line.end is not None) - start
    fig = Figure(figsize=(10, 2.8 * len(lines) + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(lines), 1, sharex=True, squeeze=False)[:, 0]
    for ax, line in zip(axes, lines):
        _panel(ax, line, start, end)
    axes[-1].set_xlabel("seconds since the run's first answer")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _panel(ax: Axes, line: Timeline, start: float, end: float) -> None:
    """One sale: each series as steps from 0 at the run's start to its total at the
    run's end (every panel spans the same seconds, to compare sales)."""
    for kind in KINDS:
        series = line.points[kind]
        if not series:
            continue
        xs = [0.0] + [t - start for t, _ in series] + [end]
        ys = [0] + [n for _, n in series] + [series[-1][1]]
        ax.step(xs, ys, where="post", label=f"{kind} ({series[-1][1]})",
                color=COLOURS[kind], linewidth=1.8)
    if line.stock:
        ax.axhline(line.stock, color="grey", linestyle="--", linewidth=1,
                   label=f"stock ({line.stock})")
    ax.set_title(f"{line.sku}" + (f" ({line.scenario})" if line.scenario else ""),
                 fontsize=10, loc="left")
    ax.set_ylabel("units")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)


def draw_run(record_path: Path, database_url: str | None, out: Path) -> Path | None:
    """The picture of a run, or None when the record holds no sale that sold anything."""
    record = records.read_record(record_path)
    skus = _sale_skus(record)
    releases = asyncio.run(read_releases(database_url, skus)) if database_url else {}
    lines = build_timelines(record, releases)
    return render(lines, out) if lines else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.timeline", description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, default=DEFAULT_REPORTS / "admitted.jsonl")
    p.add_argument("--database-url", help="the run's orders store (release times); none: no releases drawn")
    p.add_argument("--out", type=Path, default=DEFAULT_REPORTS / "timeline.png")
    args = p.parse_args(argv)
    path = draw_run(args.record, args.database_url, args.out)
    if path is None:
        print(f"nothing to draw: {args.record} holds no 200s", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
