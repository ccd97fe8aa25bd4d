"""The pure decision of one cycle: each rule, asserted on the plan and its sentence."""

from __future__ import annotations

from dataclasses import replace

from atserver_runner.base import Workload, WorkloadState
from leases.base import Claim, ClaimInfo, SessionState
from supervisor import cycle
from supervisor.cycle import Snapshot, Vacancy, decide
from supervisor.placement import AtSignPolicy, NodeRef, rank_of, standby_order

A1 = NodeRef("a1", "A")
A2 = NodeRef("a2", "A")
B1 = NodeRef("b1", "B")
NODES = (A1, A2, B1)
INV = {a: AtSignPolicy(a) for a in ("@alice", "@bob", "@carol")}


def claim(atsign: str, token: int, session: str = "me", node: str = "a1") -> Claim:
    cloud = {"a1": "A", "a2": "A", "b1": "B"}[node]
    return Claim(atsign, token, session, ClaimInfo(node=node, cloud=cloud))


def workload(atsign: str, token: int, running: bool = True) -> Workload:
    state = WorkloadState.RUNNING if running else WorkloadState.STOPPED
    return Workload(atsign, "a1", token, "127.0.0.1", 7000, state, "pid:1")


def snap(**kw: object) -> Snapshot:
    base = Snapshot(
        now=100.0,
        me=A1,
        session_state=SessionState.ALIVE,
        session_id="me",
        renew_deadline=103.0,
        claims={},
        workloads={},
        registered=frozenset(),
        inventory=INV,
        nodes=NODES,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def kinds(plan: cycle.Plan) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.atsign) for a in plan.actions]


def test_lost_session_fences_everything_without_asking_the_dcs() -> None:
    s = snap(
        session_state=SessionState.LOST,
        claims=None,
        workloads={"@alice": workload("@alice", 5)},
        registered=frozenset({"@alice", "@bob"}),
    )
    plan = decide(s)
    assert kinds(plan) == [("Fence", "@alice"), ("Deregister", "@bob")]
    assert plan.sentence.startswith("no live DCS session: self-fencing (deregister, stop)")


def test_past_the_renew_deadline_fences_even_if_the_session_looks_alive() -> None:
    s = snap(now=104.0, workloads={"@alice": workload("@alice", 5)})
    plan = decide(s)
    assert kinds(plan) == [("Fence", "@alice")]
    assert "no renewal since the deadline (1.00s ago)" in plan.sentence


def test_suspended_session_holds_and_starts_nothing() -> None:
    s = snap(session_state=SessionState.SUSPENDED, workloads={"@alice": workload("@alice", 5)})
    plan = decide(s)
    assert plan.actions == ()
    assert plan.wake_at == 103.0
    assert "renewals failing: holding 1 workload(s), starting nothing" in plan.sentence


def test_a_workload_without_our_claim_is_fenced_never_restarted() -> None:
    s = snap(
        claims={"@alice": claim("@alice", 9, session="other", node="b1")},
        workloads={"@alice": workload("@alice", 5)},
        inventory={"@alice": INV["@alice"]},
    )
    plan = decide(s)
    assert kinds(plan) == [("Fence", "@alice")]
    assert "fence @alice (claim held by b1)" in plan.sentence


def test_held_claim_with_wrong_token_is_fenced_and_exited_one_restarted() -> None:
    s = snap(
        claims={"@alice": claim("@alice", 9), "@bob": claim("@bob", 4)},
        workloads={"@alice": workload("@alice", 5), "@bob": workload("@bob", 4, running=False)},
        inventory={"@alice": INV["@alice"], "@bob": INV["@bob"]},
    )
    plan = decide(s)
    assert kinds(plan) == [("Fence", "@alice"), ("Start", "@bob")]
    assert "fence @alice (runs token 5, claim has 9)" in plan.sentence
    assert "start @bob with token 4 (workload exited)" in plan.sentence


def test_adopts_running_workloads_it_still_holds_and_registers_them() -> None:
    s = snap(
        claims={"@alice": claim("@alice", 5)},
        workloads={"@alice": workload("@alice", 5)},
        inventory={"@alice": INV["@alice"]},
    )
    plan = decide(s)
    assert kinds(plan) == [("Register", "@alice")]
    s2 = replace(s, registered=frozenset({"@alice"}))
    assert decide(s2).sentence == "nothing to do: holding 1 claim(s)"


def test_vacant_atsigns_wait_for_their_rank_and_respect_capacity() -> None:
    vac = {a: Vacancy(since=100.0, last_node="a2", last_cloud="A") for a in INV}
    s = snap(claims={}, vacancies=vac)
    ranks = {a: rank_of("a1", INV[a], NODES, lost_node="a2", lost_cloud="A") for a in INV}
    assert set(ranks.values()) == {1}  # b1 (other cloud) first, then a1
    plan = decide(s)
    assert plan.actions == ()
    assert plan.wake_at is not None and plan.wake_at > 100.0
    later = replace(s, now=100.0 + 0.5 + 0.01, settings=cycle.PlacementSettings(capacity=2))
    plan = decide(later)
    assert [k for k, _ in kinds(plan)] == ["ClaimAndStart", "ClaimAndStart"]
    assert "at capacity (2), not claiming" in plan.sentence
    assert "(vacant, rank 1, last owner a2)" in plan.sentence


def test_standby_order_prefers_the_other_cloud_then_named_nodes() -> None:
    order = standby_order(AtSignPolicy("@alice"), NODES, lost_node="a1", lost_cloud="A")
    assert order[0] == B1 and A1 not in order
    pinned = standby_order(
        AtSignPolicy("@alice", prefer_nodes=("a2",)), NODES, lost_node="a1", lost_cloud="A"
    )
    assert pinned[0] == A2


