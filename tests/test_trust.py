"""Identity: JWT mode (HS256, expiry, signature, sub as user id)."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.support.api import serve

SECRET = "a-test-secret-of-a-decent-length-0123456789"


def bearer(sub, *, secret: str = SECRET, exp_in: float | None = 60, alg: str = "HS256", **claims) -> dict:
    payload = {"sub": sub, **claims}
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return {"Authorization": f"Bearer {jwt.encode(payload, secret, algorithm=alg)}"}


@pytest.fixture
async def jwt_api(backend):
    async with serve(backend.settings(auth="jwt", jwt_secret=SECRET)) as api:
        yield api


async def _token(api, headers):
    resp = await api.client.get("/api/token", headers=headers)
    return resp.status, await resp.json()


async def test_valid_jwt_buys(jwt_api, sku):
    await jwt_api.create_sale(sku, 5)
    status, data = await _token(jwt_api, bearer("42"))
    assert status == 200
    resp = await jwt_api.client.post(f"/api/seckill/{sku}",
                                     headers={**bearer("42"), "X-Idempotency-Key": data["token"]})
    body = await resp.json()
    assert resp.status == 200 and body["user_id"] == 42


@pytest.mark.parametrize("headers", [
    {},
    {"X-User-Id": "42"},                                    # the proxy header means nothing here
    {"Authorization": "Bearer not-a-jwt"},
    {"Authorization": "Token abc"},
    bearer("42", secret="another-secret-of-a-decent-length-xyz"),   # bad signature
    bearer("42", exp_in=-10),                                # expired
    bearer("42", exp_in=None),                               # no expiry
    bearer("-3"), bearer("abc"), bearer("9223372036854775808"),   # sub not a user id
    bearer(None),
])
async def test_bad_identity_is_401(jwt_api, headers):
    status, data = await _token(jwt_api, headers)
    assert (status, data["code"]) == (401, "UNAUTHENTICATED")


async def test_none_algorithm_is_refused(jwt_api):
    token = jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, None, algorithm="none")
    status, data = await _token(jwt_api, {"Authorization": f"Bearer {token}"})
    assert status == 401


async def test_a_token_issued_to_one_user_is_refused_for_another(jwt_api, sku):
    await jwt_api.create_sale(sku, 5)
    _, data = await _token(jwt_api, bearer("1"))
    resp = await jwt_api.client.post(f"/api/seckill/{sku}",
                                     headers={**bearer("2"), "X-Idempotency-Key": data["token"]})
    body = await resp.json()
    assert (resp.status, body["code"]) == (403, "TOKEN_INVALID")
    assert (await jwt_api.sale(sku))["sold"] == 0


def test_jwt_mode_needs_a_secret(backend):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError):
        backend.settings(auth="jwt")
