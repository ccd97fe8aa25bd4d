"""The claim contract shared by every DCS backend.

A *node session* (one etcd lease, one Consul session) is kept alive by its own
renew loop. A *claim* binds one atSign to a session: at most one session holds
an atSign's claim at a time, and each new claim carries a fencing token strictly
greater than every earlier token of that atSign.

Contract, as in Patroni: a method returns ``None``/``False`` when it *lost a
race* (someone else holds the claim, the claim is no longer ours); it raises
:class:`DCSUnavailable` when the DCS could not be reached before the deadline.
No call ever waits longer than its deadline.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.monotonic`` unless a test drives it)."""

ATSIGN_RE = re.compile(r"^@[a-z0-9_\-.\u00a0-\uffff]{1,55}$")


class LeaseError(Exception):
    """Base class of every error raised by a backend."""


class DCSUnavailable(LeaseError):
    """The DCS could not be reached or did not answer before the deadline."""


class SessionLost(LeaseError):
    """The node session expired or was revoked; nothing it held is held any more."""


class TimingError(ValueError):
    """A timing table violates the rules (see :class:`Timing`)."""


def normalize_atsign(value: str) -> str:
    """``Alice`` / ``@alice`` → ``@alice``; raise ValueError on anything else."""
    name = value.strip().lower()
    if not name.startswith("@"):
        name = "@" + name
    if not ATSIGN_RE.match(name) or "/" in name:
        raise ValueError(f"not a valid atSign: {value!r}")
    return name


@dataclass(frozen=True)
class Timing:
    """The timing table of a node session, validated at construction.

    ``ttl``: the session's lifetime on the DCS after the last renewal.
    ``renew_interval``: time between renewals; at most ``ttl / 3``.
    ``renew_deadline``: when no renewal has succeeded for this long (local
    monotonic clock, counted from when the last successful renewal was *sent*)
    the owner must have stopped acting; ``renew_deadline + stop_budget < ttl``.
    ``stop_budget``: time allowed to stop workloads after the deadline.
    ``request_timeout``: deadline of every single DCS call.
    """

    ttl: float
    renew_interval: float
    renew_deadline: float
    stop_budget: float = 1.0
    request_timeout: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ttl", "renew_interval", "renew_deadline", "stop_budget", "request_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise TimingError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.renew_interval > self.ttl / 3:
            raise TimingError(
                f"renew_interval ({self.renew_interval}s) must be at most ttl/3 "
                f"({self.ttl / 3:.3g}s)"
            )
        if self.renew_deadline + self.stop_budget >= self.ttl:
            raise TimingError(
                f"renew_deadline + stop_budget ({self.renew_deadline}s + {self.stop_budget}s) "
                f"must be less than ttl ({self.ttl}s)"
            )
        if self.renew_deadline <= self.renew_interval:
            raise TimingError(
                f"renew_deadline ({self.renew_deadline}s) must be greater than renew_interval "
                f"({self.renew_interval}s), or one slow renewal self-fences the node"
            )
        if self.request_timeout >= self.renew_deadline:
            raise TimingError(
                f"request_timeout ({self.request_timeout}s) must be less than renew_deadline "
                f"({self.renew_deadline}s)"
            )

    @classmethod
    def for_ttl(cls, ttl: float, *, stop_budget: float | None = None) -> Timing:
        """A sensible table for ``ttl``: renew every ttl/6, deadline at ttl/2.

        Renewing every ttl/6 with a request timeout of ttl/10 (at most 1 s) leaves
        room for two scheduled renewals and a few retries before the deadline, so
        one slow answer does not self-fence the node.
        """
        budget = stop_budget if stop_budget is not None else min(2.0, ttl / 4)
        return cls(
            ttl=ttl,
            renew_interval=ttl / 6,
            renew_deadline=ttl / 2,
            stop_budget=budget,
            request_timeout=min(1.0, ttl / 10),
        )