def test_drain_hands_off_drain_concurrency_at_a_time_and_claims_nothing() -> None:
    claims = {a: claim(a, i + 1) for i, a in enumerate(INV)}
    work = {a: workload(a, i + 1) for i, a in enumerate(INV)}
    one = cycle.PlacementSettings(drain_concurrency=1)
    s = snap(claims=claims, workloads=work, registered=frozenset(INV), draining=True, settings=one)
    plan = decide(s)
    assert kinds(plan) == [("HandOff", "@alice")]
    assert "hand off @alice (draining)" in plan.sentence
    waiting = replace(
        s,
        in_flight=frozenset({"@alice"}),
        claims={"@bob": claims["@bob"]},
        workloads={"@bob": work["@bob"]},
        registered=frozenset({"@bob"}),
    )
    assert decide(waiting).actions == ()  # the next one only after @alice passed elsewhere
    # A busy handoff (its action still running) counts too.
    assert decide(replace(s, busy=frozenset({"@alice"}))).actions == ()
    two = replace(s, settings=cycle.PlacementSettings(drain_concurrency=2))
    assert [k for k, _ in kinds(decide(two))] == ["HandOff", "HandOff"]
    assert len(kinds(decide(replace(two, in_flight=frozenset({"@carol"}))))) == 1
    vac = snap(claims={}, draining=True, vacancies={"@alice": Vacancy(since=0.0)})
    assert decide(vac).actions == ()


def test_a_cycle_looks_only_at_dirty_atsigns_and_leaves_busy_ones_alone() -> None:
    claims = {"@alice": claim("@alice", 9, session="other", node="b1")}
    work = {"@alice": workload("@alice", 5), "@bob": workload("@bob", 4)}
    s = snap(claims=claims, workloads=work, inventory=INV, vacancies={})
    everything = decide(s)
    assert ("Fence", "@alice") in kinds(everything)
    assert ("ClaimAndStart", "@carol") in kinds(everything)
    only_carol = decide(replace(s, dirty=frozenset({"@carol"})))
    assert kinds(only_carol) == [("ClaimAndStart", "@carol")]
    assert decide(replace(s, dirty=frozenset({"@alice"}), busy=frozenset({"@alice"}))).actions == ()
    # Capacity counts claims still being made by running actions.
    full = replace(s, dirty=frozenset({"@carol"}), claiming=1000)
    assert decide(full).actions == ()


def test_waiting_atsigns_are_named_with_when_to_look_again() -> None:
    vac = {"@alice": Vacancy(since=100.0, last_node="a2", last_cloud="A")}
    s = snap(claims={}, vacancies=vac, inventory={"@alice": INV["@alice"]})
    plan = decide(s)
    assert plan.actions == ()
    assert plan.waiting == ((100.5, "@alice"),) and plan.wake_at == 100.5
    excluded = replace(s, excluded={"@alice": 130.0})
    assert decide(excluded).waiting == ((130.0, "@alice"),)


def test_explicit_handoff_and_exclusion_after_it() -> None:
    s = snap(
        claims={"@alice": claim("@alice", 3)},
        workloads={"@alice": workload("@alice", 3)},
        registered=frozenset({"@alice"}),
        handoffs=frozenset({"@alice"}),
        inventory={"@alice": INV["@alice"]},
    )
    assert kinds(decide(s)) == [("HandOff", "@alice")]
    after = snap(
        claims={},
        excluded={"@alice": 200.0},
        inventory={"@alice": INV["@alice"]},
        vacancies={"@alice": Vacancy(since=0.0)},
    )
    assert decide(after).actions == ()


def test_claims_of_atsigns_removed_from_the_inventory_are_handed_off() -> None:
    s = snap(
        claims={"@zed": claim("@zed", 3)},
        workloads={"@zed": workload("@zed", 3)},
        registered=frozenset({"@zed"}),
        inventory={},
    )
    plan = decide(s)
    assert kinds(plan) == [("HandOff", "@zed")]
    assert "not in the inventory" in plan.sentence


def test_a_plan_of_a_thousand_actions_is_one_readable_sentence() -> None:
    inv = {f"@a{i:04d}": AtSignPolicy(f"@a{i:04d}") for i in range(1000)}
    plan = decide(snap(claims={}, inventory=inv, vacancies={}, nodes=(A1,)))
    assert len(plan.actions) == 1000
    assert len(plan.sentence) < 1000, plan.sentence
    assert "and 989 more (claim and start 989)" in plan.sentence
    parts = [f"claimed @a{i} (token {i}, rank 0)" for i in range(50)]
    parts.append("ClaimAndStart @z failed: OSError: disk")
    short = cycle.shorten(parts)
    assert "ClaimAndStart @z failed: OSError: disk" in short  # failures always in full
    assert short[-1] == "and 40 more (claimed 40)"


def test_a_handed_off_claim_the_watch_still_shows_is_not_started_again() -> None:
    """The handoff stopped and released @alice; until the claims watch says so, the cache
    still shows our claim and nothing runs: that is no reason to start it."""
    s = snap(
        claims={"@alice": claim("@alice", 5)},
        draining=True,
        in_flight=frozenset({"@alice"}),
        dirty={"@alice"},
    )
    assert kinds(decide(s)) == []
    # Not in flight: a held claim with nothing running is started again.
    assert kinds(decide(replace(s, in_flight=frozenset(), draining=False))) == [("Start", "@alice")]
