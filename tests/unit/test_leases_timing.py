"""Timing rules, backend minimums, atSign/prefix/endpoint validation: clear errors, no server."""

from __future__ import annotations

import pytest

from leases import Timing, TimingError, normalize_atsign, open_backend
from leases.base import ClaimInfo
from leases.consul import ConsulBackend, session_check_problems
from leases.etcd import EtcdBackend, parse_endpoint
from leases.keys import KeyLayout, decode_info, encode_info


@pytest.mark.parametrize("ttl", [2.0, 3.0, 6.0, 10.0, 30.0, 600.0])
def test_for_ttl_is_valid_and_leaves_room_for_retries(ttl: float) -> None:
    t = Timing.for_ttl(ttl)
    assert t.renew_interval <= ttl / 3
    assert t.renew_deadline + t.stop_budget < ttl
    # At least two scheduled renewals, each with its timeout, fit before the deadline.
    assert 2 * t.renew_interval + t.request_timeout < t.renew_deadline


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": 6, "renew_interval": 3, "renew_deadline": 4}, "renew_interval .* at most ttl/3"),
        ({"ttl": 6, "renew_interval": 1, "renew_deadline": 5.5}, "must be less than ttl"),
        ({"ttl": 6, "renew_interval": 1, "renew_deadline": 0.5}, "greater than renew_interval"),
        (
            {"ttl": 6, "renew_interval": 1, "renew_deadline": 3, "request_timeout": 3},
            "request_timeout .* less than renew_deadline",
        ),
        ({"ttl": -1, "renew_interval": 1, "renew_deadline": 3}, "ttl must be a positive"),
        ({"ttl": float("nan"), "renew_interval": 1, "renew_deadline": 3}, "ttl must be"),
        ({"ttl": 6, "renew_interval": 0, "renew_deadline": 3}, "renew_interval must be"),
    ],
)
def test_timing_rules_name_the_field(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(TimingError, match=message):
        Timing(**kwargs)


def test_etcd_timing_minimum_and_whole_seconds() -> None:
    b = EtcdBackend(["127.0.0.1:2379"], "p")
    with pytest.raises(TimingError, match="below the EtcdBackend minimum of 2s"):
        b.validate_timing(
            Timing(
                ttl=1.5,
                renew_interval=0.4,
                renew_deadline=0.6,
                stop_budget=0.2,
                request_timeout=0.3,
            )
        )
    with pytest.raises(TimingError, match="whole seconds"):
        b.validate_timing(Timing.for_ttl(2.5))
    b.validate_timing(Timing.for_ttl(2))
    assert b.failover_bound(Timing.for_ttl(6)) == 6.5


def test_consul_timing_minimum_lock_delay_and_failover_bound() -> None:
    b = ConsulBackend("http://127.0.0.1:8500", "p")
    with pytest.raises(TimingError, match="below the ConsulBackend minimum of 10s"):
        b.validate_timing(Timing.for_ttl(9))
    b.validate_timing(Timing.for_ttl(10))
    assert b.lock_delay == 15.0
    assert b.failover_bound(Timing.for_ttl(10)) == 35.0
    assert (
        ConsulBackend("http://127.0.0.1:8500", "p", lock_delay=0).failover_bound(Timing.for_ttl(10))
        == 20.0
    )
    for bad in (-1, 61, float("inf")):
        with pytest.raises(ValueError, match="lock_delay must be between 0 and 60"):
            ConsulBackend("http://127.0.0.1:8500", "p", lock_delay=bad)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("etcd", {"endpoints": [], "prefix": "p"}, "at least one host:port"),
        ("etcd", {"endpoints": ["127.0.0.1"], "prefix": "p"}, "expected host:port"),
        ("etcd", {"endpoints": ["ftp://127.0.0.1:1"], "prefix": "p"}, "scheme must be http"),
        (
            "etcd",
            {"endpoints": ["http://127.0.0.1:1", "https://127.0.0.1:2"], "prefix": "p"},
            "mix of http",
        ),
        ("etcd", {"endpoints": ["127.0.0.1:1"], "prefix": "/"}, "prefix must not be empty"),
        ("etcd", {"endpoints": ["127.0.0.1:1"], "prefix": "p", "username": "u"}, "both username"),
        (
            "etcd",
            {"endpoints": ["127.0.0.1:1"], "prefix": "p", "ca_cert": "/nonexistent"},
            "ca_cert: cannot read /nonexistent",
        ),
        ("consul", {"url": "127.0.0.1:8500", "prefix": "p"}, "expected http"),
        ("consul", {"url": "http://127.0.0.1:99999", "prefix": "p"}, "invalid port"),
        (
            "consul",
            {"url": "http://127.0.0.1:8500", "prefix": "p", "ca_cert": "/nonexistent"},
            "ca_cert: /nonexistent",
        ),
        ("consul", {"url": "http://h:1", "prefix": "a b"}, "whitespace"),
    ],
)
def test_backend_options_are_checked(kind: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_backend(kind, **options)  # type: ignore[arg-type]


def test_unknown_backend_kind() -> None:
    with pytest.raises(ValueError, match="unknown DCS backend 'zk'"):
        open_backend("zk", prefix="p")  # type: ignore[arg-type]


def test_secrets_stay_out_of_repr() -> None:
    e = EtcdBackend(["127.0.0.1:2379"], "p", username="root", password="hunter2")
    c = ConsulBackend("http://127.0.0.1:8500", "p", token="s3cr3t-token")
    assert "hunter2" not in repr(e) and "s3cr3t" not in repr(c)


@pytest.mark.parametrize("name", ["alice", "@Alice", " @alice "])
def test_atsign_normalization(name: str) -> None:
    assert normalize_atsign(name) == "@alice"


@pytest.mark.parametrize(
    "name", ["@colin.constable", "@a_b-c", "@🦄", "@👨\u200d👩\u200d👧", "@" + "x" * 55, "@%~"]
)
def test_atsigns_the_atplatform_allows(name: str) -> None:
    assert normalize_atsign(name) == name


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "@",
        "@a/b",
        "@a\\b",
        "@..",
        "@.",
        "@...",
        "@a b",
        "@a\tb",
        "@a@b",
        "@a:b",
        "@a?b",
        "@a#b",
        "@a\x00b",
        "@a\u2028b",
        "@a\u202eb",
        "@" + "x" * 56,
    ],
)
def test_bad_atsigns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid atSign"):
        normalize_atsign(bad)


