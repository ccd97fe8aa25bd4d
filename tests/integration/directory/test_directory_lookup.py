"""atsdk's real root connection against ``atdirectory serve`` fed by a real Consul agent."""

from __future__ import annotations

import time
from typing import Any

from tests.integration.directory.conftest import Registrar, atsign_base

FRESHNESS = 1.0  # seconds: the bound for a check flip to show in answers


def wait_for_answer(root: Any, atsign: str, expected: str | None, within: float) -> float:
    """Poll through the same connection until the answer is ``expected``; seconds taken."""
    start = time.monotonic()
    answer: str | None = "unset"
    while time.monotonic() - start < within:
        answer = root.find(atsign)
        if answer == expected:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{atsign}: still {answer!r}, wanted {expected!r} after {within}s")


def test_atsdk_resolves_registered_atsigns(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    base = atsign_base(key_prefix)
    registrar.register(f"@{base}a", 7001, 5)
    registrar.register(f"@{base}b", 7002, 9, host="localhost")
    directory = start_directory()
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}a", "127.0.0.1:7001", 5)
    assert root.find(f"@{base}b") == "localhost:7002"
    assert root.find(f"@{base.upper()}A") == "127.0.0.1:7001"  # any case
    assert root.find(f"@{base}unknown") is None
    # Misses never cost the connection: it keeps answering.
    for _ in range(20):
        assert root.find(f"@{base}nobody") is None
    assert root.find(f"{base}a") == "127.0.0.1:7001"
    m = directory.metrics()
    assert m["atdirectory_hits_total"] >= 3
    assert m["atdirectory_misses_total"] >= 21
    assert m["atdirectory_consul_up"] == 1


def test_failing_check_answers_null_and_new_instance_appears(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    base = atsign_base(key_prefix)
    sid = registrar.register(f"@{base}", 7100, 3)
    directory = start_directory()
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7100", 5)

    registrar.set_passing(sid, False)
    wait_for_answer(root, f"@{base}", None, FRESHNESS)

    # Failover: a new owner with a higher token on another node turns up passing.
    registrar.register(f"@{base}", 7200, 4, node="n2")
    wait_for_answer(root, f"@{base}", "127.0.0.1:7200", FRESHNESS)

    # A brand-new atSign appears too.
    registrar.register(f"@{base}new", 7300, 1)
    wait_for_answer(root, f"@{base}new", "127.0.0.1:7300", FRESHNESS)


def test_highest_fencing_token_wins(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    base = atsign_base(key_prefix)
    registrar.register(f"@{base}", 7401, 811, node="a1")
    high = registrar.register(f"@{base}", 7402, 812, node="b1")
    # Numeric, not lexical, order: "1000" > "999".
    registrar.register(f"@{base}n", 7403, 999, node="a1")
    registrar.register(f"@{base}n", 7404, 1000, node="b1")
    # A critical instance with an even higher token is not answered.
    registrar.register(f"@{base}", 7405, 900, node="c1", passing=False)
    directory = start_directory()
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7402", 5)
    assert root.find(f"@{base}n") == "127.0.0.1:7404"
    # The higher-token owner stops passing: the other one is answered.
    registrar.set_passing(high, False)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7401", FRESHNESS)
    assert directory.metrics()["atdirectory_instances_shadowed"] >= 1


def test_invalid_meta_is_ignored_and_counted(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    base = atsign_base(key_prefix)
    registrar.register(f"@{base}", 7501, 1)
    registrar.register(f"@{base}", 7502, "12x", node="bad1")
    registrar.register(f"@{base}", 7503, None, node="bad2")
    registrar.register(f"@{base}z", 7504, 2, meta={"fencing_token": "7"})
    directory = start_directory()
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7501", 5)
    assert root.find(f"@{base}z") is None
    m = directory.metrics()
    assert m["atdirectory_instances_rejected{reason=invalid_fencing_token}"] >= 1
    assert m["atdirectory_instances_rejected{reason=missing_fencing_token}"] >= 1
    assert m["atdirectory_instances_rejected{reason=missing_atsign}"] >= 1
    log = directory.log_tail()
    assert "instance_ignored" in log and "invalid_fencing_token" in log


def test_failing_check_answers_null_within_a_second_with_10000_registered(
    registrar: Registrar, start_directory: Any, atsdk_root: Any, key_prefix: str
) -> None:
    """With 10,000 instances Consul re-sends ~16 MB of passing instances on every change
    (a second or more to render and parse); the failing-checks query still turns a
    critical check into ``null`` within a second."""
    base = atsign_base(key_prefix)
    expected = registrar.register_bulk(base, 10_000, nodes=20)
    sid = registrar.register(f"@{base}", 7150, 1)
    directory = start_directory()
    root = atsdk_root(directory.port)
    wait_for_answer(root, f"@{base}", "127.0.0.1:7150", 10)
    some = f"@{base}b9999"
    assert root.find(some) == expected[some]
    for _ in range(3):
        registrar.set_passing(sid, False)
        wait_for_answer(root, f"@{base}", None, FRESHNESS)
        registrar.set_passing(sid, True)
        wait_for_answer(root, f"@{base}", "127.0.0.1:7150", 10)
    assert directory.metrics()["atdirectory_map_atsigns"] >= 10_001
