"""Bad input: the gateway, running as a real server (``python -m gateway serve``), fuzzed
with Schemathesis against its own /openapi.json, and with Hypothesis over raw HTTP for what
a schema cannot say: hash-tag braces, NUL and control bytes, huge, negative and non-numeric
numbers, unknown fields, non-JSON, non-UTF-8 and deeply nested bodies, oversized bodies,
headers and header counts.

Whatever comes in: never a 500 (a 503 only when Redis fails), every answer but a 204 is
JSON with a ``code``, and every status is one the document lists for the operation.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import jwt
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (  # built-in checks, looked up by name
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.http.openapi import build as build_openapi
from tests.support.services import (
    ADMIN_TOKEN,
    JWT_SECRET,
    GatewayProcess,
    admin_headers,
    gateway_process,
    http,
    put_sale,
)

SALE = "fuzz-sale"        # a sale that exists, so that purchases reach the Lua script
PER_USER_LIMIT = 1000
MAX_BODY = 4096           # SECKILL_MAX_BODY_BYTES (its default)
MAX_FIELD = 8190          # aiohttp's parser: one header line, name and value
MAX_HEADERS = 128
UNISSUED = "0" * 32 + ".7fffffff.AAAAAAAAAAAAAAAAAAAAAAAA"  # token-shaped, never issued

RAW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the servers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(standalone_redis, tmp_path_factory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("fuzz") / "gateway.log"
    with gateway_process(standalone_redis.url, log) as gw:
        put_sale(gw, SALE, 1_000_000, per_user_limit=PER_USER_LIMIT, shards=16)
        yield gw
        assert gw.terminate() == 0
        _no_unhandled_errors(gw)


@pytest.fixture(scope="module")
def jwt_gateway(standalone_redis, tmp_path_factory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("fuzz-jwt") / "gateway.log"
    with gateway_process(standalone_redis.url, log, SECKILL_AUTH="jwt",
                         SECKILL_JWT_SECRET=JWT_SECRET) as gw:
        yield gw
        assert gw.terminate() == 0
        _no_unhandled_errors(gw)


def _no_unhandled_errors(gw: GatewayProcess) -> None:
    """A 500 is logged as an unhandled error with its traceback: none, whatever came in."""
    output = gw.output()
    assert "unhandled error" not in output and "Traceback" not in output, output[-5000:]
    for line in gw.log_lines():
        orjson.loads(line)  # and every line of the output is a JSON log record


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# -- Schemathesis ---------------------------------------------------------------------------

def _gateway_answer(ctx, response, case) -> None:
    """No 5xx but 503 (with Retry-After); a JSON object with a string ``code`` (no body
    for a 204; /metrics is Prometheus text and /openapi.json the document itself)."""
    status = response.status_code
    assert status < 500 or status == 503, f"{status} for {case.method} {case.formatted_path}"
    if status == 204:
        assert response.content == b""
        return
    if case.path in ("/metrics", "/openapi.json") and status == 200:
        return
    body = orjson.loads(response.content)
    assert isinstance(body, dict) and isinstance(body.get("code"), str), body
    if status == 503:
        assert int(response.headers["Retry-After"][0]) >= 1


CHECKS = [_gateway_answer, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
# Invalid input is refused with a 4xx: checked on a case as generated only (the second
# calls below replace the very header or parameter that may have made a case invalid).
AS_GENERATED = [*CHECKS, negative_data_rejection]

# The document the gateway serves at /openapi.json (test_the_served_document_is_the_built_one
# checks that they are equal), loaded at import so that each operation is a test of its own.
# (schemathesis.pytest.from_fixture would load it from the running server, but fails on
# pytest 9: it sets ``node._nodeid``, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(build_openapi())


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_against_its_own_openapi_document(case, gateway: GatewayProcess, session):
    """Each operation with generated valid and invalid input; then, so that the values
    reach past authentication into the handlers and the Lua script, once more as the admin
    (admin operations) or with a freshly issued token for a sale that exists (purchases)."""
    response = case.call(base_url=gateway.url, session=session, timeout=10)
    case.validate_response(response, checks=AS_GENERATED)
    if case.path.startswith("/admin/"):
        response = case.call(base_url=gateway.url, session=session, timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        case.validate_response(response, checks=CHECKS)
    elif case.operation.label == "POST /api/seckill/{sku}" and _valid_user(case):
        user = case.headers["X-User-Id"]
        token = session.get(f"{gateway.url}/api/token", headers={"X-User-Id": user}).json()["token"]
        case.path_parameters = {**case.path_parameters, "sku": SALE}
        response = case.call(base_url=gateway.url, session=session, timeout=10,
                             headers={"X-Idempotency-Key": token})
        case.validate_response(response, checks=CHECKS)


def _valid_user(case) -> bool:
    user = (case.headers or {}).get("X-User-Id")
    return isinstance(user, str) and re.fullmatch(r"[0-9]{1,18}", user) is not None


def test_the_served_document_is_the_built_one(gateway: GatewayProcess):
    status, headers, body = http(gateway, "GET", "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body) == build_openapi()


# -- raw HTTP -------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        data = orjson.loads(self.body)
        assert isinstance(data, dict) and isinstance(data.get("code"), str), data
        return data

    @property
    def code(self) -> str:
        return self.json()["code"]


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def request_bytes(method: str, target: str | bytes, headers: Sequence[tuple[str | bytes, str | bytes]] = (),
                  body: bytes | None = None) -> bytes:
    lines = [_bytes(method) + b" " + _bytes(target) + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close"]
    lines += [_bytes(name) + b": " + _bytes(value) for name, value in headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def send(gw: GatewayProcess, data: bytes, timeout: float = 10.0) -> Answer:
    """Send raw bytes on a new connection; the answer (a complete one, or the test fails)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before reading all of it: read the answer
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer (got {buf!r})"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        length = 0 if data.startswith(b"HEAD ") else int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, f"answer cut short: {status_line!r} {body!r}"
            body += chunk
        return Answer(int(status_line.split(b" ")[1]), headers, body[:length])


