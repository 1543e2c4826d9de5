"""The gateway's times: epoch ms inside, RFC 3339 outside, exact both ways."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission.tokens import TokenIssuer, uuid4_hex
from gateway.clock import parse_rfc3339, sale_time_text, to_rfc3339

MS = st.integers(min_value=0, max_value=253402300799999)  # up to 9999-12-31T23:59:59.999Z


@given(MS)
def test_a_time_written_and_read_back_is_the_same_millisecond(ms: int) -> None:
    text = to_rfc3339(ms)
    assert parse_rfc3339(text) == ms
    assert sale_time_text(ms) == text


@given(MS)
def test_the_text_is_what_datetime_writes(ms: int) -> None:
    expected = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    expected += f".{ms % 1000:03d}Z" if ms % 1000 else "Z"
    assert to_rfc3339(ms) == expected


def test_the_millisecond_a_float_lost_is_kept() -> None:
    # int(datetime.timestamp() * 1000) gave 2180746006455 for this text.
    assert parse_rfc3339("2039-02-08T02:46:46.456Z") == 2180746006456
    assert parse_rfc3339("2026-12-01T13:00:00+01:00") == parse_rfc3339("2026-12-01T12:00:00Z")
    assert parse_rfc3339("2026-12-01T12:00:00.9999Z") == parse_rfc3339("2026-12-01T12:00:00.999Z")


@pytest.mark.parametrize("text", ["2026-12-01", "2026-12-01T12:00:00", "tomorrow", "2026-12-01 12:00:00Z"])
def test_times_without_a_zone_or_a_clock_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_token_nonces_are_version_4_uuids() -> None:
    for _ in range(1000):
        nonce = uuid.UUID(hex=uuid4_hex())
        assert nonce.version == 4 and nonce.variant == uuid.RFC_4122
    issuer = TokenIssuer(b"secret", 300)
    token = issuer.issue(7)
    assert issuer.verify(token, 7) and not issuer.verify(token, 8)
    assert not TokenIssuer(b"other", 300).verify(token, 7)
    # The keyed HMAC is copied, never updated in place: two tokens check independently.
    second = issuer.issue(7)
    assert issuer.verify(second, 7) and issuer.verify(token, 7)
