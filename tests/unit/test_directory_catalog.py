"""The watcher following Consul with a fake health client: several services, the mask,
errors, backoff, index resets (the real agent is in tests/integration)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from directory.catalog import (
    CatalogWatcher,
    ConsulError,
    ConsulHealthClient,
    RawResponse,
    layout_filter,
)
from directory.index import AnswerIndex, parse_service_list
from directory.metrics import DirectoryMetrics


def entry(
    atsign: Any,
    token: Any,
    port: int = 7000,
    *,
    sid: str | None = None,
    address: str = "10.0.0.1",
    status: str = "passing",
    node: str = "n1",
    modify_index: int = 5,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"atsign": atsign}
    if token is not None:
        meta["fencing_token"] = token
    return {
        "Node": {"Node": node, "Address": "10.9.9.9"},
        "Service": {
            "ID": sid or f"atserver-{atsign}-{token}",
            "Address": address,
            "Port": port,
            "Meta": meta,
            "ModifyIndex": modify_index,
        },
        "Checks": [{"Status": "passing"}, {"Status": status}],
    }


def answers(entries: list[Any]) -> dict[str, bytes]:
    index = AnswerIndex()
    index.apply_list(parse_service_list("atserver", 1, entries))
    return index.answers


def raw(index: int, docs: list[Any]) -> RawResponse:
    return RawResponse(index, json.dumps(docs, separators=(",", ":")).encode())


def test_highest_token_wins_numerically() -> None:
    a = answers([entry("@alice", "999", 1), entry("@Alice", "1000", 2), entry("@bob", "5", 3)])
    assert a == {"alice": b"10.0.0.1:2\r\n@", "bob": b"10.0.0.1:3\r\n@"}


def test_equal_tokens_resolve_the_same_way_in_any_order() -> None:
    a, b = entry("@x", "7", 1, sid="s-a"), entry("@x", "7", 2, sid="s-b")
    assert answers([a, b])["x"] == answers([b, a])["x"] == b"10.0.0.1:1\r\n@"


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
    lst = parse_service_list("atserver", 1, [bad, entry("@ok", "1")])
    assert list(lst.rejected.values()) == [reason]
    index = AnswerIndex()
    index.apply_list(lst)
    assert index.answers.keys() == {"ok"}
    assert index.rejected[reason] == 1


def test_node_address_is_used_when_the_service_has_none() -> None:
    assert answers([entry("@a", "1", 9, address="")]) == {"a": b"10.9.9.9:9\r\n@"}


def test_filters_name_the_followed_services_and_node_checks() -> None:
    assert layout_filter("atserver", [0, 2]) == (
        'ServiceID == "" or ServiceName matches "^(atserver|atserver-[0-9a-f]{2})$"'
    )


class FakeHealth(ConsulHealthClient):
    """Replays scripted answers per service (RawResponse or ConsulError); records indexes."""

    def __init__(
        self,
        script: dict[str, list[RawResponse | ConsulError]],
        failing: list[RawResponse | ConsulError] | None = None,
    ) -> None:
        super().__init__("http://127.0.0.1:1")
        self.script = script
        self.failing_script = failing or [raw(1, [])]
        self.warning_script: list[RawResponse] = [raw(1, [])]
        self.asked: dict[str, list[int]] = {name: [] for name in script}
        self.done = asyncio.Event()

    async def checks_in_state(self, state: str, index: int, wait: float) -> RawResponse:
        steps = self.failing_script if state == "critical" else self.warning_script
        if not steps:
            await asyncio.sleep(3600)
        step = steps.pop(0)
        if isinstance(step, ConsulError):
            raise step
        return step

    async def service_health(self, service: str, index: int, wait: float) -> RawResponse:
        self.asked[service].append(index)
        steps = self.script[service]
        if not steps:
            if all(not s for s in self.script.values()):
                self.done.set()
            await asyncio.sleep(3600)
        step = steps.pop(0)
        if isinstance(step, ConsulError):
            raise step
        return step


async def run_until_done(watcher: CatalogWatcher, fake: FakeHealth) -> None:
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(fake.done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watcher_keeps_last_map_on_errors_and_resyncs_in_full() -> None:
    clock = [100.0]
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth(
        {
            "atserver": [
                raw(10, [entry("@alice", "1", 1)]),
                ConsulError("connection refused"),
                ConsulError("connection refused"),
                raw(3, [entry("@alice", "2", 2)]),  # restarted agent: index went back
                raw(4, [entry("@alice", "2", 2)]),
            ]
        }
    )
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        clock[0] += delay

    watcher = CatalogWatcher(
        fake, metrics, backoff_initial=0.2, backoff_max=5.0, clock=lambda: clock[0], sleep=sleep
    )
    await run_until_done(watcher, fake)
    # After each error the next query is a full (index 0) one; the map survived the errors.
    assert fake.asked["atserver"] == [0, 10, 0, 0, 3, 4]
    assert watcher.lookup("alice") == b"10.0.0.1:2\r\n@"
    assert len(sleeps) == 2 and 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4
    assert metrics.consul_errors._value.get() == 2
    assert metrics.consul_up._value.get() == 1


async def test_map_age_is_zero_while_up_and_grows_while_a_query_fails() -> None:
    clock = [0.0]
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth({"atserver": [raw(5, [entry("@a", "1")])]})
    watcher = CatalogWatcher(fake, metrics, clock=lambda: clock[0])
    assert watcher.map_age() == -1.0 and not watcher.synced
    await watcher.sync_once()
    assert watcher.synced and watcher.map_age() == 0.0
    follow = watcher._lists["atserver"]
    watcher._set_up(follow, False)
    clock[0] = 42.0
    assert watcher.map_age() == 42.0


async def test_several_services_are_merged_and_synced_only_when_all_answered() -> None:
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth(
        {
            "atserver": [raw(7, [entry("@alice", "5", 1, sid="atserver-alice")])],
            "atserver-3": [
                raw(9, [entry("@alice", "6", 2, sid="atserver-3-alice")]),
                raw(12, []),  # the shard copy went away: the legacy one is answered again
            ],
        }
    )
    watcher = CatalogWatcher(fake, metrics, services=["atserver", "atserver-3"])
    await watcher.sync_once("atserver")
    assert not watcher.synced and metrics.services_unsynced._value.get() == 1
    await watcher.sync_once("atserver-3")
    assert watcher.synced and metrics.services_followed._value.get() == 2
    assert watcher.lookup("alice") == b"10.0.0.1:2\r\n@"
    assert metrics.instances_shadowed._value.get() == 1
    await watcher.sync_once("atserver-3")
    assert watcher.lookup("alice") == b"10.0.0.1:1\r\n@"
    assert metrics.instance_changes._value.get() == 3


async def test_an_unchanged_list_is_not_applied_but_changed_bytes_at_the_same_index_are() -> None:
    """Consul 1.8.7 does not bump a service's index when an instance is renamed away from
    it in place; the same index with other bytes is applied anyway."""
    metrics = DirectoryMetrics(CollectorRegistry())
    same = raw(7, [entry("@alice", "5", 1)])
    fake = FakeHealth({"atserver": [same, raw(7, [entry("@alice", "5", 1)]), raw(7, [])]})
    watcher = CatalogWatcher(fake, metrics)
    for _ in range(3):
        await watcher.sync_once()
    assert metrics.consul_syncs._value.get() == 2
    assert watcher.lookup("alice") is None


def check(node: str, service_id: str, status: str = "critical") -> dict[str, Any]:
    return {"Node": node, "CheckID": f"c-{service_id}", "ServiceID": service_id, "Status": status}


async def test_watcher_masks_a_failing_instance_until_the_list_drops_it() -> None:
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth(
        {"atserver": [raw(10, [entry("@alice", "1", 1, sid="s1")])]},
        failing=[raw(11, [check("n1", "s1")]), raw(12, [])],
    )
    watcher = CatalogWatcher(fake, metrics)
    await watcher.sync_once()
    assert watcher.lookup("alice") == b"10.0.0.1:1\r\n@"
    await watcher.sync_failing_once()
    assert watcher.lookup("alice") is None
    assert metrics.instances_masked._value.get() == 1
    await watcher.sync_failing_once()
    assert watcher.lookup("alice") == b"10.0.0.1:1\r\n@"
    assert metrics.instances_masked._value.get() == 0


async def test_a_failing_node_check_masks_every_instance_of_that_node_in_every_service() -> None:
    """The supervisor's node check ``atfailover-supervisor`` (no ServiceID) failing takes
    every atSign on that Consul node out at once, whatever its shard; other nodes stay."""
    metrics = DirectoryMetrics(CollectorRegistry())
    node_check = {"Node": "n1", "CheckID": "atfailover-supervisor", "ServiceID": "",
                  "Status": "critical"}  # fmt: skip
    a = entry("@a", "1", 1, sid="atserver-0-a", node="n1")
    b = entry("@b", "1", 2, sid="atserver-0-b", node="n2")
    c = entry("@c", "1", 3, sid="atserver-1-c", node="n1")
    fake = FakeHealth(
        {"atserver-0": [raw(5, [a, b])], "atserver-1": [raw(6, [c])]},
        failing=[raw(11, [node_check]), raw(12, [])],
    )
    watcher = CatalogWatcher(fake, metrics, services=["atserver-0", "atserver-1"])
    await watcher.sync_once("atserver-0")
    await watcher.sync_once("atserver-1")
    await watcher.sync_failing_once()
    assert [watcher.lookup(k) for k in "abc"] == [None, b"10.0.0.1:2\r\n@", None]
    assert metrics.instances_masked._value.get() == 2
    await watcher.sync_failing_once()
    assert watcher.lookup("a") == b"10.0.0.1:1\r\n@" and watcher.lookup("c") is not None


async def test_a_list_that_is_not_json_is_a_consul_error() -> None:
    metrics = DirectoryMetrics(CollectorRegistry())
    fake = FakeHealth({"atserver": [RawResponse(3, b"<html>")]})
    watcher = CatalogWatcher(fake, metrics)
    with pytest.raises(ConsulError, match="service atserver: response is not JSON"):
        await watcher.sync_once()


async def test_a_huge_failing_checks_answer_is_followed_by_a_pause() -> None:
    """Thousands of failing checks (a site down) are re-sent whole on every change: the next
    poll of that query waits a second instead of following every change."""
    metrics = DirectoryMetrics(CollectorRegistry())
    many = [check(f"n{i}", f"s{i}") for i in range(20_000)]
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    fake = FakeHealth(
        {"atserver": [raw(10, [entry("@alice", "1", 1, sid="s1", node="n1")])]},
        failing=[raw(11, many), raw(12, [])],
    )
    watcher = CatalogWatcher(fake, metrics, sleep=sleep)
    await watcher.sync_once()
    await watcher.sync_failing_once()
    assert watcher.lookup("alice") is None and sleeps == [1.0]
    await watcher.sync_failing_once()
    assert watcher.lookup("alice") is not None and sleeps == [1.0]
