"""The decision of one cycle: a pure function from an immutable snapshot to a plan.

Nothing here does I/O. :func:`decide` looks at the claims on the DCS, this
node's workloads and registrations, and says what to do, with a sentence
that says why. The daemon (:mod:`supervisor.daemon`) builds the snapshot,
executes the plan and logs the sentence.

Rules:
- a workload runs only while this node's session holds its claim, with the
  claim's fencing token; anything else is fenced (deregister, then stop);
- when the session is lost or past its renew deadline, everything is fenced,
  without asking the DCS;
- while the DCS cannot be read (or the session is suspended) nothing new is
  started and nothing is stopped before the deadline;
- a vacant atSign of the inventory is claimed after ``rank * rank_delay``
  (see :mod:`supervisor.placement`) if capacity allows and the node is not
  draining or excluded from it (just handed it off);
- draining hands off one atSign at a time; an explicit handoff at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from atserver_runner.base import Workload, WorkloadState
from leases.base import Claim, SessionState
from supervisor.placement import AtSignPolicy, NodeRef, better_placed, rank_of


@dataclass(frozen=True)
class Vacancy:
    """An atSign seen without a claim: since when, and who held it last (if known)."""

    since: float
    last_node: str | None = None
    last_cloud: str | None = None


@dataclass(frozen=True)
class PlacementSettings:
    capacity: int = 1000
    rank_delay: float = 0.5
    prefer_other_cloud: bool = True
    failback: str = "manual"
    failback_interval: float = 10.0


@dataclass(frozen=True)
class Snapshot:
    """Everything one cycle may look at, taken once at its start."""

    now: float
    me: NodeRef
    session_state: SessionState
    session_id: str | None
    renew_deadline: float
    claims: Mapping[str, Claim] | None
    """Every claim on the DCS, or ``None`` when the DCS could not be read."""
    workloads: Mapping[str, Workload]
    registered: frozenset[str]
    inventory: Mapping[str, AtSignPolicy]
    nodes: Sequence[NodeRef]
    vacancies: Mapping[str, Vacancy] = field(default_factory=dict)
    draining: bool = False
    handoffs: frozenset[str] = frozenset()
    handoff_in_flight: str | None = None
    excluded: Mapping[str, float] = field(default_factory=dict)
    failback_asked: Mapping[str, float] = field(default_factory=dict)
    settings: PlacementSettings = field(default_factory=PlacementSettings)


@dataclass(frozen=True)
class Fence:
    """Deregister, then stop; the claim (if any) is not ours to release."""

    atsign: str
    reason: str


@dataclass(frozen=True)
class HandOff:
    """Planned: deregister, stop, then release the claim so a standby takes it at once."""

    atsign: str
    claim: Claim
    reason: str


@dataclass(frozen=True)
class Release:
    """We hold a claim we should not: release it (nothing runs)."""

    atsign: str
    claim: Claim
    reason: str


@dataclass(frozen=True)
class ClaimAndStart:
    atsign: str
    rank: int
    reason: str


@dataclass(frozen=True)
class Start:
    """We hold the claim and nothing healthy runs: (re)start with the claim's token."""

    atsign: str
    claim: Claim
    reason: str


@dataclass(frozen=True)
class Register:
    atsign: str
    claim: Claim
    workload: Workload


@dataclass(frozen=True)
class Deregister:
    atsign: str
    reason: str


@dataclass(frozen=True)
class RequestFailback:
    """Ask the owner (over its HTTP API) to hand the atSign back to this preferred node."""

    atsign: str
    owner_node: str
    owner_api: str | None


Action: TypeAlias = (
    Fence | HandOff | Release | ClaimAndStart | Start | Register | Deregister | RequestFailback
)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    sentence: str
    wake_at: float | None = None
    """When a waiting standby's rank delay ends (monotonic), if one is pending."""


def track_vacancies(
    previous: Mapping[str, Vacancy],
    old_claims: Mapping[str, Claim] | None,
    claims: Mapping[str, Claim],
    atsigns: set[str],
    now: float,
    cloud_of: Mapping[str, str],
) -> dict[str, Vacancy]:
    """Vacancies after a new read of the claims: keep old ``since``, note the last owner."""
    result: dict[str, Vacancy] = {}
    for atsign in atsigns:
        if atsign in claims:
            continue
        if atsign in previous:
            result[atsign] = previous[atsign]
            continue
        last = old_claims.get(atsign) if old_claims else None
        if last is not None:
            node = last.info.node
            cloud = last.info.cloud or cloud_of.get(node)
            result[atsign] = Vacancy(since=now, last_node=node, last_cloud=cloud)
        else:
            result[atsign] = Vacancy(since=now)
    return result


def _fence_everything(s: Snapshot, why: str) -> Plan:
    actions: list[Action] = [Fence(a, why) for a in sorted(s.workloads)]
    actions += [Deregister(a, why) for a in sorted(s.registered - set(s.workloads))]
    if not actions:
        return Plan((), f"{why}: nothing runs here, nothing to fence")
    names = ", ".join(sorted(set(s.workloads) | s.registered))
    return Plan(tuple(actions), f"{why}: self-fencing (deregister, stop) {names}")


def _running(w: Workload | None) -> bool:
    return w is not None and w.state is WorkloadState.RUNNING


