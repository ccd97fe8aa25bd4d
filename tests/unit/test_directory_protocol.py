"""The root-dialect line protocol: parsing lines and forming replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from directory.protocol import (
    AtSignError,
    Exit,
    Invalid,
    Lookup,
    answer_for,
    atsign_key,
    parse_line,
)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b"alice\n", "alice"),
        (b"@alice\r\n", "alice"),
        (b"@Alice", "alice"),
        (b"  BOB \n", "bob"),
        ("@emoji\U0001f600\n".encode(), "emoji\U0001f600"),
    ],
)
def test_lookup_lines(line: bytes, key: str) -> None:
    assert parse_line(line) == Lookup(key)


@pytest.mark.parametrize("line", [b"@exit\n", b"@EXIT\r\n", b" @exit "])
def test_exit(line: bytes) -> None:
    assert parse_line(line) == Exit()


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"\n", "empty atSign"),
        (b"@\n", "empty atSign"),
        (b"a b\n", "U+0020"),
        (b"a@b\n", "'@' inside"),
        (b"\xff\n", "not UTF-8 (byte 0)"),
        (b"x" * 56 + b"\n", "longer than 55"),
        (b"a\x00b", "U+0000"),
    ],
)
def test_invalid_lines_say_why(line: bytes, why: str) -> None:
    request = parse_line(line)
    assert isinstance(request, Invalid)
    assert why in request.reason


def test_answer_is_one_write_with_prompt() -> None:
    assert answer_for("host.example", 6464) == b"host.example:6464\r\n@"


def test_atsign_key_errors() -> None:
    with pytest.raises(AtSignError, match="empty"):
        atsign_key("  ")


@given(st.binary(max_size=200))
def test_any_bytes_parse_to_a_request(line: bytes) -> None:
    request = parse_line(line)
    assert isinstance(request, Lookup | Exit | Invalid)
    if isinstance(request, Lookup):
        assert request.key == request.key.lower() and "@" not in request.key
