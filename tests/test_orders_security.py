"""The orders service trusts no caller: payment notices must be signed, every other call
but /healthz must carry the bearer token, and the service does not start without its
secrets unless told it is a development run. On SQLite and PostgreSQL, over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable

import orjson
import pytest
from aiohttp import ClientSession
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.processes import free_port
from gateway.cli import build_parser
from gateway.config import ConfigError, Settings
from gateway.orders import signing
from gateway.orders.config import OrdersConfig, with_dev_secrets
from tests.support.delivery import ORDERS_TOKEN, PAYMENT_SECRET, eventually
from tests.support.orders import Client, new_no


def notice(order_no: str, notify_id: str = "n-1", amount: int = 500) -> bytes:
    return orjson.dumps({"notify_id": notify_id, "order_no": order_no, "amount": amount,
                         "status": "SUCCESS"})


async def nothing_changed(orders_client: Client, pending: str, cancelled: str) -> None:
    """The pending order is still pending, the cancelled one still cancelled, and no
    payment (nor refund) was recorded."""
    assert (await orders_client.get(pending))[1]["state_version"] == 1
    assert (await orders_client.get(cancelled))[1]["state"] == "cancelled"
    assert await orders_client.refunds() == []
    async with orders_client.service.db.transaction(readonly=True) as tx:
        assert await tx.fetchall("SELECT notify_id FROM payments") == []


async def two_orders(orders_client: Client) -> tuple[str, str]:
    """A pending order and a cancelled one (where a notice would be a refund)."""
    pending, cancelled = new_no(), new_no()
    assert (await orders_client.post_order(pending, [1]))[0] == 201
    assert (await orders_client.post_order(cancelled, [2]))[0] == 201
    assert (await orders_client.cancel(cancelled))[0] == 200
    return pending, cancelled


# -- signatures ---------------------------------------------------------------------------

def _hmac(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


# Each makes an X-Signature header (None: no header) for a body, at a time.
BAD_SIGNATURES: dict[str, Callable[[bytes, int], str | None]] = {
    "missing": lambda body, now: None,
    "empty": lambda body, now: "",
    "forged": lambda body, now: f"t={now},v1={'ab' * 32}",
    "wrong secret": lambda body, now: signing.sign("not-the-secret", body, now),
    "replayed (301 s old)": lambda body, now: signing.sign(PAYMENT_SECRET, body, now - 301),
    "from the future (301 s)": lambda body, now: signing.sign(PAYMENT_SECRET, body, now + 301),
    "body changed after signing": lambda body, now: signing.sign(PAYMENT_SECRET, body + b" ", now),
    "signed without the timestamp": lambda body, now: f"t={now},v1={_hmac(PAYMENT_SECRET, body)}",
    "no v1": lambda body, now: f"t={now}",
    "no t": lambda body, now: "v1=" + signing.signature(PAYMENT_SECRET, body, now),
    "two t": lambda body, now: signing.sign(PAYMENT_SECRET, body, now) + f",t={now}",
    "t not a number": lambda body, now: signing.sign(PAYMENT_SECRET, body, now).replace("t=", "t=x"),
    "negative t": lambda body, now: f"t=-{now},v1={signing.signature(PAYMENT_SECRET, body, -now)}",
    "item without =": lambda body, now: signing.sign(PAYMENT_SECRET, body, now) + ",junk",
    "v1 truncated": lambda body, now: signing.sign(PAYMENT_SECRET, body, now)[:-2],
    "v1 not hex": lambda body, now: f"t={now},v1={'zz' * 32}",
    "v0 only": lambda body, now: f"t={now},v0={signing.signature(PAYMENT_SECRET, body, now)}",
    "a bare secret": lambda body, now: PAYMENT_SECRET,
}


@pytest.mark.parametrize("case", list(BAD_SIGNATURES))
async def test_a_notice_without_a_valid_signature_is_refused_and_changes_nothing(
        orders_client: Client, case: str):
    pending, cancelled = await two_orders(orders_client)
    for order_no in (pending, cancelled):
        body = notice(order_no)
        header = BAD_SIGNATURES[case](body, int(time.time()))
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers[signing.HEADER] = header
        status, answer = await orders_client.call("POST", "/payments/notify", data=body,
                                           headers=headers, auth=False)
        assert (status, answer["code"]) == (401, "SIGNATURE_INVALID"), answer
    await nothing_changed(orders_client, pending, cancelled)
    # The same notices, signed, work (and the refused ones did not use up the notify_id).
    assert (await orders_client.notify_raw(notice(pending)))[0] == 200
    assert (await orders_client.notify_raw(notice(cancelled, "n-2")))[1]["code"] == "ORDER_CLOSED"


async def test_a_signed_notice_is_checked_before_its_body(orders_client: Client):
    """Garbage with a bad signature is a 401, not a 400: nothing is read unsigned."""
    t = int(time.time())
    status, answer = await orders_client.notify_raw(b"{nope", signature=f"t={t},v1={'0' * 64}")
    assert (status, answer["code"]) == (401, "SIGNATURE_INVALID")
    status, answer = await orders_client.notify_raw(b"{nope")
    assert (status, answer["code"]) == (400, "BAD_REQUEST")


async def test_signatures_within_the_tolerance_and_during_key_rotation_are_accepted(
        orders_client: Client):
    order_no = new_no()
    await orders_client.post_order(order_no, [1])
    body = notice(order_no, "n-1")
    # 290 s old (a provider's retry, or a slow clock): still fresh.
    t = int(time.time())
    assert (await orders_client.notify_raw(body, signing.sign(PAYMENT_SECRET, body, t - 290)))[0] == 200
    # Rotation: signed with the new secret and the old one; the receiver knows one.
    body = notice(order_no, "n-2")
    rotated = (f"t={t},v1={signing.signature('the-next-secret', body, t)},"
               f"v1={signing.signature(PAYMENT_SECRET, body, t)},v0=ignored")
    status, answer = await orders_client.notify_raw(body, rotated)
    assert status == 200 and answer["state"] == "paid"
    # Upper-case hex and spaces around items are the same signature.
    body = notice(order_no, "n-3")
    sig = signing.signature(PAYMENT_SECRET, body, t)
    assert (await orders_client.notify_raw(body, f" t={t} , v1={sig.upper()} "))[0] == 200


# Header values as bytes on the wire: any visible character, space, tab, non-ASCII
# (obs-text) and non-UTF-8 bytes; no CR/LF (that would end the header).
HEADER_BYTES = st.binary(max_size=200).map(
    lambda raw: bytes(b for b in raw if b == 9 or 32 <= b != 127))
# Near-misses: the header's own pieces in random order and number.
PIECES = st.sampled_from(["t=", "v1=", "v0=", ",", "=", " ", str(int(time.time())), "-", "ab" * 32,
                          "é", "\t"])
STRUCTURED = st.lists(PIECES, max_size=12).map(lambda parts: "".join(parts).encode())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(HEADER_BYTES, STRUCTURED))
async def test_random_signature_headers_are_401_never_500(orders_client: Client, header: bytes):
    order_no = "fuzzed-order"
    await orders_client.post_order(order_no, [1])  # the first example stores it; later ones: 409
    body = notice(order_no, "n-fuzz")
    status, answer = await raw_request(orders_client, b"POST", b"/payments/notify", [
        (b"Content-Type", b"application/json"), (signing.HEADER.encode(), header)], body)
    assert (status, answer["code"]) == (401, "SIGNATURE_INVALID"), (header, answer)
    assert (await orders_client.get(order_no))[1]["state"] == "pending"


async def raw_request(orders_client: Client, method: bytes, path: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, dict]:
    """One request written byte for byte (what aiohttp's orders_client would refuse to send)."""
    server = orders_client.service.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: %d" % len(body), *(name + b": " + value for name, value in headers)]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(payload)


# -- the bearer token ---------------------------------------------------------------------

PROTECTED = [("POST", "/orders"), ("GET", "/orders/{no}"), ("POST", "/orders/{no}/ship"),
             ("POST", "/orders/{no}/cancel"), ("GET", "/refunds")]
BAD_BEARERS = [None, "", "Bearer", "Bearer wrong-token", f"Basic {ORDERS_TOKEN}",
               f"Bearer {ORDERS_TOKEN}x", f"Bearer {ORDERS_TOKEN[:-1]}", f"Bearer {ORDERS_TOKEN} x",
               f"Token {ORDERS_TOKEN}"]


@pytest.mark.parametrize("method,path", PROTECTED)
async def test_each_call_needs_the_bearer_token(orders_client: Client, method: str, path: str):
    order_no, other = new_no(), new_no()
    await orders_client.post_order(order_no, [1])
    await orders_client.notify("n-1", order_no)  # paid: shipping would move it
    body = {"order_no": other, "sku": "sku-1", "user_id": 1, "units": [2], "quantity": 1,
            "amount": 500}
    for bearer in BAD_BEARERS:
        headers = {"If-Match": "2", "Idempotency-Key": other}
        if bearer is not None:
            headers["Authorization"] = bearer
        status, answer = await orders_client.call(method, path.format(no=order_no), body, headers,
                                           auth=False)
        assert (status, answer["code"]) == (401, "UNAUTHENTICATED"), (bearer, answer)
    for raw in (b"Bearer \xe9\xff", b"Bearer " + ORDERS_TOKEN.encode() + b"\xff", b"\xff"):
        status, answer = await raw_request(orders_client, method.encode(),
                                           path.format(no=order_no).encode(),
                                           [(b"Authorization", raw), (b"If-Match", b"2")])
        assert (status, answer["code"]) == (401, "UNAUTHENTICATED"), (raw, answer)
    # Nothing moved, nothing was stored; with the token the same call works.
    assert (await orders_client.get(order_no))[1]["state"] == "paid"
    assert (await orders_client.get(other))[0] == 404
    status, _ = await orders_client.call(method, path.format(no=order_no), body,
                                  {"If-Match": "2", "Idempotency-Key": other})
    assert status in (200, 201, 409)  # 409: a paid order does not cancel


async def test_health_is_open_and_unknown_paths_need_the_token(orders_client: Client):
    status, answer = await orders_client.call("GET", "/healthz", auth=False)
    assert status == 200 and answer["database"] == "up"
    assert (await orders_client.call("GET", "/nowhere", auth=False))[0] == 401
    assert (await orders_client.call("GET", "/nowhere"))[0] == 404
    # The token is compared as sent: the scheme's case does not matter, the token's does.
    token = orders_client.service.config.orders_token
    assert (await orders_client.call("GET", "/refunds", headers={"Authorization": f"bearer {token}"},
                              auth=False))[0] == 200
    assert (await orders_client.call("GET", "/refunds", headers={"Authorization": f"Bearer {token.upper()}"},
                              auth=False))[0] == 401


# -- starting without secrets ---------------------------------------------------------------

def test_the_service_refuses_to_be_configured_without_its_secrets():
    with pytest.raises(ConfigError, match="SECKILL_ORDERS_TOKEN and SECKILL_PAYMENT_SECRET"):
        OrdersConfig.from_settings(Settings())
    with pytest.raises(ConfigError, match="SECKILL_PAYMENT_SECRET"):
        OrdersConfig.from_settings(Settings(orders_token="t"))
    with pytest.raises(ConfigError, match="SECKILL_ADMIN_TOKEN"):
        OrdersConfig.from_settings(Settings(orders_token="t", payment_secret="s",
                                            gateway_url="http://127.0.0.1:8080"))
    # A development run makes up only what is missing.
    settings, made = with_dev_secrets(Settings(orders_token="mine"))
    assert settings.orders_token == "mine" and list(made) == ["SECKILL_PAYMENT_SECRET"]
    assert settings.payment_secret == made["SECKILL_PAYMENT_SECRET"]
    assert len(settings.payment_secret) >= 32


def _environ(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}
    env["SECKILL_DATABASE_URL"] = database_url
    return env


async def _orders_process(database_url: str, port: int, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "orders", "serve", "--port", str(port), *args,
        env=_environ(database_url), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def test_orders_serve_refuses_to_start_without_secrets(database_url: str):
    proc = await _orders_process(database_url, free_port())
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out, err)
    assert b"SECKILL_ORDERS_TOKEN and SECKILL_PAYMENT_SECRET" in err and b"--dev" in err


async def test_orders_serve_dev_makes_up_secrets_and_prints_them(database_url: str):
    port = free_port()
    proc = await _orders_process(database_url, port, "--dev")
    try:
        printed = await asyncio.wait_for(_exports(proc, 2), 60)
        assert set(printed) == {"SECKILL_ORDERS_TOKEN", "SECKILL_PAYMENT_SECRET"}
        base = f"http://127.0.0.1:{port}"
        async with ClientSession() as session:
            async def up() -> bool:
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        return resp.status == 200
                except OSError:
                    return False

            await eventually(up, "the dev orders service answers")
            auth = {"Authorization": f"Bearer {printed['SECKILL_ORDERS_TOKEN']}"}
            order = {"order_no": "dev-1", "sku": "s", "user_id": 1, "units": [1],
                     "quantity": 1, "amount": 7}
            async with session.post(f"{base}/orders", json=order) as resp:
                assert resp.status == 401
            async with session.post(f"{base}/orders", json=order, headers=auth) as resp:
                assert resp.status == 201
            body = notice("dev-1", amount=7)
            header = signing.sign(printed["SECKILL_PAYMENT_SECRET"], body, int(time.time()))
            async with session.post(f"{base}/payments/notify", data=body,
                                    headers={signing.HEADER: header}) as resp:
                assert resp.status == 200 and (await resp.json())["state"] == "paid"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def _exports(proc: asyncio.subprocess.Process, count: int) -> dict[str, str]:
    """The first ``count`` ``export NAME=value`` lines the process prints."""
    assert proc.stdout is not None
    found: dict[str, str] = {}
    while len(found) < count:
        line = (await proc.stdout.readline()).decode()
        assert line, "the process ended before printing its secrets"
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            found[name] = value
    return found


# -- sign-notify: the payment provider on the command line ----------------------------------

def _sign_notify(*args: str) -> None:
    parsed = build_parser().parse_args(["orders", "sign-notify", *args])
    assert parsed.func(parsed) == 0


async def test_sign_notify_prints_a_curl_command_that_works(orders_client: Client, capsys, monkeypatch):
    order_no = new_no()
    await orders_client.post_order(order_no, [1], amount=1234)
    monkeypatch.setenv("SECKILL_PAYMENT_SECRET", PAYMENT_SECRET)
    _sign_notify("--notify-id", "n-cli", "--order-no", order_no, "--amount", "1234",
                 "--url", orders_client.service.url("/"))
    command = shlex.split(capsys.readouterr().out)
    assert command[0] == "curl"
    curl = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(curl.communicate(), 30)
    answer = orjson.loads(out)
    assert answer["code"] == "OK" and answer["state"] == "paid", answer


async def test_sign_notify_prints_header_and_body(orders_client: Client, capsys, monkeypatch):
    order_no = new_no()
    await orders_client.post_order(order_no, [1])
    _sign_notify("--notify-id", "n-cli", "--order-no", order_no, "--amount", "500",
                 "--secret", PAYMENT_SECRET, "--format", "header")
    header_line, body = capsys.readouterr().out.splitlines()
    name, _, header = header_line.partition(": ")
    assert name == signing.HEADER
    assert (await orders_client.notify_raw(body.encode(), header))[1]["state"] == "paid"
    # The wrong secret is refused by the service; none at all by the command.
    _sign_notify("--notify-id", "n-x", "--order-no", order_no, "--amount", "500",
                 "--secret", "wrong", "--format", "header")
    header_line, body = capsys.readouterr().out.splitlines()
    assert (await orders_client.notify_raw(body.encode(), header_line.partition(": ")[2]))[0] == 401
    monkeypatch.delenv("SECKILL_PAYMENT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SECKILL_PAYMENT_SECRET"):
        _sign_notify("--notify-id", "n-y", "--order-no", order_no, "--amount", "500")
