"""The decision of one cycle: a pure function from an immutable snapshot to a plan.

Nothing here does I/O. :func:`decide` looks at the claims on the DCS, this
node's workloads and registrations, and says what to do, with a sentence
that says why. The daemon (:mod:`supervisor.daemon`) builds the snapshot,
executes the plan and logs the sentence.

Its cost grows with what changed: a snapshot names the ``dirty`` atSigns (those
whose claim, workload, registration or timer changed) and only those are looked
at; ``dirty=None`` (a resync) looks at everything. Atsigns ``busy`` with an
action of an earlier, still running cycle are left alone.

Rules:
- a workload runs only while this node's session holds its claim, with the
  claim's fencing token; anything else is fenced (deregister, then stop);
- when the session is lost or past its renew deadline, everything is fenced,
  without asking the DCS;
- while the DCS cannot be read (or the session is suspended) nothing new is
  started and nothing is stopped before the deadline;
- a vacant atSign of the inventory is claimed after ``rank * rank_delay``
  (see :mod:`supervisor.placement`) if capacity allows and the node is not
  draining, excluded from it (just handed it off) or refused it (the data guard
  found this node's data dir is not the atSign's latest);
- draining hands off ``drain_concurrency`` atSigns at a time; an explicit
  handoff at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
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
    last_session: str | None = None
    """The last owner's session: still alive (its node record says so) means it released
    the claim (a handoff); gone means it was lost (the storage fence is needed)."""


@dataclass(frozen=True)
class PlacementSettings:
    capacity: int = 1000
    rank_delay: float = 0.5
    prefer_other_cloud: bool = True
    failback: str = "manual"
    failback_interval: float = 10.0
    drain_concurrency: int = 8


@dataclass(frozen=True)
class Snapshot:
    """Everything one cycle may look at, taken once at its start (read-only views)."""

    now: float
    me: NodeRef
    session_state: SessionState
    session_id: str | None
    renew_deadline: float
    claims: Mapping[str, Claim] | None
    """Every claim on the DCS, or ``None`` before the first list (or when unreadable)."""
    workloads: Mapping[str, Workload]
    registered: Set[str]
    inventory: Mapping[str, AtSignPolicy]
    nodes: Sequence[NodeRef]
    vacancies: Mapping[str, Vacancy] = field(default_factory=dict)
    draining: bool = False
    handoffs: Set[str] = frozenset()
    in_flight: Set[str] = frozenset()
    """Handed off, not yet passing elsewhere (they count against ``drain_concurrency``)."""
    excluded: Mapping[str, float] = field(default_factory=dict)
    refused: Set[str] = frozenset()
    """atSigns the data guard refused here (this node's data dir is not their latest)."""
    failback_asked: Mapping[str, float] = field(default_factory=dict)
    settings: PlacementSettings = field(default_factory=PlacementSettings)
    held: Mapping[str, Claim] | None = None
    """This session's claims (derived from ``claims`` when not given)."""
    dirty: Set[str] | None = None
    """The atSigns to look at; ``None``: all of them (a resync)."""
    busy: Set[str] = frozenset()
    """atSigns with an action still running; left alone by this cycle."""
    claiming: int = 0
    """Claims being made by running actions (they count against ``capacity``)."""
    storage_ready: bool = True
    """``runner.data_root`` passes its readiness probe (else nothing is claimed)."""
    storage_leave: bool = False
    """The storage failed here but works on other nodes: hand off everything."""
    inventory_synced: bool = True
    """The inventory is known (``inventory.source: dcs``: the records were listed once)."""


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
    retire: bool = False
    """The atSign left the inventory: nobody takes it, so no exclusion and no handoff report
    (its data stays where it is)."""


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
    """When the first waiting atSign is due (a rank delay, an exclusion, a failback pause)."""
    waiting: tuple[tuple[float, str], ...] = ()
    """(monotonic time, atSign): look at these again then."""


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


def _scope(s: Snapshot, mine: Mapping[str, Claim], claims: Mapping[str, Claim]) -> set[str]:
    if s.dirty is not None:
        return set(s.dirty) - set(s.busy)
    everything = set(s.workloads) | set(mine) | set(s.registered) | set(s.inventory)
    if s.settings.failback == "auto":
        everything |= set(claims)
    return everything - set(s.busy)


def _drain_picks(s: Snapshot, mine: Mapping[str, Claim], leaving: set[str]) -> set[str]:
    """The next atSigns a draining node hands off: up to ``drain_concurrency`` at a time."""
    moving = set(s.in_flight) | (set(s.busy) & set(mine))
    slots = s.settings.drain_concurrency - len(moving)
    picks: set[str] = set()
    if slots <= 0:
        return picks
    for atsign in mine:  # the claims in their order: no sort, no full scan once slots fill
        if atsign in s.busy or atsign in leaving or atsign in moving:
            continue
        picks.add(atsign)
        if len(picks) >= slots:
            break
    return picks


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

    if not s.inventory_synced:
        return Plan(
            (),
            f"inventory not listed yet (atSign records, live nodes): holding "
            f"{len(s.workloads)} workload(s), "
            "starting nothing",
        )

    claims = s.claims
    mine = (
        s.held
        if s.held is not None
        else {a: c for a, c in claims.items() if c.session_id == s.session_id}
    )
    scope = _scope(s, mine, claims)
    actions: list[Action] = []
    notes: list[str] = []
    waiting: list[tuple[float, str]] = []
    leaving = {a for a in s.handoffs if a in mine and a not in s.busy}
    leaving |= {a for a in scope if a in mine and a not in s.inventory}
    if s.draining:
        leaving |= _drain_picks(s, mine, leaving)
    if s.storage_leave:
        leaving |= {a for a in mine if a not in s.busy}

    # 1. Everything this node runs or holds.
    for atsign in sorted(scope | leaving):
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
                else "handoff requested"
                if atsign in s.handoffs
                else "storage not ready here"
                if s.storage_leave and not s.draining
                else "draining"
            )
            if w is not None:
                actions.append(HandOff(atsign, c, reason, retire=atsign not in s.inventory))
            else:
                actions.append(Release(atsign, c, reason))
            continue
        if w is None and atsign in s.in_flight:
            continue  # handed off and released: the claims watch has not seen it yet
        if w is None:
            actions.append(Start(atsign, c, "claim held, nothing running"))
        elif w.fencing_token != c.token:
            actions.append(Fence(atsign, f"runs token {w.fencing_token}, claim has {c.token}"))
        elif not _running(w):
            actions.append(Start(atsign, c, "workload exited"))
        elif atsign not in s.registered:
            actions.append(Register(atsign, c, w))

    # 2. Registrations without a workload.
    for atsign in sorted(a for a in scope if a in s.registered and a not in s.workloads):
        actions.append(Deregister(atsign, "nothing runs here"))

    # 3. Vacant atSigns this node may take.
    held = len(mine) - len(leaving) + s.claiming
    refused = sum(1 for a in s.refused if a not in claims)
    if not s.storage_ready:
        notes.append("storage not ready: claiming nothing")
    if not s.draining and s.storage_ready:
        ready: list[tuple[float, str, int]] = []
        for atsign in scope:
            policy = s.inventory.get(atsign)
            if policy is None or atsign in claims or atsign in s.workloads:
                continue
            until = s.excluded.get(atsign, float("-inf"))
            if until > s.now:
                waiting.append((until, atsign))
                continue
            if atsign in s.refused:
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
                waiting.append((at, atsign))
        for _at, atsign, rank in sorted(ready):
            if held >= s.settings.capacity:
                notes.append(f"at capacity ({s.settings.capacity}), not claiming {atsign}")
                break
            seen = s.vacancies.get(atsign)
            last = f", last owner {seen.last_node}" if seen and seen.last_node else ""
            actions.append(ClaimAndStart(atsign, rank, f"vacant, rank {rank}{last}"))
            held += 1

    # 4. Failback to this node when it is explicitly preferred (auto policy).
    if s.settings.failback == "auto" and not s.draining and s.storage_ready:
        for atsign in sorted(scope):
            c = claims.get(atsign)
            wish = s.inventory.get(atsign)
            if c is None or wish is None or c.session_id == s.session_id:
                continue
            if held >= s.settings.capacity:
                break
            owner = NodeRef(c.info.node, c.info.cloud)
            if not better_placed(s.me, owner, wish):
                continue
            asked = s.failback_asked.get(atsign, float("-inf"))
            if s.now - asked < s.settings.failback_interval:
                waiting.append((asked + s.settings.failback_interval, atsign))
                continue
            actions.append(RequestFailback(atsign, c.info.node, c.info.extra.get("api")))

    rank_waits = sum(1 for at, a in waiting if a not in s.excluded and a in s.vacancies)
    sentence = describe(actions, notes, len(mine), rank_waits, refused)
    wake_at = min((at for at, _ in waiting), default=None)
    return Plan(tuple(actions), sentence, wake_at, tuple(waiting))


