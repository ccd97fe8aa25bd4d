"""The nodes' session losses during a chaos run, attributed to the fault in flight.

A node fault (a supervisor paused or partitioned) is meant to end that node's session; a
DCS fault (an etcd member frozen or killed, the Consul server restarted) should not, and
when one does it is worth counting. etcd member faults are split by the member's role at
the time (the leader or a follower), because that, not the kind's name, decides whether
leases are at risk (etcd#12528: an old leader's lessor may revoke leases after it stepped
down). The supervisors' own log lines are the source: ``event=session_lost`` (with its
reason) and ``event=session-recheck`` (an own claim vanished while the session seemed alive,
so the node renewed at once to learn whether its lease was revoked).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chaos.checker import FaultRecord

LOST_EVENT = "event=session_lost"
RECHECK_EVENT = "event=session-recheck"
CLOSED_REASON = "closed by its owner"
"""A clean shutdown (drain, restart): not a loss."""
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) ")
_REASON = re.compile(r"reason=(['\"])(.*)\1\s*$")


@dataclass(frozen=True)
class SessionEvent:
    """One loss or recheck a node logged (``at``: wall time)."""

    node: str
    at: float
    event: str
    """``lost`` or ``recheck``."""
    reason: str = ""


def parse_session_events(lines: Iterable[str]) -> list[SessionEvent]:
    """The session losses and rechecks in a supervisor's text log (``%(asctime)s node ...``);
    clean closes are not losses."""
    out: list[SessionEvent] = []
    for line in lines:
        if LOST_EVENT in line:
            event = "lost"
        elif RECHECK_EVENT in line:
            event = "recheck"
        else:
            continue
        head = _LINE.match(line)
        if head is None:
            continue
        at = datetime.strptime(head.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        reason = _REASON.search(line)
        why = reason.group(2) if reason else ""
        if event == "lost" and why == CLOSED_REASON:
            continue
        out.append(SessionEvent(head.group(2), at, event, why))
    return out


def session_events(logs_dir: Path) -> list[SessionEvent]:
    """Every node's session losses and rechecks, in time order."""
    events: list[SessionEvent] = []
    for path in sorted(logs_dir.glob("supervisor-*.log")):
        events += parse_session_events(path.read_text(errors="replace").splitlines())
    return sorted(events, key=lambda e: e.at)


def fault_group(fault: FaultRecord) -> str:
    """The fault's kind; an etcd member fault also names the member's role at the time."""
    if fault.kind.endswith("-etcd-leader"):
        return f"{fault.kind} (the leader)"
    if fault.kind.endswith("-etcd-member"):
        if "was the leader" in fault.detail:
            return f"{fault.kind} (the leader)"
        if "was a follower" in fault.detail:
            return f"{fault.kind} (a follower)"
        return f"{fault.kind} (role unknown)"
    return fault.kind


def session_losses_by_fault(
    events: Sequence[SessionEvent], faults: Sequence[FaultRecord], ttl: float
) -> dict[str, Any]:
    """Per fault group: faults, those during which a node lost its session, the losses and
    rechecks; an event belongs to the latest fault that began before it and healed at most
    two ttls earlier (a session outlives its last renewal by up to a ttl on etcd, two on
    Consul). Events outside every fault's window are counted as ``unattributed``."""
    ordered = sorted(faults, key=lambda f: f.start)
    groups: dict[str, dict[str, Any]] = {}
    for fault in ordered:
        g = groups.setdefault(
            fault_group(fault),
            {"faults": 0, "with_session_loss": 0, "losses": 0, "rechecks": 0, "reasons": {}},
        )
        g["faults"] += 1
    hit: set[int] = set()
    unattributed = {"losses": 0, "rechecks": 0}
    for event in events:
        owner = None
        for i, fault in enumerate(ordered):
            if fault.start <= event.at <= fault.healed + 2 * ttl:
                owner = i
        key = "losses" if event.event == "lost" else "rechecks"
        if owner is None:
            unattributed[key] += 1
            continue
        g = groups[fault_group(ordered[owner])]
        g[key] += 1
        if event.event == "lost":
            if owner not in hit:
                hit.add(owner)
                g["with_session_loss"] += 1
            reason = _short_reason(event.reason)
            g["reasons"][reason] = g["reasons"].get(reason, 0) + 1
    return {"by_group": dict(sorted(groups.items())), "unattributed": unattributed}


def _short_reason(reason: str) -> str:
    """The reason without its variable part (ids, seconds, addresses)."""
    return re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "N", reason)[:120] or "unknown"