def test_key_layout_and_info_round_trip() -> None:
    layout = KeyLayout("/atfailover/")
    assert layout.claim_key("Alice") == "atfailover/claims/@alice"
    assert layout.atsign_of("atfailover/claims/@alice") == "@alice"
    assert layout.atsign_of("atfailover/other/@alice") is None
    info = ClaimInfo(node="a1", cloud="A", address="10.0.0.1", port=6464, extra={"k": "v"})
    assert decode_info(encode_info(info)) == info
    assert decode_info(b"{not json").extra["error"] == "claim value is not JSON"
    assert parse_endpoint("https://127.0.0.1:2379/") == ("127.0.0.1:2379", True)


def test_consul_session_checks_rules_and_failover_bound() -> None:
    t = Timing.for_ttl(10)  # renew 1.67 s, deadline 5 s, stop budget 2 s
    assert session_check_problems(t, 4, 8) == []
    problems = session_check_problems(t, 3, 6)
    assert any("at least 2 x renew_interval" in p for p in problems), problems
    assert any(
        "lock_delay (6s) must be above renew_deadline + stop_budget (7s)" in p for p in problems
    )
    b = ConsulBackend("http://127.0.0.1:8500", "p", lock_delay=8, session_check_ttl=4)
    b.validate_timing(t)
    # A dead supervisor: the check's 4 s; a dead node: the gossip's ~5 s; then the lock-delay.
    assert b.failover_bound(t) == 5 + 8
    with pytest.raises(TimingError, match="lock_delay"):
        ConsulBackend(
            "http://127.0.0.1:8500", "p", lock_delay=5, session_check_ttl=4
        ).validate_timing(t)
    with pytest.raises(ValueError, match="session_check_ttl must be at least 1 s"):
        ConsulBackend("http://127.0.0.1:8500", "p", session_check_ttl=0.5)
