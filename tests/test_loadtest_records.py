"""The load run's record file (loadtest.records): what the scenarios write is what the
verifier and the timeline read, old files included. Pure functions, no Redis."""

from __future__ import annotations

from pathlib import Path

import orjson

from loadtest import records


def _lines(*entries: dict) -> list[bytes]:
    return [records.line(e) for e in entries]


def test_every_event_reads_back_as_written():
    rec = records.parse_lines(_lines(
        records.sale_entry(sku="s", scenario="EarlyCrowd", outcome="created", ts=1.0, stock=5,
                           per_user_limit=1, shards=4, starts_at_ms=2000, payment_ttl=None),
        records.admitted_entry(sku="s", order_no="1-ab", units=[3], user_id=9, key="k1", status=200,
                               replayed=False, scenario="EarlyCrowd", ts=2.5),
        records.payment_entry(sku="s", order_no="1-ab", notify_id="n1", amount=100, late=True, status=409,
                              code="ORDER_CLOSED", state="expired", scenario="Abandoners", ts=9.0),
        records.cancel_entry(sku="s", order_no="1-ab", status=200, code="OK", scenario="Abandoners", ts=3.0),
    ))
    assert rec.errors == []
    assert rec.sale("s") == records.SaleNote(line=1, sku="s", scenario="EarlyCrowd", outcome="created",
                                             stock=5, per_user_limit=1, shards=4, starts_at_ms=2000,
                                             ts=1.0)
    assert rec.sale("s").usable
    (admission,) = rec.admissions
    assert (admission.order_no, admission.units, admission.user_id, admission.key, admission.ts) == \
        ("1-ab", (3,), 9, "k1", 2.5)
    (payment,) = rec.payments
    assert payment.late and payment.code == "ORDER_CLOSED" and payment.notify_id == "n1"
    assert rec.cancels[0].status == 200


def test_old_lines_without_event_or_sku_are_admissions_of_any_sale():
    rec = records.parse_lines([b'{"order_no": "0-a", "units": [1, 2], "user_id": 5, "key": "k"}'])
    (admission,) = rec.admissions
    assert admission.sku is None and admission.status == 200
    assert rec.admissions_for("whatever") == [admission]


def test_lines_are_filtered_by_sale():
    rec = records.parse_lines(_lines(
        records.admitted_entry(sku="a", order_no="1-x", units=[1], user_id=1, key="k", status=200,
                               replayed=False, scenario="t", ts=0),
        records.admitted_entry(sku="b", order_no="1-y", units=[1], user_id=1, key="k", status=200,
                               replayed=False, scenario="t", ts=0),
    ))
    assert [a.order_no for a in rec.admissions_for("a")] == ["1-x"]
    assert rec.payments_for("a") == [] and rec.sale("a") is None


def test_malformed_lines_are_errors_not_crashes():
    rec = records.parse_lines([b'{"order_no": "0-a", "uni', b"[1, 2]", b'{"event": "mystery"}',
                               b'{"event": "payment", "order_no": "x"}', b"", b"   "])
    assert len(rec.errors) == 4
    assert rec.errors[0].startswith("line 1:")


def test_a_missing_file_is_an_empty_record(tmp_path: Path):
    assert records.read_record(tmp_path / "none.jsonl") == records.Record()
    assert records.read_record(None) == records.Record()


def test_lines_are_single_writes_of_compact_json():
    raw = records.line({"a": 1, "b": [1, 2]})
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and orjson.loads(raw) == {"a": 1, "b": [1, 2]}


def test_moments_in_every_form_a_gateway_may_use():
    ms = 1796126400000  # 2026-12-01T12:00:00Z
    assert records.epoch_ms("2026-12-01T12:00:00Z") == ms
    assert records.epoch_ms("2026-12-01T13:00:00+01:00") == ms
    assert records.epoch_ms("2026-12-01T12:00:00") == ms  # no offset: UTC
    assert records.epoch_ms(ms) == ms and records.epoch_ms(ms // 1000) == ms
    assert records.epoch_ms(str(ms // 1000)) == ms
    assert records.epoch_ms(None) is None and records.epoch_ms("") is None
    assert records.epoch_ms("soon") is None and records.epoch_ms(True) is None
    assert records.rfc3339(ms) == "2026-12-01T12:00:00Z"