SENTENCE_PARTS = 12
"""A sentence names at most this many actions; the rest are counted (a start of a thousand
atSigns is one readable line, not 200 KB)."""


def shorten(parts: Sequence[str], limit: int = SENTENCE_PARTS) -> list[str]:
    """At most ``limit`` parts: failures and refusals always in full, the first of the
    others, and a count of the rest by what they do (the words before their atSign)."""
    if len(parts) <= limit:
        return list(parts)
    loud = [p for p in parts if " failed" in p or p.startswith(("refused ", "could not "))]
    quiet = [p for p in parts if p not in loud]
    keep = max(0, limit - 1 - len(loud))
    counts: dict[str, int] = {}
    for part in quiet[keep:]:
        kind = part.split("@", 1)[0].strip() or "other"
        counts[kind] = counts.get(kind, 0) + 1
    rest = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    return [*quiet[:keep], *loud, f"and {len(quiet) - keep} more ({rest})"]


def describe(
    actions: Sequence[Action], notes: Sequence[str], held: int, waiting: int, refused: int = 0
) -> str:
    """One sentence for the log: what the plan does and why."""
    parts: list[str] = []
    for a in actions:
        match a:
            case Fence():
                parts.append(f"fence {a.atsign} ({a.reason})")
            case HandOff() if a.retire:
                parts.append(f"stop and release {a.atsign} ({a.reason})")
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
    parts = shorten(parts)
    parts.extend(notes)
    tail = f"holding {held} claim(s)" + (
        f", {waiting} vacant atSign(s) waiting on rank" if waiting else ""
    )
    if refused:
        tail += f", {refused} vacant atSign(s) refused for stale data here"
    if not parts:
        return f"nothing to do: {tail}"
    return "; ".join(parts) + f"; {tail}"
