"""The waiting room's picture (loadtest.queue_picture): series built from a simulated
room's record, and the PNG it draws. No Locust, no Redis."""

from __future__ import annotations

import struct
from pathlib import Path

from loadtest import queue_picture, records
from tests.test_verify_queue import SKU, Sim


def _write(sim: Sim, path: Path) -> Path:
    path.write_bytes(b"".join(records.line(e) for e in sim.entries))
    return path


def test_series_from_the_record():
    sim = Sim(stock=250).run()
    rec = sim.record()
    assert queue_picture.room_skus(rec) == [(SKU, sim.rate, int(sim.starts * 1000))]
    room = queue_picture.build(rec, SKU, sim.rate, int(sim.starts * 1000))
    assert room.has_start and room.origin == sim.starts
    assert sum(room.admitted_per_s.values()) == room.admitted == 250 and room.joined == 400
    assert sum(room.bought_per_s.values()) == 250
    assert min(room.admitted_per_s) >= 0  # nobody before the start
    assert max(room.admitted_per_s.values()) <= sim.rate * 2  # one second's burst at most
    assert room.sold_out_at is not None and room.sold_out_at > 0
    assert 1 < len(room.tickets) <= queue_picture.SAMPLED + 1
    assert room.tickets[-1][2] is None  # the last joiner, never admitted
    for _user, points, _admitted in room.tickets:
        positions = [p for _, p in points]
        assert positions == sorted(positions, reverse=True)  # never grows
    assert room.median and all(m <= p for (_, m), (_, p) in zip(room.median, room.p90))


def test_draws_a_png(tmp_path: Path):
    record = _write(Sim().run(), tmp_path / "record.jsonl")
    out = queue_picture.draw_run(record, tmp_path / "pics" / "waiting-room.png")
    assert out is not None
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 640)


def test_command_line(tmp_path: Path, capsys):
    record = _write(Sim(pre=50, post=10).run(), tmp_path / "record.jsonl")
    out = tmp_path / "wr.png"
    assert queue_picture.main([str(record), "--out", str(out)]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    assert queue_picture.main([str(record), "--sku", "other", "--out", str(tmp_path / "x.png")]) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert queue_picture.main([str(empty), "--out", str(tmp_path / "y.png")]) == 1
    assert not (tmp_path / "y.png").exists()


def test_the_gateway_count_as_steps_per_second():
    points = [(-0.7, 0), (-0.2, 0), (2.0, 400), (2.5, 450), (3.1, 600), (9.0, 600)]
    steps = queue_picture.gateway_per_second(points, start=0.0)
    assert steps[:2] == [(-0.7, 0.0, 0.0), (0.0, 2.0, 200.0)]  # nothing before the start: the growth is after it
    assert steps[2][0] == 2.0 and steps[2][1] == 3.1 and abs(steps[2][2] - 200 / 1.1) < 1e-9
    assert steps[3] == (3.1, 9.0, 0.0)
    assert all(a[1] == b[0] for a, b in zip(steps, steps[1:]))  # contiguous
    assert queue_picture.gateway_per_second(points)[0] == (-0.7, 2.0, 400 / 2.7)
    assert queue_picture.gateway_per_second([]) == []


def test_the_gateway_count_is_drawn_when_read(tmp_path: Path):
    sim = Sim(pre=100, post=20, stats_every=0.5).run()
    room = queue_picture.build(sim.record(), SKU, sim.rate, int(sim.starts * 1000))
    assert room.gateway and room.gateway[-1][1] == 120
    assert [n for _, n in room.gateway] == sorted(n for _, n in room.gateway)
    assert queue_picture.render([room], tmp_path / "wr.png").exists()
