"""The checker: verdicts from histories, never from the supervisors' beliefs.

Inputs (see :mod:`chaos.history` for where they come from):

* :class:`Instance`: one run of one atSign's atServer on one node, with its fencing token,
  the wall time it started listening and the earliest evidence that it stopped (its own
  ``stopped`` log line, the fence's log, or the harness's record of a SIGKILL). No evidence
  means it is taken to run until the end of the history (the conservative choice).
* :class:`FaultRecord`: what the harness did and when.
* :class:`chaos.workload.OpRecord`: the client's operations, and the end-of-run read-back.

Checks:

1. ``overlap``: no two instances of one atSign serving at the same time. One exception, a
   *fenced* overlap, reported apart (``fenced_overlaps``): the old instance's whole node was
   frozen (``freeze-node``: supervisor, fence, atServers and ceph-fuse stopped, a VM pause)
   when the new one started, so nobody could stop it; it was fenced instead (the new owner
   evicted and blocklisted its CephFS client before starting), it stopped within
   ``FROZEN_STOP_GRACE_S`` of the thaw, and it acknowledged no operation after the new one
   started. Any acknowledgement after that makes it an ``overlap`` again.
2. ``token-order``: in start order, each instance's token is >= the previous one, and
   strictly greater when it runs on another node (a new claim).
3. ``stale-ack``: no write acknowledged by a server whose token was already superseded by an
   instance that started before the write was sent.
4. ``read-after-write``: a read right after an acknowledged write returns that value.
5. ``lost-write``: every acknowledged write is readable at the end.
6. ``not-recovered``: every outage (a run of failed operations) of an atSign ends with a
   successful write before the history ends.

Recovery time of a fault: for each atSign whose outage was first seen (a failed operation
ended) between this fault and the next, the end of the outage minus the fault's start; the
fault's recovery is the largest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.workload import OpRecord


@dataclass(frozen=True)
class Instance:
    atsign: str
    node: str
    token: int
    start: float
    end: float | None
    """``None``: no evidence it stopped (treated as running until the end)."""
    end_source: str = ""


@dataclass(frozen=True)
class FaultRecord:
    kind: str
    target: str
    start: float
    """Wall time just before the fault was injected."""
    healed: float
    """Wall time the fault was undone (== ``start`` for one-shot faults like a workload crash
    whose undoing is the system's job)."""
    detail: str = ""
    killed: tuple[tuple[str, str, float], ...] = ()
    """(node, atSign, wall time it was dead) for workloads the harness killed itself."""


@dataclass(frozen=True)
class Violation:
    check: str
    atsign: str
    detail: str


@dataclass(frozen=True)
class Outage:
    atsign: str
    start: float
    """Start of the first failed operation."""
    end: float | None
    """End of the first successful write after it; ``None`` if none came."""
    seen: float
    """End of the first failed operation: when the client saw the outage. Faults are matched
    on this, since an operation in flight when a fault hits began before the fault."""


@dataclass
class FaultOutcome:
    fault: FaultRecord
    affected: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    """Largest outage end - fault start over the affected atSigns (``None``: none affected)."""
    unrecovered: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    violations: list[Violation]
    outcomes: list[FaultOutcome]
    acknowledged_writes: int
    lost_writes: int
    fenced_overlaps: list[Violation] = field(default_factory=list)
    """Overlaps excused because the old owner was frozen whole and fenced (module docstring)."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def recovery_by_kind(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: count, how many caused an outage, recovery p50/p99/max seconds."""
        out: dict[str, dict[str, Any]] = {}
        kinds = sorted({o.fault.kind for o in self.outcomes})
        for kind in kinds:
            mine = [o for o in self.outcomes if o.fault.kind == kind]
            times = sorted(o.recovery_s for o in mine if o.recovery_s is not None)
            out[kind] = {
                "faults": len(mine),
                "with_outage": len(times),
                "recovery_p50_s": _percentile(times, 50),
                "recovery_p99_s": _percentile(times, 99),
                "recovery_max_s": round(times[-1], 3) if times else None,
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "violations": [asdict(v) for v in self.violations],
            "fenced_overlaps": [asdict(v) for v in self.fenced_overlaps],
            "acknowledged_writes": self.acknowledged_writes,
            "lost_writes": self.lost_writes,
            "recovery_by_kind": self.recovery_by_kind(),
            "faults": [
                {
                    **asdict(o.fault),
                    "affected": o.affected,
                    "recovery_s": None if o.recovery_s is None else round(o.recovery_s, 3),
                    "unrecovered": o.unrecovered,
                }
                for o in self.outcomes
            ],
        }


def _percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return round(sorted_values[rank - 1], 3)


def _end(i: Instance) -> float:
    return math.inf if i.end is None else i.end


FROZEN_STOP_GRACE_S = 10.0
"""How long after a ``freeze-node`` thaw the node's own supervisor and fence may take to stop
its fenced atServers (it finds its session gone at once; the stop itself is bounded by the
runner's stop timeout)."""


def _frozen_then_fenced(
    a: Instance, b: Instance, faults: Sequence[FaultRecord], ops: Sequence[OpRecord]
) -> FaultRecord | None:
    """The ``freeze-node`` fault that excuses ``a`` still running when ``b`` started (see
    the module docstring), or ``None``."""
    if a.end is None:
        return None
    for f in faults:
        if f.kind != "freeze-node" or f.target != a.node:
            continue
        if not (
            a.start < f.start <= b.start <= f.healed and a.end <= f.healed + FROZEN_STOP_GRACE_S
        ):
            continue
        acked = any(
            op.atsign == a.atsign and op.ok and op.token == a.token and op.end > b.start
            for op in ops
        )
        return None if acked else f
    return None


def check_overlap(
    instances: Iterable[Instance],
    faults: Sequence[FaultRecord] = (),
    ops: Sequence[OpRecord] = (),
) -> tuple[list[Violation], list[Violation]]:
    """(overlaps, fenced overlaps)."""
    out: list[Violation] = []
    fenced: list[Violation] = []
    by_atsign: dict[str, list[Instance]] = {}
    for i in instances:
        by_atsign.setdefault(i.atsign, []).append(i)
    for atsign, runs in sorted(by_atsign.items()):
        runs.sort(key=lambda i: i.start)
        for k, a in enumerate(runs):
            for b in runs[k + 1 :]:
                if b.start >= _end(a):
                    continue
                detail = (
                    f"{a.node} (token {a.token}, {a.start:.3f}-{_end(a):.3f}, "
                    f"end from {a.end_source or 'nothing'}) still served when {b.node} "
                    f"(token {b.token}) started at {b.start:.3f}"
                )
                freeze = _frozen_then_fenced(a, b, faults, ops)
                if freeze is None:
                    out.append(Violation("overlap", atsign, detail))
                else:
                    fenced.append(
                        Violation(
                            "fenced-overlap",
                            atsign,
                            f"{detail}; {a.node} was frozen {freeze.start:.3f}-"
                            f"{freeze.healed:.3f} and acknowledged nothing after that start",
                        )
                    )
    return out, fenced


def check_token_order(instances: Iterable[Instance]) -> list[Violation]:
    out = []
    by_atsign: dict[str, list[Instance]] = {}
    for i in instances:
        by_atsign.setdefault(i.atsign, []).append(i)
    for atsign, runs in sorted(by_atsign.items()):
        runs.sort(key=lambda i: i.start)
        for a, b in itertools.pairwise(runs):
            if b.token < a.token or (b.node != a.node and b.token == a.token):
                out.append(
                    Violation(
                        "token-order",
                        atsign,
                        f"{b.node} started with token {b.token} at {b.start:.3f} after "
                        f"{a.node} had token {a.token}",
                    )
                )
    return out


def check_stale_acks(instances: Iterable[Instance], ops: Iterable[OpRecord]) -> list[Violation]:
    starts: dict[str, list[tuple[float, int]]] = {}
    for i in instances:
        starts.setdefault(i.atsign, []).append((i.start, i.token))
    out = []
    for op in ops:
        if op.op != "write" or not op.ok or op.token is None:
            continue
        newer = [(s, t) for s, t in starts.get(op.atsign, []) if t > op.token and s < op.start]
        if newer:
            s, t = min(newer)
            out.append(
                Violation(
                    "stale-ack",
                    op.atsign,
                    f"{op.key} acknowledged at {op.end:.3f} by {op.server} with token "
                    f"{op.token}, but token {t} started at {s:.3f}",
                )
            )
    return out


def check_reads(ops: Iterable[OpRecord]) -> list[Violation]:
    return [
        Violation("read-after-write", op.atsign, f"{op.key} at {op.start:.3f}: {op.error}")
        for op in ops
        if op.op == "read" and not op.ok and op.error.startswith("read ")
    ]


def outages(ops: Iterable[OpRecord]) -> list[Outage]:
    """Per atSign, each run of failed operations up to the next successful write."""
    by_atsign: dict[str, list[OpRecord]] = {}
    for op in ops:
        by_atsign.setdefault(op.atsign, []).append(op)
    out = []
    for atsign, mine in sorted(by_atsign.items()):
        mine.sort(key=lambda o: o.start)
        first: OpRecord | None = None
        for op in mine:
            if not op.ok:
                if first is None:
                    first = op
            elif op.op == "write" and first is not None:
                out.append(Outage(atsign, first.start, op.end, first.end))
                first = None
        if first is not None:
            out.append(Outage(atsign, first.start, None, first.end))
    return out


def fault_outcomes(
    faults: Sequence[FaultRecord], ops: Iterable[OpRecord]
) -> tuple[list[FaultOutcome], list[Violation]]:
    ordered = sorted(faults, key=lambda f: f.start)
    found = outages(ops)
    outcomes = [FaultOutcome(f) for f in ordered]
    violations = []
    for o in found:
        if o.end is None:
            violations.append(
                Violation(
                    "not-recovered",
                    o.atsign,
                    f"failing since {o.start:.3f} and never served a write again",
                )
            )
        idx = None
        for k, f in enumerate(ordered):
            if f.start <= o.seen:
                idx = k
        if idx is None:
            continue  # before the first fault (start-up)
        fo = outcomes[idx]
        if o.atsign not in fo.affected:
            fo.affected.append(o.atsign)
        if o.end is None:
            fo.unrecovered.append(o.atsign)
            continue
        took = o.end - fo.fault.start
        fo.recovery_s = took if fo.recovery_s is None else max(fo.recovery_s, took)
    return outcomes, violations


ETCD_OLD_LEADER_REVOKE = (
    "possibly etcd#12528: a frozen old leader revokes leases after it resumes (fixed by etcd "
    "PR #16822, not in etcd 3.4.23); the fencing token keeps the data safe"
)
KNOWN_ISSUE_WINDOW_S = 30.0


def _annotate_known_dcs_issues(
    overlaps: list[Violation], instances: Sequence[Instance], faults: Sequence[FaultRecord]
) -> list[Violation]:
    """Name a known DCS bug in an overlap that began soon after an etcd leader was thawed."""
    thaws = [f.healed for f in faults if f.kind == "freeze-etcd-leader"]
    out = []
    for v in overlaps:
        starts = [i.start for i in instances if i.atsign == v.atsign]
        near = any(0 <= s - t <= KNOWN_ISSUE_WINDOW_S for s in starts for t in thaws)
        out.append(Violation(v.check, v.atsign, f"{v.detail} [{ETCD_OLD_LEADER_REVOKE}]")
                   if near else v)  # fmt: skip
    return out


def check(
    instances: Sequence[Instance],
    faults: Sequence[FaultRecord],
    ops: Sequence[OpRecord],
    lost: Sequence[dict[str, str]] = (),
    unreadable_atsigns: Mapping[str, str] | None = None,
) -> Verdict:
    """Every check above over one history."""
    overlaps, fenced = check_overlap(instances, faults, ops)
    violations = _annotate_known_dcs_issues(overlaps, instances, faults)
    violations += check_token_order(instances)
    violations += check_stale_acks(instances, ops) + check_reads(ops)
    for w in lost:
        violations.append(
            Violation(
                "lost-write",
                w["atsign"],
                f"{w['key']} was acknowledged as {w['value']!r} but reads {w['read']!r}",
            )
        )
    for a, why in (unreadable_atsigns or {}).items():
        violations.append(Violation("lost-write", a, f"could not read back at the end: {why}"))
    outcomes, more = fault_outcomes(faults, ops)
    violations += more
    acked = sum(1 for op in ops if op.op == "write" and op.ok)
    return Verdict(violations, outcomes, acked, len(lost), fenced)
