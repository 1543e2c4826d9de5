"""Property-based tests of the contract's invariants: random crowds of buyers, with
repeated keys, quantities and skewed shards, run concurrently against real Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.http.errors import ApiError
from gateway.models import Sale

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

attempt = st.tuples(
    st.integers(0, 40),      # user id
    st.integers(0, 3),       # which of the user's keys
    st.integers(1, 3),       # quantity
)


@pytest.fixture
async def gateway(backend):
    gw = Gateway.build(backend.settings(key_mode="client"))
    yield gw
    await gw.close()


@hsettings(max_examples=int(os.environ.get("INVARIANT_EXAMPLES", "25")), deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stock=st.integers(1, 30), shards=st.sampled_from([1, 2, 4, 16]), limit=st.integers(1, 3),
       attempts=st.lists(attempt, min_size=1, max_size=80))
async def test_invariants_hold_for_any_crowd(gateway: Gateway, stock, shards, limit, attempts):
    sale = Sale(f"inv-{uuid.uuid4().hex[:8]}", stock, price=3, per_user_limit=limit, shards=shards)
    sale = await gateway.store.create_sale(sale)  # type: ignore[assignment]
    assert sale is not None

    async def one(user: int, key_no: int, quantity: int):
        key = f"{sale.sku}-{user}-{key_no}"  # keys are not per sale: keep examples apart
        try:
            outcome = await gateway.purchases.buy(user, sale.sku, key, quantity)
            return user, key, quantity, outcome.status, outcome.body
        except ApiError as exc:
            return user, key, quantity, exc.status, {"code": exc.code, "message": exc.message}

    results = await asyncio.gather(*(one(*a) for a in attempts))

    admitted = [r for r in results if r[3] == 200]
    units = [u for r in admitted for u in r[4]["units"]]
    # 1. Never more than the stock, never a unit twice.
    assert len(units) == len(set(units)) <= stock
    assert all(1 <= u <= stock for u in units)
    # 2. Per user, never over the limit.
    per_user = Counter()
    for user, _, _, _, body in admitted:
        per_user[user] += len(body["units"])
    assert all(n <= limit for n in per_user.values())
    # 3. One key, one outcome: exactly one answer per key carries a recorded outcome;
    #    every other answer to that key is a conflict carrying that same outcome, or a
    #    refusal (another quantity: 422; over the limit: 400) that changes nothing.
    by_key = defaultdict(list)
    for user, key, quantity, status, body in results:
        by_key[(user, key)].append((quantity, status, body))
    for answers in by_key.values():
        recorded = [(s, b) for _, s, b in answers
                    if b["code"] in ("OK", "ALREADY_PURCHASED", "SOLD_OUT", "INSUFFICIENT_STOCK")]
        assert len(recorded) <= 1, answers
        for _, status, body in answers:
            assert status in (200, 400, 409, 410, 422), body
            if body["code"] == "IDEMPOTENT_CONFLICT":
                assert recorded and body["original"] == {"status": recorded[0][0], "body": recorded[0][1]}
            if body["code"] == "IDEMPOTENCY_KEY_REUSED":
                assert recorded, answers
    # 4. No false sold-out: units are only ever taken here, so a buyer who heard
    #    SOLD_OUT must find the sale empty at the end, and one who heard
    #    INSUFFICIENT_STOCK must find fewer units left than they asked for.
    status = await gateway.sale_status(sale.sku)
    assert status["sold"] == len(units) and status["remaining"] + status["sold"] == stock
    for user, key, quantity, code_status, body in results:
        if body.get("code") == "SOLD_OUT":
            assert status["remaining"] == 0
        if body.get("code") == "INSUFFICIENT_STOCK":
            assert status["remaining"] < quantity
    await gateway.store.delete_sale(sale)
