"""Parsing of at-protocol request lines and the error format the atsdk expects (pure)."""

from __future__ import annotations

import pytest
from at_client.connections.response import Response
from hypothesis import given
from hypothesis import strategies as st

from atserver_runner.devserver import protocol as p


def test_update_with_metadata_and_value_with_spaces() -> None:
    cmd = p.parse_command("update:ttl:5000:isBinary:false:Note.Test@alice hello big world")
    assert cmd.verb == "update"
    assert cmd.arg == "note.test@alice"
    assert cmd.value == "hello big world"
    assert cmd.meta == {"ttl": 5000, "isBinary": False}


def test_update_public_key_without_metadata() -> None:
    cmd = p.parse_command("update:public:card.test@alice v")
    assert (cmd.arg, cmd.value, cmd.meta) == ("public:card.test@alice", "v", {})


@pytest.mark.parametrize(
    ("line", "verb", "arg", "detail"),
    [
        ("from:alice", "from", "@alice", ""),
        ("from:@Alice", "from", "@alice", ""),
        ("pkam:c2ln", "pkam", "c2ln", ""),
        ("llookup:meta:x.test@alice", "llookup", "x.test@alice", "meta"),
        ("llookup:all:x.test@alice", "llookup", "x.test@alice", "all"),
        ("lookup:x.test@alice", "lookup", "x.test@alice", ""),
        ("plookup:bypassCache:true:card@alice", "plookup", "card@alice", ""),
        ("delete:x.test@alice", "delete", "x.test@alice", ""),
        ("scan .*test", "scan", "", ".*test"),
        ("scan", "scan", "", ""),
        ("info:brief", "info", "", "brief"),
        ("noop:10", "noop", "10", ""),
        ("@exit", "exit", "", ""),
    ],
)
def test_known_verbs(line: str, verb: str, arg: str, detail: str) -> None:
    cmd = p.parse_command(line)
    assert (cmd.verb, cmd.arg, cmd.detail) == (verb, arg, detail)


def test_scan_options() -> None:
    cmd = p.parse_command("scan:showHidden:true:@alice public:.*")
    assert cmd.show_hidden and cmd.for_atsign == "@alice" and cmd.detail == "public:.*"


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        ("hello", p.INVALID_SYNTAX, "unknown verb"),
        ("update:x@alice", p.INVALID_SYNTAX, "needs a value"),
        ("update:ttl:abc:x@alice v", p.ILLEGAL_ARGUMENT, "ttl must be an integer"),
        ("update:ccd:maybe:x@alice v", p.ILLEGAL_ARGUMENT, "ccd must be true or false"),
        ("noop:6000", p.ILLEGAL_ARGUMENT, "5000 milliseconds"),
        ("llookup:", p.INVALID_SYNTAX, "missing key"),
        ("delete:" + "k" * 600, p.INVALID_ATKEY, "longer than 512"),
        ("from:not an atsign", p.INVALID_SYNTAX, "not an atSign"),
        ("scan:bogus", p.INVALID_SYNTAX, "unexpected scan option"),
        ("pkam:", p.INVALID_SYNTAX, "needs a digest"),
    ],
)
def test_malformed_lines_name_what_is_wrong(line: str, code: str, words: str) -> None:
    with pytest.raises(p.ProtocolError) as err:
        p.parse_command(line)
    assert err.value.code == code
    assert words in err.value.detail


def test_error_line_is_parsed_by_the_sdk() -> None:
    line = p.error_line(p.KEY_NOT_FOUND, "x.test@alice does not exist\nin keystore")
    assert "\n" not in line
    resp = Response().set_raw_error_response(line[len("error:") :])
    assert resp.get_error_code() == "AT0015"
    assert "does not exist in keystore" in resp.get_error_text()


def test_key_owner_and_scan_visibility() -> None:
    assert p.key_owner("public:card@alice") == "@alice"
    assert p.key_owner("privatekey:at_secret") is None
    assert p.visible_in_scan("public:card@alice", False, False) == "card@alice"
    assert p.visible_in_scan("note@alice", False, False) is None
    assert p.visible_in_scan("note@alice", False, True) == "note@alice"
    assert p.visible_in_scan("privatekey:at_pkam_publickey", True, True) is None
    assert p.visible_in_scan("public:__hidden@alice", True, True) == "public:__hidden@alice"
    assert p.visible_in_scan("public:__hidden@alice", False, True) is None


@given(st.text(max_size=300))
def test_any_line_parses_or_raises_a_protocol_error(line: str) -> None:
    try:
        cmd = p.parse_command(line)
    except p.ProtocolError as exc:
        assert exc.line().startswith(f"error:{exc.code}-")
        assert "\n" not in exc.line()
    else:
        assert cmd.verb in {
            "exit", "info", "from", "pkam", "cram", "noop", "update", "llookup", "lookup",
            "plookup", "delete", "scan",
        }  # fmt: skip
