"""The checker on hand-made histories, including ones it must flag."""

from __future__ import annotations

import json
from pathlib import Path

from chaos.checker import FaultRecord, Instance, check, outages
from chaos.faults import kinds_for, schedule
from chaos.history import NodeLogs, collect_instances
from chaos.workload import OpRecord


def w(atsign: str, t: float, ok: bool = True, token: int | None = 1, key: str = "") -> OpRecord:
    return OpRecord(atsign, "write", key or f"k{t}", f"v{t}", t, t + 0.01, ok, "s", token,
                    "" if ok else "connection closed")  # fmt: skip


def test_clean_failover_passes_and_measures_recovery() -> None:
    instances = [
        Instance("@a", "a1", 5, 0.0, 10.0, "fence.log"),
        Instance("@a", "b1", 9, 14.0, None),
        Instance("@b", "b1", 6, 0.0, None),
    ]
    fault = FaultRecord("kill-supervisor", "a1", 8.0, 12.0)
    ops = [w("@a", 7.0, token=5), w("@a", 10.5, ok=False), w("@a", 12.0, ok=False),
           w("@a", 15.0, token=9), w("@b", 9.0, token=6)]  # fmt: skip
    verdict = check(instances, [fault], ops)
    assert verdict.ok, verdict.violations
    assert verdict.acknowledged_writes == 3
    [outcome] = verdict.outcomes
    assert outcome.affected == ["@a"]
    assert abs((outcome.recovery_s or 0) - 7.01) < 1e-6
    kinds = verdict.recovery_by_kind()
    assert kinds["kill-supervisor"]["recovery_p50_s"] == 7.01


def test_two_serving_at_once_is_flagged() -> None:
    instances = [
        Instance("@a", "a1", 5, 0.0, 15.0, "stopped event"),
        Instance("@a", "b1", 9, 14.0, None),
    ]
    verdict = check(instances, [], [])
    assert [v.check for v in verdict.violations] == ["overlap"]
    assert "a1" in verdict.violations[0].detail and "b1" in verdict.violations[0].detail


def test_instance_without_end_evidence_overlaps_every_later_one() -> None:
    instances = [Instance("@a", "a1", 5, 0.0, None), Instance("@a", "b1", 9, 100.0, 120.0)]
    assert [v.check for v in check(instances, [], []).violations] == ["overlap"]


def test_lower_or_reused_token_is_flagged() -> None:
    lower = [Instance("@a", "a1", 9, 0.0, 1.0), Instance("@a", "b1", 7, 2.0, 3.0)]
    reused = [Instance("@a", "a1", 9, 0.0, 1.0), Instance("@a", "b1", 9, 2.0, 3.0)]
    restart_same_node = [Instance("@a", "a1", 9, 0.0, 1.0), Instance("@a", "a1", 9, 2.0, 3.0)]
    assert [v.check for v in check(lower, [], []).violations] == ["token-order"]
    assert [v.check for v in check(reused, [], []).violations] == ["token-order"]
    assert check(restart_same_node, [], []).ok


def test_ack_from_superseded_server_is_flagged() -> None:
    instances = [Instance("@a", "a1", 5, 0.0, 3.0), Instance("@a", "b1", 9, 2.0, None)]
    ops = [w("@a", 2.5, token=5)]
    names = [v.check for v in check(instances, [], ops).violations]
    assert "stale-ack" in names


def test_lost_and_unreadable_writes_are_flagged() -> None:
    lost = [{"atsign": "@a", "key": "k1", "value": "v1", "read": ""}]
    verdict = check([], [], [w("@a", 1.0)], lost, {"@b": "timed out"})
    assert [v.check for v in verdict.violations] == ["lost-write", "lost-write"]
    assert verdict.lost_writes == 1


def test_read_after_write_mismatch_is_flagged() -> None:
    bad = OpRecord("@a", "read", "k", "v2", 1.0, 1.1, False, "s", 1, "read 'v1'")
    assert [v.check for v in check([], [], [bad, w("@a", 2.0)]).violations] == ["read-after-write"]


def test_atsign_never_serving_again_is_flagged() -> None:
    fault = FaultRecord("kill-node", "a1", 5.0, 9.0)
    ops = [w("@a", 4.0), w("@a", 6.0, ok=False), w("@a", 30.0, ok=False)]
    verdict = check([], [fault], ops)
    assert [v.check for v in verdict.violations] == ["not-recovered"]
    assert verdict.outcomes[0].unrecovered == ["@a"]


def test_outage_is_attributed_to_the_fault_it_began_after() -> None:
    f1 = FaultRecord("crash-workload", "@a", 1.0, 1.0)
    f2 = FaultRecord("kill-node", "b1", 10.0, 14.0)
    ops = [w("@a", 1.2, ok=False), w("@a", 2.0), w("@b", 11.0, ok=False), w("@b", 16.0)]
    verdict = check([], [f1, f2], ops)
    assert verdict.outcomes[0].affected == ["@a"]
    assert verdict.outcomes[1].affected == ["@b"]
    assert len(outages(ops)) == 2


