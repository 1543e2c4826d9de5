"""The gateway's HTTP API, row by row of the contract's outcome table, on standalone
Redis and on Redis Cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.admission.tokens import TokenIssuer
from tests.support.api import Api, new_sku, serve


async def test_token_is_issued_to_the_caller(api: Api):
    resp = await api.client.get("/api/token", headers={"X-User-Id": "7"})
    data = await resp.json()
    assert resp.status == 200
    assert data["code"] == "OK" and data["expires_in"] == 300
    assert len(data["token"].split(".")[0]) == 32  # a uuid4, hex
    resp = await api.client.post("/api/token", headers={"X-User-Id": "7"})
    other = (await resp.json())["token"]
    assert resp.status == 200 and other != data["token"]


@pytest.mark.parametrize("user", [None, "", "-1", "abc", "1.5", "1 2", "+1", "9223372036854775808", "１２"])
async def test_unauthenticated(api: Api, sku: str, user):
    headers = {} if user is None else {"X-User-Id": user}
    resp = await api.client.get("/api/token", headers=headers)
    assert resp.status == 401 and (await resp.json())["code"] == "UNAUTHENTICATED"
    resp = await api.client.post(f"/api/seckill/{sku}", headers={**headers, "X-Idempotency-Key": "k" * 20})
    assert resp.status == 401 and (await resp.json())["code"] == "UNAUTHENTICATED"


async def test_largest_user_id_is_accepted(api: Api, sku: str):
    await api.create_sale(sku, 5, shards=4)
    user = 2**63 - 1
    status, body, _ = await api.buy_with_token(sku, user)
    assert status == 200 and body["user_id"] == user


async def test_key_required(api: Api, sku: str):
    await api.create_sale(sku, 5)
    status, body, _ = await api.buy(sku, 1, None)
    assert (status, body["code"]) == (400, "IDEMPOTENCY_KEY_REQUIRED")


async def test_both_key_headers_are_accepted(api: Api, sku: str):
    await api.create_sale(sku, 5)
    token = await api.token(3)
    status, body, _ = await api.buy(sku, 3, None, headers={"Idempotency-Key": token})
    assert status == 200, body
    status, body, _ = await api.buy(sku, 3, token)
    assert (status, body["code"]) == (409, "IDEMPOTENT_CONFLICT")


@pytest.mark.parametrize("body", [b"[1]", b"not json", b'{"quantity": "1"}', b'{"quantity": 0}',
                                  b'{"quantity": -1}', b'{"quantity": true}', b'{"quantity": 1.0}',
                                  b'{"quantity": 99999999999999999999999}', b'{"quantity": 2}',
                                  b'{"qty": 1}', b'{"quantity": 1, "extra": 1}', b'"1"'])
async def test_bad_body(api: Api, sku: str, body: bytes):
    await api.create_sale(sku, 5, per_user_limit=1)
    status, data, _ = await api.buy(sku, 1, await api.token(1), body=body)
    assert (status, data["code"]) == (400, "BAD_REQUEST"), data


@pytest.mark.parametrize("bad_sku", ["a{b}", "{x}", "a b", "é", "x" * 65, "-lead", "a%00b", "%7B1%7D"])
async def test_bad_sku(api: Api, bad_sku: str):
    status, data, _ = await api.buy(bad_sku, 1, await api.token(1))
    assert (status, data["code"]) == (400, "BAD_REQUEST"), data
    resp = await api.client.put(f"/admin/sales/{bad_sku}", json={"stock": 1}, headers=api.admin)
    assert resp.status == 400 and (await resp.json())["code"] == "BAD_REQUEST"


@pytest.mark.parametrize("key", ["short", "{tag}" * 3, "a b c d e f g h", "k" * 129, "ключ-ключ-ключ"])
async def test_malformed_client_key(backend, key: str):
    async with serve(backend.settings(key_mode="client")) as api:
        sku = new_sku()
        await api.create_sale(sku, 5)
        status, data, _ = await api.buy(sku, 1, key)
        assert (status, data["code"]) == (400, "BAD_REQUEST")


async def test_malformed_token_is_bad_request(api: Api, sku: str):
    await api.create_sale(sku, 5)
    status, data, _ = await api.buy(sku, 1, "{brace}.{brace}")
    assert (status, data["code"]) == (400, "BAD_REQUEST")


async def test_sale_not_found(api: Api):
    status, data, _ = await api.buy("nope-" + new_sku(), 1, await api.token(1))
    assert (status, data["code"]) == (404, "SALE_NOT_FOUND")


async def test_token_invalid(api: Api, sku: str):
    await api.create_sale(sku, 5)
    # Made up, issued to another user, expired.
    made_up = "0" * 32 + ".ffffffff.AAAAAAAAAAAAAAAAAAAAAAAA"
    other = await api.token(2)
    issuer = await api.gateway.token_issuer()
    expired = issuer.issue(1, now=time.time() - 3600)
    for key in (made_up, other, expired):
        status, data, _ = await api.buy(sku, 1, key)
        assert (status, data["code"]) == (403, "TOKEN_INVALID"), key
    assert (await api.sale(sku))["sold"] == 0


async def test_tokens_survive_a_restart(backend, sku: str):
    settings = backend.settings()
    async with serve(settings) as first:
        await first.create_sale(sku, 5)
        token = await first.token(9)
    async with serve(settings) as second:
        status, data, _ = await second.buy(sku, 9, token)
        assert status == 200, data


async def test_admitted_then_conflict_with_original(api: Api, sku: str):
    await api.create_sale(sku, 10, shards=4, price=1999)
    token = await api.token(42)
    status, first, _ = await api.buy(sku, 42, token)
    assert status == 200
    assert first["code"] == "OK" and first["sku"] == sku and first["user_id"] == 42
    assert len(first["units"]) == 1 and 1 <= first["units"][0] <= 10
    status, again, headers = await api.buy(sku, 42, token)
    assert (status, again["code"]) == (409, "IDEMPOTENT_CONFLICT")
    assert again["original"] == {"status": 200, "body": first}
    sale = await api.sale(sku)
    assert sale["sold"] == 1 and sale["remaining"] == 9


async def test_replay_mode_repeats_the_original(backend, sku: str):
    async with serve(backend.settings(duplicate_response="replay")) as api:
        await api.create_sale(sku, 1)
        token = await api.token(5)
        status, first, headers = await api.buy(sku, 5, token)
        assert status == 200 and "Idempotent-Replayed" not in headers
        status, again, headers = await api.buy(sku, 5, token)
        assert status == 200 and again == first and headers["Idempotent-Replayed"] == "true"
        # A recorded SOLD_OUT replays as SOLD_OUT; or, once this process knows the sale
        # is sold out, the fast path answers the same 410 from memory, without the header
        # (it makes no Redis call, so it cannot know the key was used: the issue allows it).
        token = await api.token(6)
        status, sold_out, _ = await api.buy(sku, 6, token)
        assert (status, sold_out["code"]) == (410, "SOLD_OUT")
        status, again, headers = await api.buy(sku, 6, token)
        assert (status, again) == (410, sold_out)
        assert headers.get("Idempotent-Replayed") == "true" or await api.fast_path_answers() >= 1


async def test_key_reused_for_another_request(api: Api, sku: str):
    other_sku = new_sku()
    await api.create_sale(sku, 10, per_user_limit=2)
    await api.create_sale(other_sku, 10, per_user_limit=2)
    token = await api.token(8)
    status, _, _ = await api.buy(sku, 8, token, 1)
    assert status == 200
    status, data, _ = await api.buy(sku, 8, token, 2)
    assert (status, data["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, data, _ = await api.buy(other_sku, 8, token, 1)
    assert (status, data["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert (await api.sale(other_sku))["sold"] == 0


async def test_client_keys_are_scoped_to_their_user(backend, sku: str):
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 10)
        status, a, _ = await api.buy(sku, 1, "shared-key-123")
        assert status == 200
        status, b, _ = await api.buy(sku, 2, "shared-key-123")
        assert status == 200 and b["order_no"] != a["order_no"] and b["user_id"] == 2


async def test_already_purchased_carries_the_order(api: Api, sku: str):
    await api.create_sale(sku, 10)
    status, first, _ = await api.buy_with_token(sku, 11)
    assert status == 200
    token = await api.token(11)
    status, data, _ = await api.buy(sku, 11, token)
    assert (status, data["code"]) == (409, "ALREADY_PURCHASED")
    assert data["order_no"] == first["order_no"]
    # Recorded against the key: the same key answers with that outcome again.
    status, again, _ = await api.buy(sku, 11, token)
    assert again["code"] == "IDEMPOTENT_CONFLICT"
    assert again["original"] == {"status": 409, "body": data}


async def test_per_user_limit_over_several_tokens(api: Api, sku: str):
    await api.create_sale(sku, 20, per_user_limit=3)
    results = [await api.buy_with_token(sku, 77, q) for q in (2, 2, 1, 1)]
    assert [s for s, _, _ in results] == [200, 409, 200, 409]
    assert results[1][1]["code"] == "ALREADY_PURCHASED"
    units = results[0][1]["units"] + results[2][1]["units"]
    assert len(units) == len(set(units)) == 3


async def test_sold_out_is_recorded_against_the_key(api: Api, sku: str):
    await api.create_sale(sku, 2, shards=2)
    for user in (1, 2):
        assert (await api.buy_with_token(sku, user))[0] == 200
    token = await api.token(3)
    status, data, _ = await api.buy(sku, 3, token)
    assert (status, data["code"]) == (410, "SOLD_OUT")
    status, again, _ = await api.buy(sku, 3, token)
    # Or, once this process knows the sale is sold out, the fast path's same 410 from
    # memory (it makes no Redis call, so it cannot know the key was used; see
    # test_replay_mode_repeats_the_original).
    if again["code"] == "SOLD_OUT":
        assert status == 410 and await api.fast_path_answers() >= 1
    else:
        assert again["code"] == "IDEMPOTENT_CONFLICT" and again["original"]["status"] == 410


async def test_retry_of_a_success_after_sell_out_still_gets_its_outcome(api: Api, sku: str):
    await api.create_sale(sku, 1, shards=1)
    token = await api.token(1)
    status, first, _ = await api.buy(sku, 1, token)
    assert status == 200
    assert (await api.buy_with_token(sku, 2))[0] == 410
    status, again, _ = await api.buy(sku, 1, token)
    assert (status, again["original"]) == (409, {"status": 200, "body": first})


async def test_concurrent_submissions_of_one_key_admit_once(api: Api, sku: str):
    await api.create_sale(sku, 100)
    token = await api.token(5)
    results = await asyncio.gather(*(api.buy(sku, 5, token) for _ in range(200)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) == 1 and statuses.count(409) == 199
    winner = next(b for s, b, _ in results if s == 200)
    for status, body, _ in results:
        if status == 409:
            assert body["original"] == {"status": 200, "body": winner}
    assert (await api.sale(sku))["sold"] == 1


async def test_thousand_users_race_for_a_hundred_units(backend, sku: str):
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 100, shards=16)
        sem = asyncio.Semaphore(100)

        async def one(user: int):
            async with sem:
                return await api.buy(sku, user, f"race-key-{user}")

        results = await asyncio.gather(*(one(u) for u in range(1, 1001)))
        ok = [b for s, b, _ in results if s == 200]
        others = {(s, b["code"], b.get("message")) for s, b, _ in results if s != 200}
        assert len(ok) == 100 and {o[:2] for o in others} == {(410, "SOLD_OUT")}, others
        units = [u for b in ok for u in b["units"]]
        assert sorted(units) == list(range(1, 101))
        assert len({b["user_id"] for b in ok}) == 100
        sale = await api.sale(sku)
        assert (sale["sold"], sale["remaining"], sale["in_transfer"]) == (100, 0, 0)


async def test_order_lookup(api: Api, sku: str):
    await api.create_sale(sku, 3)
    status, bought, _ = await api.buy_with_token(sku, 21)
    order_no = bought["order_no"]
    resp = await api.client.get(f"/api/orders/{order_no}", headers={"X-User-Id": "21"})
    data = await resp.json()
    assert resp.status == 200
    assert {k: data[k] for k in ("order_no", "sku", "user_id", "units", "status")} == {
        "order_no": order_no, "sku": sku, "user_id": 21, "units": bought["units"], "status": "admitted"}
    for user, path in (("22", order_no), ("21", "nonsense"), ("21", "3-" + "0" * 32)):
        resp = await api.client.get(f"/api/orders/{path}", headers={"X-User-Id": user})
        assert resp.status == 404 and (await resp.json())["code"] == "ORDER_NOT_FOUND"


async def test_admin_sale_lifecycle(api: Api, sku: str):
    created = await api.create_sale(sku, 100, shards=8, price=500, per_user_limit=2)
    assert created["shards"] == 8
    await api.create_sale(sku, 100, expect=409)
    sale = await api.sale(sku)
    assert (sale["stock"], sale["sold"], sale["remaining"]) == (100, 0, 100)
    assert [s["remaining"] for s in sale["shards"]] == [12, 13, 12, 13, 12, 13, 12, 13]
    assert (await api.buy_with_token(sku, 3, 2))[0] == 200
    sale = await api.sale(sku)
    assert sale["shards"][3] == {"shard": 3, "remaining": 11, "sold": 2, "transfers_out": 0}
    resp = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
    assert resp.status == 204
    client = api.gateway.store.client
    prefix = api.gateway.settings.key_prefix
    # Nothing of the sale is left but, for a while, each closed shard's tombstone (it keeps
    # a creation still at work from bringing the shard back; it expires by itself).
    lease_ms = api.gateway.store.creation_lease_ms
    leftovers = [k async for k in _scan(client, f"*{sku}*")
                 if ":closed:" not in k or not 0 < await client.pttl(k) <= 2 * lease_ms]
    assert leftovers == [], leftovers
    assert not [k async for k in _scan(client, f"*{prefix}*order:*")]
    resp = await api.client.get(f"/admin/sales/{sku}", headers=api.admin)
    assert resp.status == 404
    status, data, _ = await api.buy_with_token(sku, 4)
    assert (status, data["code"]) == (404, "SALE_NOT_FOUND")
    # The SKU can be used again, with another shape.
    await api.create_sale(sku, 10, shards=2)
    assert (await api.buy_with_token(sku, 4))[0] == 200


async def _scan(client, pattern):
    if hasattr(client, "get_primaries"):
        for node in client.get_primaries():
            async for key in client.scan_iter(match=pattern, target_nodes=node):
                yield key
    else:
        async for key in client.scan_iter(match=pattern):
            yield key


@pytest.mark.parametrize("body", [b'{"stock": 0}', b'{"stock": -5}', b'{}', b'{"stock": 10, "shards": 0}',
                                  b'{"stock": 10, "price": -1}', b'{"stock": 10, "per_user_limit": 0}',
                                  b'{"stock": 10, "colour": "red"}', b'nope'])
async def test_admin_rejects_bad_sales(api: Api, sku: str, body: bytes):
    resp = await api.client.put(f"/admin/sales/{sku}", data=body, headers=api.admin)
    assert resp.status == 400 and (await resp.json())["code"] == "BAD_REQUEST"


async def test_admin_needs_its_token(backend, sku: str):
    async with serve(backend.settings()) as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            resp = await api.client.get(f"/admin/sales/{sku}", headers=headers)
            assert resp.status == 401 and (await resp.json())["code"] == "UNAUTHENTICATED"
    async with serve(backend.settings(admin_token=None)) as api:
        resp = await api.client.put(f"/admin/sales/{sku}", json={"stock": 1},
                                    headers={"Authorization": "Bearer anything"})
        assert resp.status == 403 and (await resp.json())["code"] == "FORBIDDEN"


async def test_router_errors_are_json(api: Api):
    resp = await api.client.get("/no/such/path")
    assert resp.status == 404 and (await resp.json())["code"] == "NOT_FOUND"
    resp = await api.client.delete("/api/token")
    assert resp.status == 405 and (await resp.json())["code"] == "METHOD_NOT_ALLOWED"
    resp = await api.client.post("/api/seckill/x", data=b"x" * 100_000,
                                 headers={"X-User-Id": "1", "X-Idempotency-Key": "k" * 20})
    assert resp.status == 413 and (await resp.json())["code"] == "PAYLOAD_TOO_LARGE"


async def test_health_and_metrics(api: Api, sku: str):
    resp = await api.client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["code"] == "OK"
    await api.create_sale(sku, 1)
    await api.buy_with_token(sku, 1)
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert 'seckill_requests_total{code="OK",route="/api/seckill/{sku}"} 1.0' in text


async def test_shard_count_survives_a_config_change(backend, sku: str):
    settings = backend.settings(shards=16)
    async with serve(settings) as api:
        await api.create_sale(sku, 32)
    async with serve(settings.replace(shards=4)) as api:
        status, body, _ = await api.buy_with_token(sku, 5)
        assert status == 200
        sale = await api.sale(sku)
        assert len(sale["shards"]) == 16
        assert sale["shards"][5]["sold"] == 1  # 5 % 16, not 5 % 4
        # A new sale takes the new default.
        other = new_sku()
        assert (await api.create_sale(other, 8))["shards"] == 4


async def test_token_issuer_rejects_tampering():
    issuer = TokenIssuer(b"secret", 300)
    token = issuer.issue(5)
    assert issuer.verify(token, 5)
    nonce, expiry, mac = token.split(".")
    assert not issuer.verify(f"{nonce}.{'f' * 8}.{mac}", 5)
    assert not issuer.verify(token, 6)
    assert not TokenIssuer(b"other", 300).verify(token, 5)
