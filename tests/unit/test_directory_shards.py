"""The registration layout shared by the directory and the supervisor."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from directory.shards import (
    Registration,
    check_shards,
    dns_name,
    followed_services,
    layout_of,
    normalize_layouts,
    registrations,
    service_id,
    shard_index,
    shard_name,
    shard_service,
    shard_services,
    shard_width,
)


def test_known_shards_stay_put() -> None:
    """These values are a contract with every registered instance: never change them."""
    assert shard_service("atserver", "@alice", 256) == "atserver-4d"
    assert shard_service("atserver", "alice", 4096) == "atserver-4de"
    assert shard_service("atserver", "@Alice", 16) == "atserver-4"
    assert shard_service("atserver", "@alice", 1) == "atserver"
    assert (
        shard_service("atserver", "@bob", 256)
        == "atserver-" + (hashlib.blake2b(b"bob", digest_size=8).hexdigest()[:2])
    )


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=40))
def test_the_shard_is_a_prefix_of_the_digest_and_ignores_case_and_at(name: str) -> None:
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    for k in (1, 2, 3):
        assert shard_service("atserver", "@" + name.upper(), 16**k) == f"atserver-{digest[:k]}"
    assert shard_index(name, 2) == int(digest[0], 16) >> 3
    assert shard_service("a", name, 32) == f"a-{int(digest[:2], 16) >> 3:02x}"


def test_names_widths_and_the_legacy_layout() -> None:
    assert shard_services("atserver", 1) == ["atserver"]
    assert shard_services("atserver", 16)[-1] == "atserver-f"
    assert len(set(shard_services("atserver", 256))) == 256
    assert shard_services("atserver", 256)[:2] == ["atserver-00", "atserver-01"]
    assert [shard_width(n) for n in (1, 2, 16, 32, 256, 4096, 65536)] == [0, 1, 1, 2, 2, 3, 4]
    assert shard_name("x", 31, 32) == "x-1f"
    with pytest.raises(ValueError, match="out of range"):
        shard_name("x", 32, 32)


@pytest.mark.parametrize("bad", [0, 3, 100, 1 << 17, -2, True, "16"])
def test_bad_shard_counts_say_what_is_allowed(bad: object) -> None:
    with pytest.raises(ValueError, match="shards must be"):
        check_shards(bad)  # type: ignore[arg-type]


def test_layouts_must_not_share_names() -> None:
    assert normalize_layouts([1, 256, 1]) == (1, 256)
    with pytest.raises(ValueError, match="shard counts 8 and 16 both name"):
        normalize_layouts([8, 16])
    with pytest.raises(ValueError, match="at least one"):
        normalize_layouts([])


def test_spread_is_even() -> None:
    counts = Counter(shard_index(f"user{i}", 256) for i in range(100_000))
    assert len(counts) == 256
    assert min(counts.values()) > 300 and max(counts.values()) < 500  # mean 390.6


def test_registrations_during_a_migration() -> None:
    assert registrations("@Alice", "atserver", [1, 256]) == [
        Registration("atserver", "atserver-alice", "alice", 1),
        Registration("atserver-4d", "atserver-4d-alice", "alice", 256),
    ]
    assert service_id("atserver-4d", "@alice") == "atserver-4d-alice"
    assert dns_name("atserver-4d", "@Alice") == "alice.atserver-4d.service.consul"


def test_followed_services_and_layout_of() -> None:
    names = followed_services("atserver", [1, 16])
    assert names[0] == "atserver" and len(names) == 17
    assert layout_of("atserver", "atserver", [1, 16]) == 1
    assert layout_of("atserver", "atserver-a", [1, 16]) == 16
    assert layout_of("atserver", "atserver-a", [1]) is None
    assert layout_of("atserver", "atserver-1f", [1, 16, 32]) == 32
    assert layout_of("atserver", "atserver-2f", [32]) is None
    assert layout_of("atserver", "atserver-zz", [256]) is None
    assert layout_of("atserver", "other-00", [256]) is None


def test_shard_command_prints_every_layout() -> None:
    from typer.testing import CliRunner

    from directory.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["shard", "@Alice"])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "shards=1 service=atserver id=atserver-alice tag=alice dns=alice.atserver.service.consul",
        "shards=256 service=atserver-4d id=atserver-4d-alice tag=alice "
        "dns=alice.atserver-4d.service.consul",
    ]
    assert runner.invoke(app, ["shard", "@alice", "--shards", "8,16"]).exit_code == 2
    assert runner.invoke(app, ["shard", "@alice", "--shards", "x"]).exit_code == 2
    assert runner.invoke(app, ["shard", "a b"]).exit_code == 2
