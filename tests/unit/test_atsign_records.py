"""AtSign records (leases.records), the inventory and membership feeds, and a node whose
inventory is the DCS records (``inventory.source: dcs``), on in-memory fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from leases.base import ClaimEventKind
from leases.records import (
    AtSignRecord,
    RecordEvent,
    RecordProblem,
    decode_record,
    diff_records,
    make_record,
    unknown_nodes,
)
from supervisor.atsigns_cli import parse_inventory_file
from supervisor.config import ConfigError, load_config
from supervisor.inventory_feed import InventoryFeed, MembershipFeed
from supervisor.placement import AtSignPolicy, NodeRef
from tests.unit.daemon_harness import Harness, make_harness


def test_a_record_is_validated_and_keeps_fields_it_does_not_know() -> None:
    r = make_record("Alice", {"prefer_nodes": ["a1", "b1"], "prefer_clouds": "A", "tier": 2})
    assert r == AtSignRecord("@alice", ("a1", "b1"), ("A",), False, {"tier": 2})
    again = decode_record("@alice", r.encode())
    assert again.same_as(r)
    assert again.extra == {"tier": 2}


@pytest.mark.parametrize(
    ("atsign", "data", "says"),
    [
        ("@..", {}, "atsign: not a valid atSign"),
        ("@a/b", {}, "reserved character '/'"),
        ("@alice", {"prefer_nodes": ["a1", "a1"]}, "prefer_nodes: a1 is listed twice"),
        ("@alice", {"prefer_nodes": ["../x"]}, "prefer_nodes: '../x' is not a node"),
        ("@alice", {"prefer_clouds": 3}, "prefer_clouds: expected a list"),
        ("@alice", {"disabled": "yes"}, "disabled: expected true or false"),
    ],
)
def test_a_bad_record_names_its_field(atsign: str, data: dict[str, object], says: str) -> None:
    with pytest.raises(RecordProblem, match=r"^where: ") as info:
        make_record(atsign, data, "where")
    assert says in str(info.value)


def test_a_stored_value_that_is_not_json_is_a_problem() -> None:
    with pytest.raises(RecordProblem, match="not JSON"):
        decode_record("@alice", b"{nope")


def test_diff_says_what_a_write_would_change() -> None:
    current = {"@a": make_record("@a", {}), "@b": make_record("@b", {"prefer_clouds": ["A"]})}
    wanted = [make_record("@a", {}), make_record("@b", {}), make_record("@c", {})]
    d = diff_records(current, wanted)
    assert [r.atsign for r in d.added] == ["@c"]
    assert [r.atsign for r in d.updated] == ["@b"]
    assert d.removed == () and d.unchanged == 1
    pruned = diff_records({**current, "@z": make_record("@z", {})}, wanted, remove_missing=True)
    assert pruned.removed == ("@z",)
    assert diff_records(current, list(current.values())).empty


def test_unknown_nodes_are_named() -> None:
    recs = [make_record("@a", {"prefer_nodes": ["a1", "z9"]})]
    assert unknown_nodes(recs, {"a1", "b1"}) == ["@a: prefer_nodes: unknown node(s) ['z9']"]
    assert unknown_nodes(recs, set()) == ["@a: prefer_nodes: unknown node(s) ['a1', 'z9']"]
    assert unknown_nodes([make_record("@b", {})], set()) == []


def test_an_inventory_file_with_bad_entries_names_each(tmp_path: Path) -> None:
    f = tmp_path / "inventory.yaml"
    f.write_text(
        "nodes: [{name: a1, cloud: A}]\n"
        "atsigns:\n"
        "  - atsign: '@alice'\n"
        "  - atsign: '@..'\n"
        "  - atsign: Alice\n"
        "  - {atsign: '@bob', disabled: maybe}\n"
        "  - just a string\n"
    )
    records, nodes, problems = parse_inventory_file(f)
    assert nodes == {"a1"}
    assert [r.atsign for r in records] == ["@alice"]
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{f}: atsigns.1: atsign: not a valid atSign")
    assert "atsigns.2: @alice is listed twice (also atsigns.0)" in problems[1]
    assert "atsigns.3: @bob: disabled" in problems[2]
    assert "atsigns.4: expected a mapping" in problems[3]
    (tmp_path / "bad.yaml").write_text("atsigns: [\n")
    _, _, problems = parse_inventory_file(tmp_path / "bad.yaml")
    assert problems and "not valid YAML" in problems[0]


def test_the_inventory_feed_applies_only_what_changed() -> None:
    inventory: dict[str, AtSignPolicy] = {}
    marked: list[list[str]] = []
    feed = InventoryFeed(None, inventory, marked.append)  # type: ignore[arg-type]
    a, b = make_record("@a", {}), make_record("@b", {"prefer_nodes": ["a1"]})
    snap = {"@a": a, "@b": b}
    assert feed.apply(RecordEvent(ClaimEventKind.RESYNC, snapshot=snap)) == ["@a", "@b"]
    assert feed.synced and inventory["@b"] == AtSignPolicy("@b", ("a1",), ())
    # The same list again changes nothing; a disabled record leaves the inventory.
    assert feed.apply(RecordEvent(ClaimEventKind.RESYNC, snapshot=snap)) == []
    off = make_record("@a", {"disabled": True})
    assert feed.apply(RecordEvent(ClaimEventKind.PUT, atsign="@a", record=off)) == ["@a"]
    assert "@a" not in inventory and feed.records["@a"].disabled
    # A value that is not a record counts as absent; a delete removes.
    assert feed.apply(RecordEvent(ClaimEventKind.PUT, atsign="@b", problem="bad")) == ["@b"]
    assert inventory == {}
    assert feed.apply(RecordEvent(ClaimEventKind.DELETE, atsign="@b")) == []


def test_membership_is_the_live_records_and_this_node() -> None:
    me = NodeRef("a1", "A")
    nodes = [me]
    feed = MembershipFeed(None, nodes, me, lambda n: None, interval=1, timeout=1)  # type: ignore[arg-type]
    assert feed.apply({"b1": {"cloud": "B"}, "c1": {"cloud": "C"}, "x": {}})
    assert nodes == [NodeRef("a1", "A"), NodeRef("b1", "B"), NodeRef("c1", "C")]
    assert not feed.apply({"b1": {"cloud": "B"}, "c1": {"cloud": "C"}})
    assert feed.apply({})  # everyone else's session ended; this node stays
    assert nodes == [me]


def test_a_dcs_inventory_config_lists_no_atsigns(tmp_path: Path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text(
        "node: {name: a1, cloud: A, address: 127.0.0.1}\n"
        "dcs: {backend: etcd, etcd: {endpoints: ['127.0.0.1:2379']}}\n"
        "timing: {ttl: 6}\n"
        "consul: {url: 'http://127.0.0.1:8500'}\n"
        f"runner: {{kind: process, data_root: {tmp_path}/d, state_dir: {tmp_path}/s}}\n"
        "inventory: {source: dcs, atsigns: [{atsign: '@alice'}]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(f, env={})
    (problem,) = [p for p in info.value.problems if p.field.startswith("inventory")]
    assert "remove inventory.atsigns" in problem.problem


async def _dcs_harness(tmp_path: Path) -> Harness:
    return await make_harness(tmp_path, [], inventory={"source": "dcs", "nodes": [], "atsigns": []})


async def _records(h: Harness, *records: AtSignRecord) -> None:
    """What the records watch would deliver after a write."""
    feed = h.sup.inventory_feed
    assert feed is not None and h.sup.members is not None
    h.sup.members.listed = True  # what its first read of the node records does
    snap = {r.atsign: r for r in records}
    h.sup._inventory_changed(feed.apply(RecordEvent(ClaimEventKind.RESYNC, snapshot=snap)))


async def test_a_node_holds_until_the_records_are_listed(tmp_path: Path) -> None:
    h = await _dcs_harness(tmp_path)
    sentence = await h.cycle()
    assert sentence.startswith("inventory not listed yet"), sentence
    await h.sup.reconciler.cycle_logged(None)
    assert not h.sup.reconciler.ready
    await _records(h, make_record("@alice", {}))
    sentence = await h.cycle()
    assert "claimed @alice" in sentence, sentence
    await h.sup.reconciler.cycle_logged(None)
    assert h.sup.reconciler.ready


async def test_a_removed_or_disabled_record_is_stopped_and_released_and_its_data_kept(
    tmp_path: Path,
) -> None:
    h = await _dcs_harness(tmp_path)
    await _records(h, make_record("@alice", {}), make_record("@bob", {}))
    await h.cycle()
    assert set(h.dcs.claims) == {"@alice", "@bob"}
    data = h.sup.cfg.runner.data_root / "alice"
    data.mkdir(parents=True, exist_ok=True)
    (data / "keys").write_text("kept")
    await _records(h, make_record("@bob", {"disabled": True}))
    sentence = await h.cycle()
    assert "stop and release @alice (not in the inventory)" in sentence, sentence
    assert "stop and release @bob" in sentence
    assert h.dcs.claims == {} and h.runner.workloads == {}
    assert h.sup.ctx.handoffs.in_flight == {}  # nobody will take them: no handoff pending
    assert (data / "keys").read_text() == "kept"
    # Nothing claims them again, and adding one back serves it at once.
    assert await h.cycle() == "nothing to do: holding 0 claim(s)"
    await _records(h, make_record("@bob", {}))
    assert "claimed @bob" in await h.cycle()


async def test_a_policy_change_asks_the_owner_for_a_failback_without_a_restart(
    tmp_path: Path,
) -> None:
    from supervisor import cycle

    h = await make_harness(
        tmp_path,
        [],
        inventory={"source": "dcs", "nodes": [], "atsigns": []},
        placement={"failback": "auto", "rank_delay": 0},
    )
    h.dcs.put("@alice", "other", "b1", api="http://127.0.0.1:1")
    await _records(h, make_record("@alice", {"prefer_clouds": ["B"]}))
    await h.sync()
    plan = cycle.decide(h.sup.reconciler.snapshot(None))
    assert not any(isinstance(a, cycle.RequestFailback) for a in plan.actions), plan
    await _records(h, make_record("@alice", {"prefer_nodes": ["a1"]}))
    plan = cycle.decide(h.sup.reconciler.snapshot({"@alice"}))
    assert [type(a) for a in plan.actions] == [cycle.RequestFailback], plan


async def test_the_first_read_of_the_members_wakes_the_cycles_even_if_it_changes_nothing() -> None:
    me = NodeRef("a1", "A")
    woken: list[list[NodeRef]] = []

    async def read() -> dict[str, dict[str, object]]:
        return {"a1": {"cloud": "A"}}

    feed = MembershipFeed(read, [me], me, woken.append, interval=1, timeout=1)
    assert await feed.refresh() and feed.listed and woken == [[me]]
    assert not await feed.refresh()  # nothing changed since
    assert woken == [[me]]
