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
    from supervisor.config import SupervisorConfig

BACKEND_MIN_TTL = {"etcd": 2.0, "consul": 10.0}

ETCD_ELECTION_ALLOWANCE = 3.0
"""Smallest renew_deadline with several etcd members: an election blocks renewals 1-2 s."""

FENCE_POLL_INTERVAL_MAX = 0.1
"""The fence checks the heartbeat at least this often (seconds)."""


def build_timing(cfg: SupervisorConfig) -> Timing:
    """The Timing of ``cfg``: explicit fields, the rest from ``Timing.for_ttl``."""
    t = cfg.timing
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


def _field_of(message: str) -> str:
    for name in ("renew_interval", "renew_deadline", "stop_budget", "request_timeout", "ttl"):
        if message.startswith(name) or message.startswith(f"renew_deadline + {name}"):
            return f"timing.{name}"
    return "timing"


def fence_poll_interval(timing: Timing) -> float:
    """How often the fence reads the heartbeat: a small part of the stop budget."""
    return min(FENCE_POLL_INTERVAL_MAX, timing.stop_budget / 5)


def validate_timing(cfg: SupervisorConfig, file: str) -> Timing:
    """Check the table and the backend's minimum TTL; raise ConfigError naming the field."""
    from supervisor.config import ConfigError

    minimum = BACKEND_MIN_TTL[cfg.dcs.backend]
    if cfg.timing.ttl < minimum:
        raise ConfigError(
            file,
            "timing.ttl",
            f"{cfg.dcs.backend} needs ttl >= {minimum:g}s, got {cfg.timing.ttl:g}s",
        )
    if cfg.dcs.backend == "etcd" and cfg.timing.ttl != int(cfg.timing.ttl):
        raise ConfigError(
            file, "timing.ttl", f"etcd lease TTLs are whole seconds, got {cfg.timing.ttl:g}s"
        )
    try:
        timing = build_timing(cfg)
    except TimingError as exc:
        raise ConfigError(file, _field_of(str(exc)), str(exc)) from None
    members = len(cfg.dcs.etcd.endpoints) if cfg.dcs.etcd is not None else 0
    if (
        cfg.dcs.backend == "etcd"
        and members > 1
        and timing.renew_deadline < ETCD_ELECTION_ALLOWANCE
    ):
        field = "timing.renew_deadline" if cfg.timing.renew_deadline else "timing.ttl"
        raise ConfigError(
            file,
            field,
            f"with {members} etcd members a leader election (1-2 s) "
            f"must fit in renew_deadline, which is {timing.renew_deadline:g}s; use "
            f"renew_deadline >= {ETCD_ELECTION_ALLOWANCE:g}s (ttl >= "
            f"{2 * ETCD_ELECTION_ALLOWANCE:g}s with the default renew_deadline = ttl/2)",
        )
    if cfg.timing.probe_interval >= timing.ttl:
        raise ConfigError(
            file,
            "timing.probe_interval",
            f"must be less than ttl ({timing.ttl:g}s), got {cfg.timing.probe_interval:g}s",
        )
    return timing
