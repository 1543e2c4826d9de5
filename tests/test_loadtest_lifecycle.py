"""What the lifecycle scenarios decide (loadtest.lifecycle), and how run.py picks the
sales to verify from a run's record. Pure functions: no Locust, no Redis."""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
import pytest

from gateway.orders import signing
from loadtest import lifecycle, records, run
from loadtest.lifecycle import Mix


def test_the_mix_of_fates_parses_and_draws_by_weight():
    assert Mix.parse("pay=5,abandon=3,late=1,cancel=1") == Mix()
    assert Mix.parse(" abandon=2 ,") == Mix(pay=0, abandon=2, late=0, cancel=0)
    rng = random.Random(7)
    drawn = {Mix.parse("late=1").choose(rng) for _ in range(20)}
    assert drawn == {lifecycle.LATE}
    counts = {fate: 0 for fate in lifecycle.FATES}
    for _ in range(2000):
        counts[Mix(pay=1, abandon=1, late=0, cancel=0).choose(rng)] += 1
    assert counts["late"] == counts["cancel"] == 0 and counts["pay"] > 800 and counts["abandon"] > 800


@pytest.mark.parametrize("text", ["pay", "refund=1", "pay=-1", "pay=0,abandon=0", "", "pay=x"])
def test_a_bad_mix_is_refused(text: str):
    with pytest.raises(ValueError):
        Mix.parse(text)


def test_the_start_is_on_a_whole_second_after_the_lead():
    assert lifecycle.starts_at_ms(1000.2, 8) == 1009_000
    assert lifecycle.starts_at_ms(1000.0, 8) == 1008_000
    assert records.rfc3339(lifecycle.starts_at_ms(1_796_126_392.5, 7)) == "2026-12-01T12:00:00Z"


def test_retry_after_is_honoured_but_never_a_hot_loop():
    assert lifecycle.retry_after("3") == 3.0 and lifecycle.retry_after(" 0.5 ") == 0.5
    assert lifecycle.retry_after(None) is None and lifecycle.retry_after("Wed, 21 Oct 2015") is None
    assert lifecycle.retry_after("-1") is None and lifecycle.retry_after("nan") is None
    assert lifecycle.poll_delay(3.0) == 3.0
    assert lifecycle.poll_delay(0.0) == 0.05  # "now": ask again soon, not at once
    assert lifecycle.poll_delay(None) == 1.0


def test_a_notice_is_signed_as_the_orders_service_checks_it():
    body, headers = lifecycle.notice("s3cret", "n-1", "3-abc", 4990, now_s=1_700_000_000.4)
    assert orjson.loads(body) == {"notify_id": "n-1", "order_no": "3-abc", "amount": 4990, "status": "SUCCESS"}
    assert headers[signing.HEADER].startswith("t=1700000000,v1=")
    assert signing.verify("s3cret", headers[signing.HEADER], body, now=1_700_000_010)
    assert not signing.verify("other", headers[signing.HEADER], body, now=1_700_000_010)


def test_json_or_empty():
    assert lifecycle.json_or_empty('{"code": "OK"}') == {"code": "OK"}
    assert lifecycle.json_or_empty("[1]") == {} and lifecycle.json_or_empty("<html>") == {}
    assert lifecycle.json_or_empty(None) == {}


# -- run.py: which sales are verified, and how --------------------------------------------------

def _outcomes(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "outcomes.json"
    path.write_text(json.dumps(rows))
    return path


def test_every_sale_the_run_set_up_is_verified(tmp_path: Path):
    record = records.parse_lines(records.line(e) for e in [
        records.sale_entry(sku="m", scenario="FlashCrowd", outcome="created", ts=0),
        records.sale_entry(sku="m-early", scenario="EarlyCrowd", outcome="created", ts=0, starts_at_ms=5),
        records.sale_entry(sku="m-abandon", scenario="Abandoners", outcome="created", ts=0, payment_ttl=5),
    ])
    outcomes = _outcomes(tmp_path, [
        {"scenario": "FlashCrowd", "sku": "m", "status": 410, "code": "SOLD_OUT", "count": 3},
        {"scenario": "EarlyCrowd", "sku": "m-early", "status": 410, "code": "SOLD_OUT", "count": 9},
        {"scenario": "Abandoners", "sku": "m-abandon", "status": 410, "code": "SOLD_OUT", "count": 9},
    ])
    checks = run.plan_checks(record, "m", outcomes, "auto")
    assert checks == [run.SaleCheck("m", "main", True), run.SaleCheck("m-early", "EarlyCrowd", True),
                      run.SaleCheck("m-abandon", "Abandoners", False)]
    assert run.plan_checks(record, "m", outcomes, "no")[0].expect_sold_out is False


def test_skipped_sales_are_not_verified_but_said(tmp_path: Path):
    record = records.parse_lines(records.line(e) for e in [
        records.sale_entry(sku="m-early", scenario="EarlyCrowd", outcome="unsupported", ts=0,
                           message="the gateway answered 400 to starts_at"),
    ])
    outcomes = _outcomes(tmp_path, [{"scenario": "EarlyCrowd", "sku": "m", "status": 410, "code": "SOLD_OUT",
                                     "count": 1}])
    assert run.plan_checks(record, "m", outcomes, "auto") == [run.SaleCheck("m", "main", True)]
    assert [n.sku for n in run.skipped(record)] == ["m-early"]


def test_old_outcome_tables_without_a_sku_count_for_the_main_sale(tmp_path: Path):
    outcomes = _outcomes(tmp_path, [{"scenario": "FlashCrowd", "status": 410, "code": "SOLD_OUT", "count": 1}])
    assert run.sold_out_seen(outcomes, "m", main=True)
    assert not run.sold_out_seen(outcomes, "m-early", main=False)
    assert not run.sold_out_seen(tmp_path / "none.json", "m", main=True)


def test_the_verdict_puts_violations_first():
    assert run.verdict({"a": 0, "b": 2, "c": 1}, 0) == 1
    assert run.verdict({"a": 0, "b": 2}, 1) == 2
    assert run.verdict({"a": 0}, 1) == 1
    assert run.verdict({}, 0) == 0
