"""Building the directory map from Consul health entries, and the watcher's behaviour
when Consul fails (a fake health client; the real agent is in tests/integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from directory.catalog import (
    CatalogWatcher,
    ConsulError,
    ConsulHealthClient,
    FailingChecks,
    HealthResponse,
    build_map,
    failing_from_checks,
    masked_answers,
)
from directory.metrics import DirectoryMetrics


def entry(
    atsign: Any,
    token: Any,
    port: int = 7000,
    *,
    sid: str | None = None,
    address: str = "10.0.0.1",
    status: str = "passing",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"atsign": atsign}
    if token is not None:
        meta["fencing_token"] = token
    return {
        "Node": {"Node": "n1", "Address": "10.9.9.9"},
        "Service": {
            "ID": sid or f"atserver-{atsign}-{token}",
            "Address": address,
            "Port": port,
            "Meta": meta,
        },
        "Checks": [{"Status": "passing"}, {"Status": status}],
    }


def test_highest_token_wins_numerically() -> None:
    m = build_map([entry("@alice", "999", 1), entry("@Alice", "1000", 2), entry("@bob", "5", 3)])
    assert m.answer("alice") == b"10.0.0.1:2\r\n@"
    assert m.answer("bob") == b"10.0.0.1:3\r\n@"
    assert m.answer("carol") is None
    assert m.shadowed == 1 and len(m) == 2


def test_equal_tokens_resolve_the_same_way_in_any_order() -> None:
    a, b = entry("@x", "7", 1, sid="s-a"), entry("@x", "7", 2, sid="s-b")
    assert build_map([a, b]).answer("x") == build_map([b, a]).answer("x") == b"10.0.0.1:1\r\n@"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (entry("alice", "1"), "atsign_without_at"),
        (entry(None, "1"), "missing_atsign"),
        (entry("@a b", "1"), "invalid_atsign"),
        (entry("@alice", None), "missing_fencing_token"),
        (entry("@alice", "-3"), "invalid_fencing_token"),
        (entry("@alice", 12), "missing_fencing_token"),
        (entry("@alice", "1", 0), "invalid_port"),
        (entry("@alice", "1", status="critical"), "check_not_passing"),
        ("not an object", "entry_not_an_object"),
    ],
)
def test_bad_entries_are_rejected_with_a_reason(bad: Any, reason: str) -> None:
    m = build_map([bad, entry("@ok", "1")])
    assert [r.reason for r in m.rejected] == [reason]
    assert m.answer("ok") is not None and m.answer("alice") is None


def test_node_address_is_used_when_the_service_has_none() -> None:
    assert build_map([entry("@a", "1", 9, address="")]).answer("a") == b"10.9.9.9:9\r\n@"


class FakeHealth(ConsulHealthClient):
    """Replays scripted answers (HealthResponse or ConsulError) and records indexes asked."""

    def __init__(
        self,
        script: list[HealthResponse | ConsulError],
        failing: list[HealthResponse | ConsulError] | None = None,
    ) -> None:
        super().__init__("http://127.0.0.1:1")
        self.script = script
        self.failing_script = failing or [HealthResponse(1, [])]
        self.asked: list[int] = []
        self.done = asyncio.Event()

    async def query_failing(self, index: int, wait: float) -> HealthResponse:
        if not self.failing_script:
            await asyncio.sleep(3600)
        step = self.failing_script.pop(0)
        if isinstance(step, ConsulError):
            raise step
        return step

    async def query(self, index: int, wait: float) -> HealthResponse:
        self.asked.append(index)
        if not self.script:
            self.done.set()
            await asyncio.sleep(3600)
        step = self.script.pop(0)
        if isinstance(step, ConsulError):
            raise step
        return step


async def test_watcher_keeps_last_map_on_errors_and_resyncs_in_full() -> None:
    clock = [100.0]
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth(
        [
            HealthResponse(10, [entry("@alice", "1", 1)]),
            ConsulError("connection refused"),
            ConsulError("connection refused"),
            HealthResponse(3, [entry("@alice", "2", 2)]),  # restarted agent: index went back
            HealthResponse(4, [entry("@alice", "2", 2)]),
        ]
    )
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        clock[0] += delay

    watcher = CatalogWatcher(
        fake, metrics, backoff_initial=0.2, backoff_max=5.0, clock=lambda: clock[0], sleep=sleep
    )
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(fake.done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # After each error the next query is a full (index 0) one; the map survived the errors.
    assert fake.asked == [0, 10, 0, 0, 3, 4]
    assert watcher.lookup("alice") == b"10.0.0.1:2\r\n@"
    assert len(sleeps) == 2 and 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4
    assert metrics.consul_errors._value.get() == 2
    assert metrics.consul_up._value.get() == 1


async def test_map_age_grows_while_consul_fails() -> None:
    clock = [0.0]
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth([HealthResponse(5, [entry("@a", "1")])])
    watcher = CatalogWatcher(fake, metrics, clock=lambda: clock[0])
    assert watcher.map_age() == -1.0 and not watcher.synced
    await watcher.sync_once()
    clock[0] = 42.0
    assert watcher.map_age() == 42.0 and watcher.synced


def check(node: str, service_id: str, status: str = "critical") -> dict[str, Any]:
    return {"Node": node, "CheckID": f"c-{service_id}", "ServiceID": service_id, "Status": status}


def test_failing_checks_mask_answers_and_the_next_token_takes_over() -> None:
    m = build_map(
        [
            entry("@alice", "9", 1, sid="a-new"),
            entry("@alice", "8", 2, sid="a-old"),
            entry("@bob", "5", 3, sid="b"),
            entry("@carol", "5", 4, sid="c"),
        ]
    )
    failing = failing_from_checks(
        [check("n1", "a-new"), check("n1", "b"), check("n1", "c", "passing"), "junk"]
    )
    answers = masked_answers(m, failing)
    assert answers["alice"] == b"10.0.0.1:2\r\n@"  # highest token still passing
    assert "bob" not in answers
    assert answers["carol"] == b"10.0.0.1:4\r\n@"
    # A failing check on another node with the same service ID masks nothing.
    assert masked_answers(m, failing_from_checks([check("other", "b")])) == m.answers
    # A node-level check (no ServiceID) masks every instance on the node.
    assert masked_answers(m, failing_from_checks([check("n1", "")])) == {}
    assert masked_answers(m, FailingChecks()) is m.answers


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans()), max_size=12),
)
def test_mask_only_ever_removes_or_falls_back_to_a_passing_instance(
    specs: list[tuple[int, int, bool]],
) -> None:
    entries = [
        entry(f"@u{who}", str(token), 100 + n, sid=f"s{n}")
        for n, (who, token, _) in enumerate(specs)
    ]
    failing = failing_from_checks([check("n1", f"s{n}") for n, s in enumerate(specs) if s[2]])
    m = build_map(entries)
    answers = masked_answers(m, failing)
    assert answers.keys() <= m.answers.keys()
    for key, answer in answers.items():
        port = int(answer.split(b":")[1].split(b"\r")[0])
        n = port - 100
        assert not specs[n][2], "a failing instance was answered"
        # It is the highest-token passing instance of that atSign.
        best = max(t for w, t, f in specs if f"u{w}" == key and not f)
        assert specs[n][1] == best


async def test_watcher_masks_a_failing_instance_until_the_full_map_drops_it() -> None:
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth(
        [HealthResponse(10, [entry("@alice", "1", 1, sid="s1")])],
        failing=[HealthResponse(11, [check("n1", "s1")])],
    )
    watcher = CatalogWatcher(fake, metrics)
    await watcher.sync_once()
    assert watcher.lookup("alice") == b"10.0.0.1:1\r\n@"
    await watcher.sync_failing_once()
    assert watcher.lookup("alice") is None
    assert metrics.instances_masked._value.get() == 1