def test_operation_in_flight_when_a_fault_hits_counts_for_that_fault() -> None:
    """A write sent at 9.5 s fails at 10.4 s because of the crash at 10 s: the outage is the
    crash's, not the previous fault's (it was charged to a follower freeze before)."""
    freeze = FaultRecord("freeze-etcd-member", "etcd2", 0.0, 5.0)
    crash = FaultRecord("crash-workload", "@a", 10.0, 10.0)
    in_flight = OpRecord("@a", "write", "k", "v", 9.5, 10.4, False, "s", 1, "connection closed")
    ops = [w("@a", 6.0), in_flight, w("@a", 11.0, ok=False), w("@a", 11.5)]
    verdict = check([], [freeze, crash], ops)
    assert verdict.outcomes[0].affected == [] and verdict.outcomes[0].recovery_s is None
    assert verdict.outcomes[1].affected == ["@a"]
    assert abs((verdict.outcomes[1].recovery_s or 0) - 1.51) < 1e-6


def test_history_from_logs_uses_earliest_end_evidence(tmp_path: Path) -> None:
    logs = tmp_path / "a1" / "logs"
    logs.mkdir(parents=True)
    lines = [
        "=== 2026 start @a token 5 ===",
        json.dumps({"ts": 1.0, "event": "listening", "atsign": "@a", "fencing_token": 5}),
        json.dumps({"ts": 2.0, "event": "stopped", "atsign": "@a", "exit_code": 0}),
        json.dumps({"ts": 3.0, "event": "listening", "atsign": "@a", "fencing_token": 7}),
        json.dumps({"ts": 9.0, "event": "listening", "atsign": "@a", "fencing_token": 8}),
        json.dumps({"ts": 20.0, "event": "listening", "atsign": "@a", "fencing_token": 12}),
    ]
    (logs / "a.log").write_text("\n".join(lines) + "\n")
    fence_log = tmp_path / "a1" / "fence.log"
    fence_log.write_text(
        json.dumps({"event": "fenced", "atsign": "@a", "fencing_token": 8, "wall": 11.0}) + "\n"
    )
    kill = FaultRecord("kill-node", "a1", 4.0, 6.0, killed=(("a1", "@a", 5.0),))
    got = collect_instances([NodeLogs("a1", logs, fence_log)], [kill])
    assert [(i.token, i.start, i.end, i.end_source) for i in got] == [
        (5, 1.0, 2.0, "stopped event"),
        (7, 3.0, 5.0, "harness kill"),
        (8, 9.0, 11.0, "fence.log"),
        (12, 20.0, None, ""),
    ]


def test_schedule_is_reproducible_per_seed() -> None:
    kinds = kinds_for("etcd")
    assert schedule(7, 30, kinds) == schedule(7, 30, kinds)
    assert schedule(7, 30, kinds) != schedule(8, 30, kinds)
    assert {f.kind for f in schedule(1, 200, kinds_for("consul"))} <= set(kinds_for("consul"))


def test_overlap_after_an_etcd_leader_thaw_names_the_known_etcd_bug() -> None:
    instances = [Instance("@a", "a1", 5, 0.0, 15.0), Instance("@a", "b1", 9, 14.0, None)]
    thaw = FaultRecord("freeze-etcd-leader", "leader", 2.0, 11.0)
    [v] = check(instances, [thaw], []).violations
    assert v.check == "overlap" and "etcd#12528" in v.detail
    [plain] = check(instances, [], []).violations
    assert "etcd#12528" not in plain.detail


def test_a_frozen_and_fenced_owner_is_a_fenced_overlap_not_a_violation() -> None:
    """A whole node frozen (VM pause) cannot stop its atServer; the new owner fenced it
    instead. Excused only if it stopped soon after the thaw and acknowledged nothing after
    the new owner started."""
    freeze = FaultRecord("freeze-node", "a1", 10.0, 25.0)
    old = Instance("@a", "a1", 5, 0.0, 25.2, "stopped event")
    new = Instance("@a", "b1", 9, 18.0, None)
    ops = [w("@a", 9.0, token=5), w("@a", 19.0, token=9)]
    verdict = check([old, new], [freeze], ops)
    assert verdict.ok, verdict.violations
    assert [v.check for v in verdict.fenced_overlaps] == ["fenced-overlap"]
    assert verdict.to_json()["fenced_overlaps"][0]["atsign"] == "@a"
    # An acknowledgement by the old owner after the new one started: a real overlap.
    late_ack = [*ops, w("@a", 26.0, token=5)]
    assert "overlap" in [v.check for v in check([old, new], [freeze], late_ack).violations]
    # Not frozen (a pause of the supervisor only: its fence must stop the atServer).
    pause = FaultRecord("pause-supervisor", "a1", 10.0, 25.0)
    assert [v.check for v in check([old, new], [pause], ops).violations] == ["overlap"]
    # Still running long after the thaw, or another node frozen: not excused.
    lingering = Instance("@a", "a1", 5, 0.0, 90.0, "stopped event")
    assert [v.check for v in check([lingering, new], [freeze], ops).violations] == ["overlap"]
    other = FaultRecord("freeze-node", "b2", 10.0, 25.0)
    assert [v.check for v in check([old, new], [other], ops).violations] == ["overlap"]
