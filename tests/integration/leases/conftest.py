"""One description per real backend, so the contract suite runs unchanged against both."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from leases import Backend, ClaimEvent, ClaimEventKind, Timing, open_backend
from testbed.process import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[3]

# Consul's floor is a 10 s TTL; a 1 s lock-delay keeps the takeover tests short.
CONSUL_LOCK_DELAY = 1.0
# 3 s rather than etcd's 2 s minimum: on a loaded 2-core machine a 2 s TTL leaves
# renewals only ~0.2 s per attempt, and the tests must not fail on scheduling noise.
ETCD_TTL = 3.0
CONSUL_TTL = 10.0


@dataclass
class DCS:
    """How a test reaches one real backend."""

    kind: str
    endpoints: list[str]
    prefix: str
    timing: Timing
    kill_bound: float
    """Seconds within which a SIGKILLed holder's claim must disappear."""
    takeover_wait: float
    """Extra seconds a standby may need before its claim succeeds (lock-delay)."""
    freeze: Callable[[], None]
    thaw: Callable[[], None]
    server: object
    backends: list[Backend] = field(default_factory=list)

    def make(self, **options: object) -> Backend:
        """A new backend (its own connections, like another node); closed after the test."""
        if self.kind == "etcd":
            backend = open_backend("etcd", endpoints=self.endpoints, prefix=self.prefix, **options)
        else:
            options.setdefault("lock_delay", CONSUL_LOCK_DELAY)
            options.setdefault("watch_wait", 2.0)
            backend = open_backend("consul", url=self.endpoints[0], prefix=self.prefix, **options)
        self.backends.append(backend)
        return backend

    def holder_argv(self, atsign: str) -> list[str]:
        argv = [sys.executable, "-m", "tests.integration.leases.holder", "--kind", self.kind]
        for e in self.endpoints:
            argv += ["--endpoint", e]
        argv += ["--prefix", self.prefix, "--atsign", atsign, "--ttl", str(self.timing.ttl)]
        argv += ["--lock-delay", str(CONSUL_LOCK_DELAY)]
        return argv


@pytest.fixture(params=["etcd", "consul"])
async def dcs(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[DCS]:
    """Each real backend in turn (servers from the testbed fixtures)."""
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd")
        d = DCS(
            kind="etcd",
            endpoints=etcd.endpoints,
            prefix=key_prefix,
            timing=Timing.for_ttl(ETCD_TTL),
            kill_bound=ETCD_TTL + 1.0,  # the bound: ttl + 1 s
            takeover_wait=1.0,
            freeze=etcd.freeze,
            thaw=etcd.thaw,
            server=etcd,
        )
    else:
        agent = request.getfixturevalue("consul_agent")
        d = DCS(
            kind="consul",
            endpoints=[agent.url],
            prefix=key_prefix,
            timing=Timing.for_ttl(CONSUL_TTL),
            # Consul may take up to 2*TTL to invalidate an unrenewed session.
            kill_bound=2 * CONSUL_TTL + 1.0,
            takeover_wait=CONSUL_LOCK_DELAY + 1.0,
            freeze=agent.freeze,
            thaw=agent.thaw,
            server=agent,
        )
    try:
        yield d
    finally:
        d.thaw()
        for backend in d.backends:
            with contextlib.suppress(Exception):
                await backend.close()


class EventLog:
    """Collects a backend's watch() in the background; tests wait for events in it."""

    def __init__(self, backend: Backend) -> None:
        self.events: list[tuple[float, ClaimEvent]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(backend))

    async def _run(self, backend: Backend) -> None:
        async for event in backend.watch():
            self.events.append((time.monotonic(), event))
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[ClaimEvent], bool], timeout: float, start: int = 0
    ) -> tuple[float, ClaimEvent]:
        """The first event from index ``start`` on that matches, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for at, event in self.events[seen:]:
                if predicate(event):
                    return at, event
            seen = max(seen, len(self.events))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._task.done():
                if self._task.done() and self._task.exception():
                    raise AssertionError("watch died") from self._task.exception()
                raise AssertionError(
                    f"no matching watch event within {timeout}s; saw "
                    f"{[(e.kind.value, e.atsign) for _, e in self.events]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def first_resync(self, timeout: float = 10.0) -> ClaimEvent:
        _, event = await self.wait_for(lambda e: e.kind is ClaimEventKind.RESYNC, timeout)
        return event

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


@pytest.fixture
async def watch_log() -> AsyncIterator[Callable[[Backend], EventLog]]:
    logs: list[EventLog] = []

    def start(backend: Backend) -> EventLog:
        log = EventLog(backend)
        logs.append(log)
        return log

    yield start
    for log in logs:
        await log.stop()


@pytest.fixture
def spawn_holder(tmp_path: Path) -> Iterator[Callable[[DCS, str], tuple[ManagedProcess, dict]]]:
    """Start a holder process for (dcs, atsign); return it and its claim line once it holds."""
    procs: list[ManagedProcess] = []

    def spawn(d: DCS, atsign: str) -> tuple[ManagedProcess, dict]:
        log_path = tmp_path / f"holder-{len(procs)}.log"
        proc = ManagedProcess("holder", d.holder_argv(atsign), log_path, cwd=REPO_ROOT)
        procs.append(proc)
        proc.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not proc.running():
                raise AssertionError(f"holder exited: {proc.log_tail()}")
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    data = json.loads(line)
                    if "token" in data:
                        return proc, data
                    raise AssertionError(f"holder failed: {line}")
            time.sleep(0.05)
        raise AssertionError(f"holder did not claim within 20 s: {proc.log_tail()}")

    try:
        yield spawn
    finally:
        for proc in procs:
            proc.stop()