def refused(answer: Answer, *statuses: int) -> str:
    """A 4xx (one of ``statuses`` if given) with a JSON ``code``; returns the code."""
    assert 400 <= answer.status < 500, answer
    if statuses:
        assert answer.status in statuses, answer
    return answer.code


def token_for(gw: GatewayProcess, user: int) -> str:
    status, _, body = http(gw, "GET", "/api/token", headers={"X-User-Id": str(user)})
    assert status == 200, body
    return orjson.loads(body)["token"]


def buy(gw: GatewayProcess, sku: str | bytes = SALE, *, user: str | bytes = "1",
        key: str | bytes = UNISSUED, body: bytes | None = None,
        extra: Sequence[tuple[str | bytes, str | bytes]] = ()) -> Answer:
    target = sku if isinstance(sku, bytes) else "/api/seckill/" + quote(sku, safe="")
    headers = [("X-User-Id", user), ("X-Idempotency-Key", key), *extra]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    return send(gw, request_bytes("POST", target, headers, body))


# Hash-tag braces: user text never picks or splits a Redis Cluster slot, and no brace gets
# that far: SKUs and keys with braces are refused, order numbers with braces are not found.
BRACED = st.builds(lambda a, b, c: f"{a}{{{b}}}{c}",
                   st.text("abcXYZ019_.:-{}", max_size=8), st.text("abc019_.:-{}", max_size=8),
                   st.text("abcXYZ019_.:-{}", max_size=8))


@RAW
@given(text=BRACED, which=st.sampled_from(["sku", "admin-sku", "key", "order"]))
def test_hash_tag_braces_in_skus_keys_and_order_numbers(gateway: GatewayProcess, text: str, which: str):
    if which == "sku":
        assert refused(buy(gateway, text, key=token_for(gateway, 5)), 400) == "BAD_REQUEST"
    elif which == "admin-sku":
        answer = send(gateway, request_bytes("PUT", "/admin/sales/" + quote(text, safe=""),
                                             list(admin_headers().items()), b'{"stock": 5}'))
        assert refused(answer, 400) == "BAD_REQUEST"
    elif which == "key":
        assert refused(buy(gateway, key=text), 400) == "BAD_REQUEST"
    else:
        answer = send(gateway, request_bytes("GET", "/api/orders/" + quote(text, safe=""),
                                             [("X-User-Id", "1")]))
        assert refused(answer, 404) == "ORDER_NOT_FOUND"


def test_unencoded_braces_in_the_request_target(gateway: GatewayProcess):
    for target in (b"/api/seckill/{x}", b"/api/seckill/a{b}c", b"/api/orders/{0}-" + b"0" * 32):
        refused(buy(gateway, target, key=token_for(gateway, 5)))


CONTROL = st.sampled_from([bytes([c]) for c in [*range(0, 9), 11, 12, *range(14, 32), 127]])


