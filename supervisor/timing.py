"""The node's timing table: defaults, the rules of ``leases.base.Timing``, backend minimums.

Rules (see docs/supervisor.md): ``renew_interval <= ttl/3``;
``renew_deadline + stop_budget < ttl``; etcd's lease TTL is at least 2 s (a
shorter one is silently raised by etcd, which would break the deadline
arithmetic), Consul's session TTL at least 10 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leases.base import Timing, TimingError

if TYPE_CHECKING:
    from supervisor.config import ConsulDCSConfig, SupervisorConfig, TimingConfig

BACKEND_MIN_TTL = {"etcd": 2.0, "consul": 10.0}

ETCD_ELECTION_ALLOWANCE = 3.0
"""Smallest renew_deadline with several etcd members: an election blocks renewals 1-2 s."""

FENCE_POLL_INTERVAL_MAX = 0.1
"""The fence checks the heartbeat at least this often (seconds)."""


def timing_from(t: TimingConfig) -> Timing:
    """The Timing of a ``timing:`` section: explicit fields, the rest from ``Timing.for_ttl``."""
    base = Timing.for_ttl(t.ttl) if t.ttl > 0 else None
    if base is None:
        raise TimingError(f"ttl must be a positive number of seconds, got {t.ttl!r}")
    return Timing(
        ttl=t.ttl,
        renew_interval=t.renew_interval if t.renew_interval is not None else base.renew_interval,
        renew_deadline=t.renew_deadline if t.renew_deadline is not None else base.renew_deadline,
        stop_budget=t.stop_budget if t.stop_budget is not None else base.stop_budget,
        request_timeout=(
            t.request_timeout if t.request_timeout is not None else base.request_timeout
        ),
    )


def build_timing(cfg: SupervisorConfig) -> Timing:
    """The Timing of a (validated) node config."""
    return timing_from(cfg.timing)


def _field_of(message: str) -> str:
    for name in ("renew_interval", "renew_deadline", "stop_budget", "request_timeout", "ttl"):
        if message.startswith(name) or message.startswith(f"renew_deadline + {name}"):
            return f"timing.{name}"
    return "timing"


def fence_poll_interval(timing: Timing) -> float:
    """How often the fence reads the heartbeat: a small part of the stop budget."""
    return min(FENCE_POLL_INTERVAL_MAX, timing.stop_budget / 5)


def timing_problems(backend: str, etcd_members: int, t: TimingConfig) -> list[tuple[str, str]]:
    """Every rule of the table and of the backend that ``t`` breaks, as (field, problem).

    ``backend`` is ``etcd`` or ``consul``; ``etcd_members`` the number of etcd endpoints.
    """
    out: list[tuple[str, str]] = []
    minimum = BACKEND_MIN_TTL[backend]
    if t.ttl < minimum:
        out.append(("timing.ttl", f"{backend} needs ttl >= {minimum:g}s, got {t.ttl:g}s"))
    if backend == "etcd" and t.ttl != int(t.ttl):
        out.append(("timing.ttl", f"etcd lease TTLs are whole seconds, got {t.ttl:g}s"))
    try:
        timing = timing_from(t)
    except TimingError as exc:
        return [*out, (_field_of(str(exc)), str(exc))]
    members = etcd_members
    if backend == "etcd" and members > 1 and timing.renew_deadline < ETCD_ELECTION_ALLOWANCE:
        field = "timing.renew_deadline" if t.renew_deadline else "timing.ttl"
        out.append(
            (
                field,
                f"with {members} etcd members a leader election (1-2 s) "
                f"must fit in renew_deadline, which is {timing.renew_deadline:g}s; use "
                f"renew_deadline >= {ETCD_ELECTION_ALLOWANCE:g}s (ttl >= "
                f"{2 * ETCD_ELECTION_ALLOWANCE:g}s with the default renew_deadline = ttl/2)",
            )
        )
    return out


def consul_check_problems(t: TimingConfig, dcs: ConsulDCSConfig) -> list[str]:
    """The rules of a Consul session bound to health checks (``dcs.consul.session_check_ttl``),
    as in :func:`leases.consul.session_check_problems`; nothing when it is not set or the
    table itself is invalid (reported on its own)."""
    from leases.consul import session_check_problems

    if dcs.session_check_ttl is None:
        return []
    try:
        timing = timing_from(t)
    except TimingError:
        return []
    return session_check_problems(timing, dcs.session_check_ttl, dcs.lock_delay)
