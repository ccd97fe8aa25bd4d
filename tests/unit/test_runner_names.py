"""Names and timestamps the runners derive (pure)."""

from __future__ import annotations

import re

from atserver_runner.docker import _parse_docker_time, container_name
from atserver_runner.process import safe_name


def test_safe_names_are_docker_safe_and_distinct() -> None:
    assert safe_name("@alice") == "alice"
    odd = [safe_name(a) for a in ("@al/ice", "@al:ice", "@al ice", "@")]
    assert len(set(odd)) == len(odd)
    for name in [*odd, container_name("node a/1", "@bob🎉")]:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name


def test_container_name() -> None:
    assert container_name("a1", "@alice") == "atserver-a1-alice"


def test_docker_time_parsing() -> None:
    assert _parse_docker_time("") == 0.0
    assert _parse_docker_time("0001-01-01T00:00:00Z") == 0.0
    t = _parse_docker_time("2024-01-02T03:04:05.123456789Z")
    assert abs(t - 1704164645.123456789) < 1e-5