@RAW
@given(ctl=CONTROL, where=st.sampled_from(["user", "key", "auth", "other-header", "path",
                                          "encoded-path", "body", "json-string"]),
       before=st.text("0123456789", min_size=1, max_size=5), after=st.text("0123456789", max_size=5))
def test_nul_and_control_bytes_in_headers_paths_and_bodies(gateway: GatewayProcess, ctl: bytes, where: str,
                                                           before: str, after: str):
    """A control byte inside a header, the path or the body: refused (by the HTTP parser or
    by the handlers), never a 5xx, never a dropped connection."""
    inner = before.encode() + ctl + after.encode()
    if where == "user":
        answer = send(gateway, request_bytes("GET", "/api/token", [("X-User-Id", inner)]))
        refused(answer, 400, 401)
    elif where == "key":
        refused(buy(gateway, key=b"k" + inner + b"k"), 400)
    elif where == "auth":
        answer = send(gateway, request_bytes("GET", f"/admin/sales/{SALE}",
                                             [("Authorization", b"Bearer " + ADMIN_TOKEN.encode() + inner)]))
        refused(answer, 400, 401)
    elif where == "other-header":
        answer = send(gateway, request_bytes("GET", "/api/token", [("X-User-Id", "1"), ("X-Note", inner)]))
        assert answer.status in (200, 400) and answer.code in ("OK", "BAD_REQUEST"), answer
    elif where == "path":
        refused(buy(gateway, b"/api/seckill/a" + inner))
    elif where == "encoded-path":
        refused(buy(gateway, "a" + inner.decode("latin-1")), 400)
    elif where == "body":
        refused(buy(gateway, body=b'{"quantity": 1' + inner + b"}"), 400)
    else:
        body = b'{"quantity": "' + inner + b'"}'
        refused(buy(gateway, body=body), 400)


USER_IDS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=2**63 - 3, max_value=2**63 + 3).map(str),
    st.integers(min_value=0, max_value=2**63 - 1).map(lambda n: f"{n:020d}"),  # zero-padded
    st.integers(min_value=0, max_value=2**64).map(lambda n: f"+{n}"),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), max_size=30),
    st.sampled_from(["", "0x10", "1e3", "1_000", "١٢٣", "１２", "-0", "00", "0"]),
)


def _valid_user_id(text: str) -> bool:
    """The contract: a decimal integer 0 <= id < 2^63, written plainly."""
    return re.fullmatch(r"[0-9]{1,19}", text, re.ASCII) is not None and int(text) < 2**63


@RAW
@given(user=USER_IDS)
def test_huge_negative_and_non_numeric_user_ids(gateway: GatewayProcess, user: str):
    answer = send(gateway, request_bytes("GET", "/api/token", [("X-User-Id", user.encode())]))
    if _valid_user_id(user):
        assert answer.status == 200 and answer.code == "OK", answer
    else:
        assert refused(answer, 401) == "UNAUTHENTICATED"
        refused(buy(gateway, user=user.encode()), 401)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@RAW
@given(quantity=JSON_VALUES)
def test_quantities_of_every_kind(gateway: GatewayProcess, quantity):
    """Valid quantities (1..per-user limit) get past validation to the token check; all
    else is a 400."""
    answer = buy(gateway, body=json.dumps({"quantity": quantity}).encode())
    valid = type(quantity) is int and 1 <= quantity <= PER_USER_LIMIT
    assert (answer.status, answer.code) == ((403, "TOKEN_INVALID") if valid else (400, "BAD_REQUEST"))


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"quantity":' * depth + b"1" + b"}" * depth


BODIES = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=1, max_size=50).map(lambda b: b'{"quantity": "' + b + b'\xff\xfe"}'),  # not UTF-8
    st.text(max_size=50).map(lambda t: t.encode("utf-16")),
    st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "quantity"),
                    JSON_VALUES, min_size=1, max_size=4).map(lambda d: json.dumps({"quantity": 1, **d}).encode()),
    st.builds(_nested, st.integers(min_value=1, max_value=MAX_BODY // 13), st.sampled_from(["list", "object"])),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b" ", b"{}", b"null", b"[]", b'"1"', b"1", b"\xef\xbb\xbf{}", b"{\"quantity\":1}x",
                     b'{"quantity":1,"quantity":2}', b"NaN", b"\x00", b"\xff" * 10]),
)


