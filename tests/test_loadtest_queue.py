"""QueueCrowd's decisions (loadtest.queueclient: is a waiting-room answer the contract's?)
and how loadtest.run drives it. Pure functions, no Locust, no gateway."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import queueclient, records, run
from loadtest.queueclient import QueueReply, queue_problem

QUEUED_BODY = {"code": "QUEUED", "ticket": "3.17.mac", "position": 40, "eta_s": 1, "units_left": 9}


def _queued(**changes) -> QueueReply:
    return QueueReply(202, "QUEUED", {**QUEUED_BODY, **changes}, 1.0)


def test_answers_that_keep_the_contract():
    assert queue_problem(_queued(), {"Retry-After": "1"}, None, None) is None
    assert queue_problem(_queued(position=None), {"Retry-After": "1"}, "3.17.mac", 50) is None  # before the start
    assert queue_problem(_queued(position=39), {"Retry-After": "1"}, "3.17.mac", 40) is None
    admitted = QueueReply(200, "ADMITTED", {"code": "ADMITTED", "pass": "5f.mac", "expires_in": 60}, None)
    assert queue_problem(admitted, {}, "3.17.mac", 2) is None
    for code in ("SOLD_OUT", "SALE_ENDED"):
        assert queue_problem(QueueReply(410, code, {"code": code}, None), {}, "t", 3) is None
    assert queue_problem(QueueReply(503, "UNAVAILABLE", {"code": "UNAVAILABLE"}, 1.0), {"Retry-After": "1"},
                         None, None) is None


def test_answers_that_break_it():
    headers = {"Retry-After": "1"}
    assert "position grew from 40 to 41" in queue_problem(_queued(position=41), headers, "3.17.mac", 40)
    assert "ticket changed" in queue_problem(_queued(ticket="3.18.mac"), headers, "3.17.mac", None)
    body = dict(QUEUED_BODY)
    del body["units_left"]
    assert "without units_left" in queue_problem(QueueReply(202, "QUEUED", body, 1.0), headers, None, None)
    assert "without Retry-After" in queue_problem(QueueReply(202, "QUEUED", QUEUED_BODY, None), {}, None, None)
    assert "not a number of places" in queue_problem(_queued(position="40"), headers, None, None)
    assert "without a pass" in queue_problem(QueueReply(200, "ADMITTED", {"code": "ADMITTED"}, None), {}, None, None)
    assert "without Retry-After" in queue_problem(QueueReply(503, "UNAVAILABLE", {}, None), {}, None, None)
    assert "from the waiting room" in queue_problem(QueueReply(404, "TICKET_NOT_FOUND", {}, None), {}, "t", None)
    # after a purchase, a poll may say ADMITTED again or 410, never QUEUED
    again = {queueclient.ADMITTED, queueclient.SOLD_OUT, queueclient.SALE_ENDED}
    assert "not an allowed answer" in queue_problem(_queued(), headers, "3.17.mac", None, again)


def test_the_crowd_is_shared_among_locust_users():
    assert queueclient.share(1800, 10) == 180
    assert queueclient.share(401, 10) == 41
    assert queueclient.share(0, 10) == 0


def test_the_run_verifies_the_queue_sale_and_expects_it_sold_out_after_a_410(tmp_path: Path):
    record = records.parse_lines(records.line(e) for e in [
        records.sale_entry(sku="m", scenario="main", outcome="created", ts=0),
        records.sale_entry(sku="m-queue", scenario="QueueCrowd", outcome="created", ts=0, starts_at_ms=5,
                           admit_rate=200),
    ])
    outcomes = tmp_path / "outcomes.json"
    outcomes.write_text(json.dumps([{"scenario": "QueueCrowd poll", "sku": "m-queue", "status": 410,
                                     "code": "SOLD_OUT", "count": 4}]))
    assert run.plan_checks(record, "m", outcomes, "auto") == [run.SaleCheck("m", "main", False),
                                                               run.SaleCheck("m-queue", "QueueCrowd", True)]
    assert record.sale("m-queue").admit_rate == 200


def test_the_run_passes_the_crowd_options_to_locust(tmp_path: Path):
    args = run.parse(["QueueCrowd", "--queue-crowd", "10000", "--queue-stock", "10500", "--queue-lead", "25"])
    assert args is not None and args.classes == ["QueueCrowd"]
    argv = run.locust_argv(args, "http://gw", "s", tmp_path / "r.jsonl", tmp_path)
    assert argv[-1] == "QueueCrowd"
    text = " ".join(argv)
    assert "--lt-queue-crowd 10000" in text and "--lt-queue-stock 10500" in text and "--lt-queue-lead 25.0" in text
    assert "--lt-queue-late" not in text  # unset: the locustfile's default
