"""Probes of the running atServers: each once per ``probe_interval``, spread evenly.

Every atSign gets a fixed phase within the interval (a hash of its name), so a thousand
atServers are probed a few at a time, never in lock-step. Probes go over kept-open TLS
connections (:class:`atserver_runner.probe.ProbePool`) to the address the workload cache
holds, so a probe costs a round trip, not a handshake and a runner lookup. The Consul check
hears a result only when it changed or half its TTL passed (:meth:`Registrar.report_probe`).
A crash is not waited for here: the runner's events report it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable

from atserver_runner.base import ProbeResult, Runner
from atserver_runner.probe import ProbePool
from supervisor.metrics import SupervisorMetrics
from supervisor.registration import Registrar, RegistrationError
from supervisor.state import Health

log = logging.getLogger("supervisor")

TICK = 0.25
"""Probes due within this many seconds start together (fewer wake-ups of the loop)."""


def registration_gone(exc: RegistrationError) -> bool:
    """The agent no longer knows the check (500 "does not have associated TTL", 404)."""
    text = str(exc)
    return "does not have associated TTL" in text or "404" in text or "Unknown check" in text


class Prober:
    """Schedules and runs the probes; :attr:`health` holds each atSign's last result."""

    def __init__(
        self,
        runner: Runner,
        registrar: Registrar,
        *,
        interval: float,
        timeout: float,
        usable: Callable[[], bool],
        on_gone: Callable[[str], None],
        endpoint: Callable[[str], tuple[str, int] | None] | None = None,
        pool: ProbePool | None = None,
        concurrency: int = 32,
        clock: Callable[[], float] = time.monotonic,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.runner = runner
        self.registrar = registrar
        self.interval = interval
        self.timeout = timeout
        self.usable = usable
        self.on_gone = on_gone
        self.endpoint = endpoint
        self.pool = pool
        self.concurrency = concurrency
        self.clock = clock
        self.metrics = metrics
        self.health: dict[str, Health] = {}
        self.probes = 0
        self._tracked: set[str] = set()
        self._due: list[tuple[float, str]] = []
        self._phases: dict[str, float] = {}
        self._wake = asyncio.Event()

    def phase(self, atsign: str) -> float:
        phase = self._phases.get(atsign)
        if phase is None:
            digest = hashlib.blake2b(atsign.encode(), digest_size=4).digest()
            phase = self._phases[atsign] = int.from_bytes(digest, "big") / 2**32 * self.interval
        return phase

    def next_due(self, atsign: str, after: float) -> float:
        phase = self.phase(atsign)
        return phase + (math.floor((after - phase) / self.interval) + 1) * self.interval

    def track(self, atsign: str) -> None:
        """Probe ``atsign`` from now on (its first probe at its next slot)."""
        if atsign in self._tracked:
            return
        self._tracked.add(atsign)
        heapq.heappush(self._due, (self.next_due(atsign, self.clock()), atsign))
        self._wake.set()

    def untrack(self, atsign: str) -> None:
        self._tracked.discard(atsign)
        self._phases.pop(atsign, None)
        self.health.pop(atsign, None)
        if self.pool is not None:
            self.pool.forget(atsign)

    @property
    def tracked(self) -> frozenset[str]:
        return frozenset(self._tracked)

    async def probe(self, atsign: str) -> ProbeResult:
        """Probe now and tell Consul if that is due; never raises."""
        self.probes += 1
        where = self.endpoint(atsign) if self.endpoint is not None else None
        try:
            if where is not None and self.pool is not None:
                result = await self.pool.probe(
                    atsign, *where, timeout=self.timeout, expect_atsign=atsign
                )
            else:
                result = await self.runner.probe(atsign, timeout=self.timeout)
        except Exception as exc:
            result = ProbeResult(False, f"probe error: {exc!r}")
        self.health[atsign] = Health(result.healthy, result.detail, time.time())
        if self.metrics is not None:
            self.metrics.probes.labels("passing" if result.healthy else "failing").inc()
        if atsign in self.registrar.registered and self.usable():
            try:
                await self.registrar.report_probe(atsign, result.healthy, result.detail)
            except RegistrationError as exc:
                if self.metrics is not None:
                    self.metrics.consul_errors.labels("check").inc()
                log.warning("event=check-update-failed atsign=%s error=%s", atsign, exc)
                if registration_gone(exc):
                    # The agent lost the service (e.g. it restarted): register again.
                    self.registrar.registered.pop(atsign, None)
                    self.on_gone(atsign)
        return result

    async def run(self) -> None:
        """Start each due probe as its own task (bounded), one tick of slots at a time; a
        slow probe delays nobody else, and an atSign still being probed skips its slot."""
        sem = asyncio.Semaphore(self.concurrency)
        probing: set[str] = set()
        tasks: set[asyncio.Task[None]] = set()

        async def one(atsign: str) -> None:
            try:
                async with sem:
                    await self.probe(atsign)
            finally:
                probing.discard(atsign)

        try:
            while True:
                if not self._due:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = self.clock()
                horizon = now + TICK
                while self._due and self._due[0][0] <= horizon:
                    due, atsign = heapq.heappop(self._due)
                    if atsign not in self._tracked:
                        continue
                    # The next slot of its own phase (skipping any it fell behind on).
                    heapq.heappush(self._due, (self.next_due(atsign, max(due, now)), atsign))
                    if atsign in probing or not self.usable():
                        continue
                    probing.add(atsign)
                    task = asyncio.create_task(one(atsign), name=f"probe {atsign}")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                self._wake.clear()
                wait = max(TICK, (self._due[0][0] - self.clock()) if self._due else TICK)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
