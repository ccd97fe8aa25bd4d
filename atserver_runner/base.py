"""One interface to start, stop, find and probe an atSign's atServer.

A runner never decides *whether* a workload should run; the supervisor does
that and hands the runner a :class:`WorkloadSpec` carrying the fencing token of
the claim it holds. Blocking SDK calls run in threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


class RunnerError(Exception):
    """A runner could not do what it was asked (with a message saying what and for which atSign)."""


def check_data_dir(data_root: Path | None, spec: WorkloadSpec) -> None:
    """RunnerError unless ``spec.data_dir`` lies inside ``data_root`` (when one is set)."""
    from atserver_runner.paths import PathEscape, ensure_within

    if data_root is None:
        return
    try:
        ensure_within(data_root, spec.data_dir, f"{spec.atsign}: data directory")
    except PathEscape as exc:
        raise RunnerError(f"{exc}: refusing to start") from None


@dataclass(frozen=True)
class ResourceLimits:
    """Optional limits; ``None`` means unlimited."""

    cpus: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything needed to start one atSign's atServer.

    ``command`` is used by the process runner (argv); ``image`` by the Docker
    runner. ``host``/``port`` is where clients reach it.
    """

    atsign: str
    node: str
    port: int
    data_dir: Path
    fencing_token: int
    host: str = "127.0.0.1"
    image: str | None = None
    command: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    limits: ResourceLimits = field(default_factory=ResourceLimits)


class WorkloadState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    """Exists (container/pid file) but is not running."""


@dataclass(frozen=True)
class Workload:
    """A workload the runner found, with what it was started with."""

    atsign: str
    node: str
    fencing_token: int
    host: str
    port: int
    state: WorkloadState
    ident: str
    """Container id, or ``pid:<pid>`` for the process runner."""
    started_at: float = 0.0
    """Wall-clock start time (epoch seconds) as the runtime reports it."""
    exit_code: int | None = None
    """For a STOPPED workload, its exit status when the runtime knows it."""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one at-protocol round trip."""

    healthy: bool
    detail: str
    latency_s: float = 0.0


@runtime_checkable
class Runner(Protocol):
    """Starts, stops, finds and probes atServers of one node."""

    node: str

    async def start(self, spec: WorkloadSpec) -> Workload:
        """Start the atSign's atServer; if one of this node is already running with the same
        token, return it. Raises :class:`RunnerError` when it cannot start."""
        ...

    async def stop(self, atsign: str, timeout: float = 10.0) -> bool:
        """Stop gracefully (SIGTERM), then kill after ``timeout``; remove it.

        Returns ``False`` if there was nothing to stop."""
        ...

    async def list(self) -> list[Workload]:
        """Every workload of this node that exists now, including ones started by an earlier
        supervisor process."""
        ...

    async def probe(self, atsign: str, timeout: float = 2.0) -> ProbeResult:
        """An at-protocol round trip over TLS to the atSign's atServer."""
        ...

    async def inspect(self, atsign: str) -> Workload | None:
        """The atSign's workload on this node now (running or exited), or ``None``."""
        ...

    def events(self) -> AsyncIterator[str]:
        """atSigns whose workload changed (exited, started, removed), as it happens; a
        consumer then :meth:`inspect` s them. Ends only when the consumer stops iterating."""
        ...