@RAW
@given(body=BODIES, target=st.sampled_from(["buy", "admin"]))
def test_unknown_fields_non_json_non_utf8_and_deeply_nested_bodies(gateway: GatewayProcess, body: bytes,
                                                                  target: str):
    if target == "buy":
        answer = buy(gateway, body=body)
        code = refused(answer, 400, 403)
        assert code in ("BAD_REQUEST", "TOKEN_INVALID")
        if code == "TOKEN_INVALID":  # the body was read as valid: empty, or {"quantity": 1..}
            data = orjson.loads(body) if body.strip() else {}
            assert set(data) <= {"quantity"}
    else:
        sku = f"fz-{uuid.uuid4().hex[:10]}"
        answer = send(gateway, request_bytes("PUT", f"/admin/sales/{sku}", list(admin_headers().items()), body))
        if answer.status == 201:  # a valid sale after all ({"stock": n}): tidy up
            assert http(gateway, "DELETE", f"/admin/sales/{sku}", headers=admin_headers())[0] == 204
        else:
            assert refused(answer, 400) == "BAD_REQUEST"


NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-2, max_value=1030),
                    st.floats(), st.booleans(), st.text(max_size=5), st.none())


@RAW
@given(stock=NUMBERS, price=NUMBERS, limit=NUMBERS, shards=NUMBERS)
def test_huge_and_negative_numbers_in_admin_bodies(gateway: GatewayProcess, stock, price, limit, shards):
    sku = f"fz-{uuid.uuid4().hex[:10]}"
    body = json.dumps({"stock": stock, "price": price, "per_user_limit": limit, "shards": shards}).encode()
    answer = send(gateway, request_bytes("PUT", f"/admin/sales/{sku}", list(admin_headers().items()), body))

    def ok(v, lo, hi):
        return type(v) is int and lo <= v <= hi

    if ok(stock, 1, 10_000_000) and ok(price, 0, 2**40) and ok(limit, 1, 1000) and ok(shards, 1, 1024):
        assert answer.status == 201, answer
        assert http(gateway, "DELETE", f"/admin/sales/{sku}", headers=admin_headers())[0] == 204
    else:
        assert refused(answer, 400) == "BAD_REQUEST"


@settings(max_examples=12, deadline=None)
@given(size=st.integers(min_value=MAX_BODY + 1, max_value=256 * 1024), chunked=st.booleans(),
       target=st.sampled_from(["buy", "admin"]))
def test_oversized_bodies_are_413_json(gateway: GatewayProcess, size: int, chunked: bool, target: str):
    body = b'{"quantity": 1, "pad": "' + b"x" * size + b'"}'
    path = f"/api/seckill/{SALE}" if target == "buy" else f"/admin/sales/fz-{uuid.uuid4().hex[:8]}"
    headers = [("X-User-Id", "1"), ("X-Idempotency-Key", UNISSUED), *admin_headers().items()]
    if chunked:
        data = request_bytes("POST" if target == "buy" else "PUT", path,
                             [*headers, ("Transfer-Encoding", "chunked")])
        data += b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                         for part in (body[i:i + 1000] for i in range(0, len(body), 1000))) + b"0\r\n\r\n"
    else:
        data = request_bytes("POST" if target == "buy" else "PUT", path, headers, body)
    assert refused(send(gateway, data), 413) == "PAYLOAD_TOO_LARGE"


def test_a_body_at_the_limit_is_read(gateway: GatewayProcess):
    body = b'{"quantity": 1}' + b" " * (MAX_BODY - 15)
    assert len(body) == MAX_BODY
    assert refused(buy(gateway, body=body), 403) == "TOKEN_INVALID"


@settings(max_examples=15, deadline=None)
@given(where=st.sampled_from(["value", "name", "user", "target"]),
       size=st.integers(min_value=MAX_FIELD + 1, max_value=64 * 1024))
def test_oversized_headers_and_request_lines(gateway: GatewayProcess, where: str, size: int):
    """Refused by aiohttp's HTTP parser, which the gateway makes answer in JSON (a 400:
    aiohttp's status for these; the message says what was too long and echoes nothing)."""
    if where == "value":
        data = request_bytes("GET", "/api/token", [("X-User-Id", "1"), ("X-Big", "a" * size)])
    elif where == "name":
        data = request_bytes("GET", "/api/token", [("X-User-Id", "1"), ("X" * size, "1")])
    elif where == "user":
        data = request_bytes("GET", "/api/token", [("X-User-Id", "1" * size)])
    else:
        data = request_bytes("GET", "/api/orders/" + "9" * size, [("X-User-Id", "1")])
    answer = send(gateway, data)
    assert refused(answer, 400) == "BAD_REQUEST"
    assert b"aaaa" not in answer.body and b"1111" not in answer.body and b"9999" not in answer.body