def decide(s: Snapshot) -> Plan:
    """The plan of one cycle (pure)."""
    if s.session_state is SessionState.LOST or s.session_id is None:
        return _fence_everything(s, "no live DCS session")
    if s.now >= s.renew_deadline:
        return _fence_everything(
            s, f"no renewal since the deadline ({s.now - s.renew_deadline:.2f}s ago)"
        )
    if s.session_state is SessionState.SUSPENDED or s.claims is None:
        why = "renewals failing" if s.session_state is SessionState.SUSPENDED else "DCS unreadable"
        return Plan(
            (),
            f"{why}: holding {len(s.workloads)} workload(s), starting nothing, "
            f"self-fence in {s.renew_deadline - s.now:.2f}s unless a renewal succeeds",
            wake_at=s.renew_deadline,
        )

    claims = s.claims
    mine = {a: c for a, c in claims.items() if c.session_id == s.session_id}
    actions: list[Action] = []
    notes: list[str] = []
    leaving: set[str] = set()

    for atsign in sorted(s.handoffs & set(mine)):
        leaving.add(atsign)
    if s.draining:
        leaving.update(a for a in mine if a not in s.inventory)
        if s.handoff_in_flight is None:
            rest = sorted(set(mine) - leaving)
            if rest:
                leaving.add(rest[0])
        elif s.handoff_in_flight in mine:
            leaving.add(s.handoff_in_flight)
    leaving.update(a for a in mine if a not in s.inventory)

    # 1. Everything this node runs or holds.
    for atsign in sorted(set(s.workloads) | set(mine)):
        w = s.workloads.get(atsign)
        c = mine.get(atsign)
        if c is None:
            if w is not None:
                other = claims.get(atsign)
                why = f"claim held by {other.info.node}" if other else "no claim held"
                actions.append(Fence(atsign, why))
            continue
        if atsign in leaving:
            reason = (
                "not in the inventory"
                if atsign not in s.inventory
                else "draining"
                if s.draining and atsign not in s.handoffs
                else "handoff requested"
            )
            if w is not None:
                actions.append(HandOff(atsign, c, reason))
            else:
                actions.append(Release(atsign, c, reason))
            continue
        if w is None:
            actions.append(Start(atsign, c, "claim held, nothing running"))
        elif w.fencing_token != c.token:
            actions.append(Fence(atsign, f"runs token {w.fencing_token}, claim has {c.token}"))
        elif not _running(w):
            actions.append(Start(atsign, c, "workload exited"))
        elif atsign not in s.registered:
            actions.append(Register(atsign, c, w))

    # 2. Registrations without a workload.
    for atsign in sorted(s.registered - set(s.workloads)):
        actions.append(Deregister(atsign, "nothing runs here"))

    # 3. Vacant atSigns this node may take.
    held = len(mine) - len([a for a in leaving if a in mine])
    wake_at: float | None = None
    waiting = 0
    if not s.draining:
        ready: list[tuple[float, str, int]] = []
        for atsign, policy in s.inventory.items():
            if atsign in claims or atsign in s.workloads:
                continue
            if s.excluded.get(atsign, float("-inf")) > s.now:
                continue
            vac = s.vacancies.get(atsign, Vacancy(since=s.now))
            rank = rank_of(
                s.me.name,
                policy,
                s.nodes,
                lost_node=vac.last_node if vac.last_node != s.me.name else None,
                lost_cloud=vac.last_cloud,
                prefer_other_cloud=s.settings.prefer_other_cloud,
            )
            at = vac.since + rank * s.settings.rank_delay
            if at <= s.now:
                ready.append((at, atsign, rank))
            else:
                waiting += 1
                wake_at = at if wake_at is None else min(wake_at, at)
        for _at, atsign, rank in sorted(ready):
            if held >= s.settings.capacity:
                notes.append(f"at capacity ({s.settings.capacity}), not claiming {atsign}")
                break
            seen = s.vacancies.get(atsign)
            last = f", last owner {seen.last_node}" if seen and seen.last_node else ""
            actions.append(ClaimAndStart(atsign, rank, f"vacant, rank {rank}{last}"))
            held += 1

    # 4. Failback to this node when it is explicitly preferred (auto policy).
    if s.settings.failback == "auto" and not s.draining:
        for atsign, c in sorted(claims.items()):
            wish = s.inventory.get(atsign)
            if wish is None or c.session_id == s.session_id or held >= s.settings.capacity:
                continue
            owner = NodeRef(c.info.node, c.info.cloud)
            if not better_placed(s.me, owner, wish):
                continue
            if s.now - s.failback_asked.get(atsign, float("-inf")) < s.settings.failback_interval:
                continue
            actions.append(RequestFailback(atsign, c.info.node, c.info.extra.get("api")))

    sentence = describe(actions, notes, len(mine), waiting)
    return Plan(tuple(actions), sentence, wake_at)


def describe(actions: Sequence[Action], notes: Sequence[str], held: int, waiting: int) -> str:
    """One sentence for the log: what the plan does and why."""
    parts: list[str] = []
    for a in actions:
        match a:
            case Fence():
                parts.append(f"fence {a.atsign} ({a.reason})")
            case HandOff():
                parts.append(f"hand off {a.atsign} ({a.reason})")
            case Release():
                parts.append(f"release {a.atsign} ({a.reason})")
            case ClaimAndStart():
                parts.append(f"claim and start {a.atsign} ({a.reason})")
            case Start():
                parts.append(f"start {a.atsign} with token {a.claim.token} ({a.reason})")
            case Register():
                parts.append(f"register {a.atsign}")
            case Deregister():
                parts.append(f"deregister {a.atsign} ({a.reason})")
            case RequestFailback():
                parts.append(f"ask {a.owner_node} to hand {a.atsign} back")
    parts.extend(notes)
    tail = f"holding {held} claim(s)" + (
        f", {waiting} vacant atSign(s) waiting on rank" if waiting else ""
    )
    if not parts:
        return f"nothing to do: {tail}"
    return "; ".join(parts) + f"; {tail}"
