"""The run's picture (loadtest.timeline): series built from a tiny synthetic record, and
the PNG it draws. No Locust, no Redis."""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from pathlib import Path

import pytest

from gateway.orders.sqlite import SCHEMA
from loadtest import records, timeline
from loadtest.timeline import RELEASED, RESOLD, SOLD, ReleasePoint

T0 = 1_700_000_000.0


def _record() -> records.Record:
    """Sale ``a`` (stock 4): units 1-4 sold at t+1..t+4 (order 3 also recorded again
    through a 409, later); units 2 and 3 released at t+6; sold again at t+7 and t+8.
    Sale ``b`` sells one unit; sale ``c`` could not be created."""

    def sold(sku: str, no: str, units: list[int], t: float, status: int = 200) -> dict:
        return records.admitted_entry(sku=sku, order_no=no, units=units, user_id=int(t), key=f"k{no}",
                                      status=status, replayed=status != 200, scenario="Abandoners", ts=T0 + t)

    return records.parse_lines(records.line(e) for e in [
        records.sale_entry(sku="a", scenario="Abandoners", outcome="created", ts=T0, stock=4, payment_ttl=5),
        records.sale_entry(sku="c", scenario="EarlyCrowd", outcome="unsupported", ts=T0),
        sold("a", "1-a", [1], 1), sold("a", "1-b", [2], 2), sold("a", "1-c", [3], 3), sold("a", "1-d", [4], 4),
        sold("a", "1-c", [3], 5, status=409),
        sold("a", "1-e", [2], 7), sold("a", "1-f", [3], 8),
        sold("b", "2-a", [1], 2.5),
    ])


def test_series_count_first_sales_releases_and_resales():
    lines = timeline.build_timelines(_record(), {"a": [ReleasePoint(T0 + 6, 1), ReleasePoint(T0 + 6, 1)]})
    assert [line.sku for line in lines] == ["a", "b"]  # c sold nothing
    a = lines[0]
    assert (a.scenario, a.stock) == ("Abandoners", 4)
    assert a.points[SOLD] == [(T0 + 1, 1), (T0 + 2, 2), (T0 + 3, 3), (T0 + 4, 4)]
    assert a.points[RELEASED] == [(T0 + 6, 1), (T0 + 6, 2)]
    assert a.points[RESOLD] == [(T0 + 7, 1), (T0 + 8, 2)]
    assert a.start == T0 + 1
    assert lines[1].total(SOLD) == 1 and lines[1].total(RELEASED) == 0


def test_renders_a_png(tmp_path: Path):
    lines = timeline.build_timelines(_record(), {"a": [ReleasePoint(T0 + 6, 2)]})
    path = timeline.render(lines, tmp_path / "out" / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1000, int((2.8 * 2 + 0.8) * 100))
    assert len(data) > 20_000  # axes, three series, legends and titles: not a blank image


def test_nothing_to_draw_is_said_plainly(tmp_path: Path):
    with pytest.raises(ValueError, match="nothing to draw"):
        timeline.render([], tmp_path / "x.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert timeline.draw_run(empty, None, tmp_path / "x.png") is None


def test_release_times_come_from_the_orders_store(tmp_path: Path):
    """The acknowledged releases of the store (done, outcome released), per sale."""
    db = tmp_path / "orders.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    for no, units, done, outcome in (("1-a", "1,2", 1_700_000_006_000, "released"), ("1-b", "3", None, None),
                                     ("1-c", "4", 1_700_000_007_000, "unknown_order")):
        conn.execute("INSERT INTO orders (order_no, sku, user_id, quantity, amount, units, state) "
                     "VALUES (?, 'a', 1, ?, 0, ?, 'expired')", (no, len(units.split(",")), units))
        conn.execute("INSERT INTO releases (order_no, reason, next_attempt_at, done_at, outcome) "
                     "VALUES (?, 'expired', 0, ?, ?)", (no, done, outcome))
    conn.commit()
    conn.close()
    record = tmp_path / "record.jsonl"
    record.write_bytes(b"".join(records.line(e) for e in [
        records.admitted_entry(sku="a", order_no="1-a", units=[1, 2], user_id=1, key="k", status=200,
                               replayed=False, scenario="t", ts=T0)]))
    releases = asyncio.run(timeline.read_releases(f"sqlite:///{db}", ["a", "gone"]))
    assert releases == {"a": [ReleasePoint(1_700_000_006.0, 2)], "gone": []}
    path = timeline.draw_run(record, f"sqlite:///{db}", tmp_path / "t.png")
    assert path is not None and path.stat().st_size > 10_000
