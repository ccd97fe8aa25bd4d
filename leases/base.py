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
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leases.records import AtSignRecord, RecordEvent

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.monotonic`` unless a test drives it)."""

MAX_ATSIGN_CHARS = 55
"""at_commons limits an atSign (without its ``@``) to 55 characters."""

RESERVED_ATSIGN_CHARS = frozenset("!*'`();:&=+$,/?#[]{}")
"""Characters the atPlatform reserves (at_utils ``AtUtils.fixAtSign``)."""

ZERO_WIDTH_JOINER = "\u200d"


class LeaseError(Exception):
    """Base class of every error raised by a backend."""


class DCSUnavailable(LeaseError):
    """The DCS could not be reached or did not answer before the deadline."""


class SessionLost(LeaseError):
    """The node session expired or was revoked; nothing it held is held any more."""


class TimingError(ValueError):
    """A timing table violates the rules (see :class:`Timing`)."""


def atsign_problem(name: str) -> str | None:
    """Why ``name`` (lower case, without its ``@``) is not an atSign, or None if it is one.

    The atPlatform's rules (at_utils ``AtUtils.fixAtSign``): one ``@`` only, none of the
    reserved characters ``!*'`();:&=+$,/?#[]{}``, no white space, no ASCII or Unicode
    control characters, and not only dots (dots are ignored in atSigns, so ``@..`` names
    nothing). Stricter than the platform: no backslash and no other Unicode separator or
    control/format character (category Z or C, but the zero-width joiner of emoji
    sequences), so that an atSign is always one safe
    path component and one line of the at protocol. At most 55 characters.
    """
    if not name:
        return "empty"
    if len(name) > MAX_ATSIGN_CHARS:
        return f"longer than {MAX_ATSIGN_CHARS} characters"
    if set(name) <= {"."}:
        return "only dots (the atPlatform ignores dots, so it names nothing)"
    for ch in name:
        if ch == "@":
            return "more than one '@'"
        if ch in RESERVED_ATSIGN_CHARS or ch == "\\":
            return f"reserved character {ch!r}"
        if ch == ZERO_WIDTH_JOINER:  # joins emoji sequences, which atSigns may be
            continue
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ" or "\u2400" <= ch <= "\u2425":
            return f"character U+{ord(ch):04X} (white space or control) is not allowed"
    return None


def normalize_atsign(value: str) -> str:
    """``Alice`` / ``@alice`` → ``@alice``; raise ValueError saying why for anything else."""
    name = value.strip().lower()
    if name.startswith("@"):
        name = name[1:]
    problem = atsign_problem(name)
    if problem is not None:
        raise ValueError(f"not a valid atSign: {value!r}: {problem}")
    return "@" + name


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


@dataclass(frozen=True)
class Generation:
    """The latest recorded start of an atSign: outlives every claim (no lease, no session).

    ``token`` is the fencing token of that start, which is also the record's own revision
    (etcd mod_revision / Consul ModifyIndex), because the claim writes it in the same
    transaction. ``dir_id`` names the data directory (its history) the start used,
    ``prev`` the generation that directory held before it. ``accepted_by`` is set when an
    operator recorded a data directory's state (``supervisor data accept``) instead of a start.
    """

    atsign: str
    token: int
    node: str
    cloud: str = ""
    dir_id: str = ""
    prev: int = 0
    time: float = 0.0
    accepted_by: str = ""
    client: str = ""
    """The storage client instance that started it (see :class:`GenerationStamp`)."""
    session: str = ""
    """The session that claimed it: if that session still lives, its owner released the
    atSign on purpose (a handoff); if not, the owner was lost."""

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "cloud": self.cloud,
            "dir": self.dir_id,
            "prev": self.prev,
            "time": round(self.time, 3),
        }
        if self.accepted_by:
            out["accepted_by"] = self.accepted_by
        if self.client:
            out["client"] = self.client
        if self.session:
            out["session"] = self.session
        return out

    @classmethod
    def from_json_dict(cls, atsign: str, token: int, data: Mapping[str, Any]) -> Generation:
        return cls(
            atsign=atsign,
            token=token,
            node=str(data.get("node", "")),
            cloud=str(data.get("cloud", "")),
            dir_id=str(data.get("dir", "")),
            prev=int(data.get("prev", 0) or 0),
            time=float(data.get("time", 0.0) or 0.0),
            accepted_by=str(data.get("accepted_by", "")),
            client=str(data.get("client", "")),
            session=str(data.get("session", "")),
        )


@dataclass(frozen=True)
class GenerationStamp:
    """What a claim records as the atSign's new generation, in the claim's own transaction.

    ``expected``: the token of the generation record the caller checked its data directory
    against (0: there was no record). The claim fails (returns ``None``, a lost race) when
    the record is no longer that one, so the check and the claim are one atomic step.
    """

    expected: int
    dir_id: str
    prev: int
    cloud: str = ""
    client: str = ""
    """The storage client instance of the start (CephFS: ``client.a1/<global id>/<addr>``),
    so a node taking the atSign over can fence exactly that client."""


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
    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        """Atomically create the atSign's claim bound to this session.

        Returns the claim with a fresh fencing token, or ``None`` if another
        session holds it (lost the race). If *this* session already holds it,
        returns the existing claim. Raises :class:`SessionLost` if the session
        is lost and :class:`DCSUnavailable` if the DCS cannot be reached.

        With ``generation``, the same transaction also requires the atSign's generation
        record to be ``generation.expected`` (absent for 0) and replaces it with a new one
        whose token is the claim's token (``None`` when the record had changed: lost race).
        """

    @abc.abstractmethod
    async def publish_node(self, record: Mapping[str, Any]) -> None:
        """Write this node's record (``<prefix>/nodes/<node>``, JSON) bound to the session:
        it disappears when the session ends. Raises :class:`DCSUnavailable`."""

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

    async def revoke_session(self, session_id: str, timeout: float) -> None:
        """End a session by id, deleting its claims now (the fence does this for a dead
        supervisor once it stopped the node's workloads). A session that is gone already is
        not an error; raises :class:`DCSUnavailable` when the DCS cannot be reached and
        ``ValueError`` for an id this backend never issues."""
        raise NotImplementedError(f"{type(self).__name__} cannot revoke a session by id")

    @abc.abstractmethod
    async def owner(self, atsign: str) -> Claim | None:
        """The current claim of one atSign, or ``None``."""

    @abc.abstractmethod
    async def owners(self) -> dict[str, Claim]:
        """Every current claim, keyed by atSign."""

    @abc.abstractmethod
    async def generation(self, atsign: str) -> Generation | None:
        """The atSign's generation record, or ``None`` when it has none."""

    @abc.abstractmethod
    async def generations(self) -> dict[str, Generation]:
        """Every generation record, keyed by atSign."""

    @abc.abstractmethod
    async def accept_generation(
        self, atsign: str, expected: int, node: str, dir_id: str, prev: int
    ) -> Generation | None:
        """Record a data directory's state as the atSign's new generation (an operator's
        restore), only while nobody claims the atSign and the record is still ``expected``
        (0: absent). Returns the new record, ``None`` when that race was lost."""

    @abc.abstractmethod
    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Every live node record (:meth:`Session.publish_node`), keyed by node name."""

    @abc.abstractmethod
    async def atsign_records(self) -> tuple[dict[str, AtSignRecord], dict[str, str]]:
        """Every atSign record (``<prefix>/atsigns/``, see :mod:`leases.records`), keyed by
        atSign, and the problems of stored values that are not valid records (by key name;
        they count as absent). Raises :class:`DCSUnavailable`."""

    @abc.abstractmethod
    async def atsign_record(self, atsign: str) -> AtSignRecord | None:
        """One atSign's record (``None``: none, or a stored value that is not a valid
        record). Raises :class:`DCSUnavailable`."""

    @abc.abstractmethod
    async def write_atsign_records(
        self, put: Sequence[AtSignRecord], delete: Sequence[str] = ()
    ) -> None:
        """Write and delete atSign records, in transactions of at most
        :data:`leases.records.TXN_OPS` operations (each all-or-nothing; a failure part way
        leaves the earlier ones written: writing the same set again completes it). Raises
        :class:`DCSUnavailable` (also when the credential may not write the prefix)."""

    @abc.abstractmethod
    def watch_atsign_records(self) -> AsyncIterator[RecordEvent]:
        """AtSign record changes, forever, as :meth:`watch` does for claims: a RESYNC with
        every valid record first (and after a gap), then PUT/DELETE."""

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
