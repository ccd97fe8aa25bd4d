"""Session losses in a chaos report: read from the supervisors' log lines, attributed to
the fault in flight, etcd member faults split by the member's role."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from chaos.checker import FaultRecord
from chaos.sessions import parse_session_events, session_events, session_losses_by_fault


def _stamp(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def _lost(node: str, at: float, reason: str) -> str:
    return (
        f"{_stamp(at)} {node} ERROR leases.renewal event=session_lost node={node} "
        f"session=7587884263811111 reason={reason!r}"
    )


T0 = 1_800_000_000.0


def test_losses_and_rechecks_are_read_and_clean_closes_are_not() -> None:
    lines = [
        _lost("a1", T0 + 1.25, "no renewal within renew_deadline 3s"),
        f"{_stamp(T0 + 2)} b1 INFO leases.renewal event=session_lost node=b1 session=x "
        "reason='closed by its owner'",
        f"{_stamp(T0 + 3)} b1 INFO supervisor.keeper event=session-recheck session=x "
        "why='own claim of @alice deleted, not released by this node'",
        f"{_stamp(T0 + 4)} a1 INFO supervisor.daemon event=claimed atsign=@bob",
        _lost("c1", T0 + 5, "it's gone"),  # %r picks double quotes
    ]
    events = parse_session_events(lines)
    assert [(e.node, e.event) for e in events] == [
        ("a1", "lost"),
        ("b1", "recheck"),
        ("c1", "lost"),
    ]
    assert abs(events[0].at - (T0 + 1.25)) < 0.002
    assert events[0].reason == "no renewal within renew_deadline 3s"
    assert events[2].reason == "it's gone"


def test_each_loss_goes_to_the_fault_in_flight_and_member_faults_split_by_role(
    tmp_path: Path,
) -> None:
    ttl = 6.0
    faults = [
        FaultRecord("freeze-etcd-member", "etcd-0", T0, T0 + 10, "etcd-0 was the leader"),
        FaultRecord("freeze-etcd-member", "etcd-1", T0 + 100, T0 + 110, "etcd-1 was a follower"),
        FaultRecord("kill-etcd-leader", "etcd-2", T0 + 200, T0 + 202),
        FaultRecord("pause-supervisor", "a1", T0 + 300, T0 + 312),
    ]
    (tmp_path / "supervisor-a1.log").write_text(
        "\n".join(
            [
                _lost("a1", T0 + 12, "the DCS reports the session expired or revoked"),
                _lost("a1", T0 + 313, "no renewal within renew_deadline 3s"),
                _lost("a1", T0 + 500, "no renewal within renew_deadline 3s"),  # no fault
            ]
        )
    )
    (tmp_path / "supervisor-b1.log").write_text(
        _lost("b1", T0 + 21, "the DCS reports the session expired or revoked")  # healed + 2 ttl
    )
    out = session_losses_by_fault(session_events(tmp_path), faults, ttl)
    groups = out["by_group"]
    leader = groups["freeze-etcd-member (the leader)"]
    assert (leader["faults"], leader["with_session_loss"], leader["losses"]) == (1, 1, 2)
    assert leader["reasons"] == {"the DCS reports the session expired or revoked": 2}
    assert groups["freeze-etcd-member (a follower)"]["with_session_loss"] == 0
    assert groups["kill-etcd-leader (the leader)"] == {
        "faults": 1, "with_session_loss": 0, "losses": 0, "rechecks": 0, "reasons": {}
    }  # fmt: skip
    assert groups["pause-supervisor"]["with_session_loss"] == 1
    assert groups["pause-supervisor"]["reasons"] == {"no renewal within renew_deadline Ns": 1}
    assert out["unattributed"] == {"losses": 1, "rechecks": 0}


def test_a_loss_after_two_ttls_past_the_heal_is_not_the_faults() -> None:
    faults = [FaultRecord("restart-consul", "consul", T0, T0 + 1)]
    events = parse_session_events([_lost("a1", T0 + 1 + 2 * 10 + 0.5, "lost")])
    out = session_losses_by_fault(events, faults, 10.0)
    assert out["by_group"]["restart-consul"]["losses"] == 0
    assert out["unattributed"]["losses"] == 1