@settings(max_examples=10, deadline=None)
@given(count=st.integers(min_value=MAX_HEADERS + 1, max_value=1000))
def test_too_many_headers(gateway: GatewayProcess, count: int):
    headers = [("X-User-Id", "1"), *((f"X-H{i}", "v") for i in range(count))]
    answer = send(gateway, request_bytes("GET", "/api/token", headers))
    assert refused(answer, 400) == "BAD_REQUEST"


def test_headers_just_under_the_limits_are_read(gateway: GatewayProcess):
    big = [("X-User-Id", "1"), ("X-Big", "a" * (MAX_FIELD - len("X-Big") - 10))]
    assert send(gateway, request_bytes("GET", "/api/token", big)).code == "OK"
    many = [("X-User-Id", "1"), *((f"X-H{i}", "v") for i in range(MAX_HEADERS - 4))]
    assert send(gateway, request_bytes("GET", "/api/token", many)).code == "OK"


def test_malformed_http(gateway: GatewayProcess):
    """What the HTTP parser refuses before any handler runs: answered in JSON too."""
    for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",   # TLS on the HTTP port
                 b"G@T /api/token HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /api/token HTTP/9.9\r\nHost: x\r\n\r\n",
                 b"GET /api/token HTTP/1.1\r\nHost: x\r\nX-User-Id 1\r\n\r\n",
                 b"POST /api/seckill/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 b"POST /api/seckill/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                 b"POST /api/seckill/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 b"GET /api/orders/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"):
        refused(send(gateway, data), 400)


def test_undecodable_content_encoding(gateway: GatewayProcess):
    """A body that says gzip and is not: a 400, not a 500 (it was a 500: the payload error
    escaped the handler)."""
    answer = buy(gateway, body=b"not gzip at all", extra=[("Content-Encoding", "gzip")])
    assert refused(answer, 400) == "BAD_REQUEST"


BEARER = st.one_of(st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b),
                   st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")
                                             .replace(b"\r", b"").replace(b"\n", b"")))


@RAW
@given(token=BEARER)
def test_garbage_admin_bearer_tokens(gateway: GatewayProcess, token: bytes):
    """Bytes that are not UTF-8 in the admin bearer token were a 500 (the comparison
    encoded the header text strictly)."""
    answer = send(gateway, request_bytes("GET", f"/admin/sales/{SALE}", [("Authorization", b"Bearer " + token)]))
    refused(answer, 400, 401)


SUBJECTS = st.one_of(USER_IDS, st.integers(min_value=-(2**70), max_value=2**70), st.none(),
                     st.lists(st.integers(), max_size=2), st.floats(allow_nan=False))


@RAW
@given(sub=SUBJECTS, garbage=BEARER)
def test_jwt_subjects_and_garbage_bearer_tokens(jwt_gateway: GatewayProcess, sub, garbage: bytes):
    """SECKILL_AUTH=jwt: the ``sub`` of a validly signed token is the user only when it is
    a plain decimal id below 2^63; anything else, and any garbage token, is a 401."""
    signed = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    answer = send(jwt_gateway, request_bytes("GET", "/api/token", [("Authorization", f"Bearer {signed}")]))
    if isinstance(sub, str) and _valid_user_id(sub):
        assert (answer.status, answer.code) == (200, "OK"), answer
    else:
        assert refused(answer, 401) == "UNAUTHENTICATED"
    answer = send(jwt_gateway, request_bytes("GET", "/api/token", [("Authorization", b"Bearer " + garbage)]))
    refused(answer, 400, 401)


PATHS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@RAW
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW", "M-SEARCH"]),
       path=st.one_of(PATHS, st.sampled_from(["api/token", "api/seckill/", "api/seckill/a/b", "admin/sales/",
                                              "admin/sales/a/b", "api/orders/", "healthz/", "..", "%2e%2e/"])))
def test_any_method_on_any_path(gateway: GatewayProcess, method: str, path: str):
    target = "/" + quote(path, safe="/%")
    answer = send(gateway, request_bytes(method, target, [("X-User-Id", "1")]))
    assert answer.status < 500, answer
    if method != "HEAD" and target not in ("/metrics", "/openapi.json") and answer.status != 204:
        answer.json()