class SessionState(enum.Enum):
    """Connection states, as in kazoo."""

    ALIVE = "alive"
    """The last renewal succeeded within ``renew_interval`` (plus the request timeout)."""
    SUSPENDED = "suspended"
    """Renewals are failing; the session may still live on the DCS. Do not start anything."""
    LOST = "lost"
    """The session is gone (expired, revoked, or past ``renew_deadline``). Hold nothing."""


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim says about its owner; stored with the claim as JSON."""

    node: str
    cloud: str = ""
    zone: str = ""
    address: str = ""
    port: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "cloud": self.cloud,
            "zone": self.zone,
            "address": self.address,
            "port": self.port,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ClaimInfo:
        return cls(
            node=str(data.get("node", "")),
            cloud=str(data.get("cloud", "")),
            zone=str(data.get("zone", "")),
            address=str(data.get("address", "")),
            port=int(data.get("port", 0) or 0),
            extra={str(k): str(v) for k, v in dict(data.get("extra") or {}).items()},
        )


@dataclass(frozen=True)
class Claim:
    """One atSign held by one node session, with its fencing token."""

    atsign: str
    token: int
    session_id: str
    info: ClaimInfo


class ClaimEventKind(enum.Enum):
    PUT = "put"
    """A claim was created or its info changed."""
    DELETE = "delete"
    """A claim was released or its session expired."""
    RESYNC = "resync"
    """The watch lost continuity and re-read everything: ``snapshot`` holds the full state."""


@dataclass(frozen=True)
class ClaimEvent:
    """One change seen by :meth:`Backend.watch`."""

    kind: ClaimEventKind
    atsign: str | None = None
    claim: Claim | None = None
    snapshot: Mapping[str, Claim] | None = None
    revision: int = 0


class Session(abc.ABC):
    """A node's session on the DCS, kept alive by its own renew loop.

    ``renew_deadline`` is the local monotonic time by which the owner must have
    stopped acting if no further renewal succeeds; it is counted from the moment
    the last *successful* renewal was sent. ``lost`` is set exactly once, when
    the session is known gone (the DCS said so, or the deadline passed).
    """

    node: str
    timing: Timing

    @property
    @abc.abstractmethod
    def session_id(self) -> str:
        """The backend's id of this session (etcd lease id in hex, Consul session UUID)."""

    @property
    @abc.abstractmethod
    def state(self) -> SessionState:
        """ALIVE, SUSPENDED or LOST, evaluated against the injected clock now."""

    @property
    @abc.abstractmethod
    def renew_deadline(self) -> float:
        """Monotonic time by which the owner must have stopped acting."""

    @property
    @abc.abstractmethod
    def lost(self) -> asyncio.Event:
        """Set once, when the session is lost; never cleared."""

    @abc.abstractmethod
    async def claim(self, atsign: str, info: ClaimInfo) -> Claim | None:
        """Atomically create the atSign's claim bound to this session.

        Returns the claim with a fresh fencing token, or ``None`` if another
        session holds it (lost the race). If *this* session already holds it,
        returns the existing claim. Raises :class:`SessionLost` if the session
        is lost and :class:`DCSUnavailable` if the DCS cannot be reached.
        """

    @abc.abstractmethod
    async def release(self, claim: Claim) -> bool:
        """Delete the claim only if it is still ours with the same token.

        Returns ``False`` if it was not ours any more (nothing was changed).
        """

    @abc.abstractmethod
    async def close(self, *, revoke: bool = True) -> None:
        """Stop renewing; with ``revoke`` also end the session on the DCS so its claims go now."""


class Backend(abc.ABC):
    """A DCS holding atSign claims under a key prefix. Use as an async context manager."""

    min_ttl: float = 0.0
    """The backend's smallest session TTL in seconds (etcd 2, Consul 10)."""

    def validate_timing(self, timing: Timing) -> None:
        """Raise :class:`TimingError` if ``timing`` cannot be honoured by this backend.

        The generic rules are checked by :class:`Timing` itself; this adds the
        backend's own (minimum TTL, whole seconds, ...). ``open_session`` calls it.
        """
        if timing.ttl < self.min_ttl:
            raise TimingError(
                f"ttl ({timing.ttl}s) is below the {type(self).__name__} minimum of "
                f"{self.min_ttl:g}s"
            )

    def failover_bound(self, timing: Timing) -> float:
        """Worst-case seconds from a holder's last renewal until another node can claim."""
        return timing.ttl

    @abc.abstractmethod
    async def open_session(self, node: str, timing: Timing) -> Session:
        """Create a node session and start its renew loop (after :meth:`validate_timing`).

        Raises :class:`TimingError` for a timing table the backend cannot honour
        and :class:`DCSUnavailable` if the DCS cannot be reached.
        """

    @abc.abstractmethod
    async def resume_session(self, node: str, timing: Timing, session_id: str) -> Session | None:
        """Re-attach to this node's existing session (e.g. after a supervisor restart).

        One renewal of ``session_id``; if the DCS confirms it (with the TTL of
        ``timing``), returns a running session whose deadline counts from when
        that renewal was sent. Returns ``None`` when the session is gone, the id
        is malformed, or its TTL on the DCS differs from ``timing.ttl``. Raises
        :class:`DCSUnavailable` when the DCS cannot be reached.
        """

    @abc.abstractmethod
    async def owner(self, atsign: str) -> Claim | None:
        """The current claim of one atSign, or ``None``."""

    @abc.abstractmethod
    async def owners(self) -> dict[str, Claim]:
        """Every current claim, keyed by atSign."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[ClaimEvent]:
        """Claim changes, forever: first a RESYNC with the full state, then PUT/DELETE.

        Survives reconnects and server restarts: resumes from the last seen
        revision/index, and after a gap it cannot bridge yields a new RESYNC.
        It never stops silently; it ends only when the consumer stops iterating.

        Events describe state, not every step: etcd delivers each change, but
        Consul's watch diffs successive reads, so changes that cancel out between
        two reads (a claim created and released while the consumer was not
        iterating) produce no event. Read it continuously and reconcile to the
        state it reports; use the tokens, not the event count.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections (sessions must be closed by their owners first)."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def monotonic() -> float:
    """The default clock."""
    return time.monotonic()
