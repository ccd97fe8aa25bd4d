"""This node's workloads, kept from the runner's events plus a rare full list.

The supervisor updates the cache itself after every start and stop; the runner's events
(a process's pidfd, Docker's event stream) report a crash the moment it happens; the full
list (:meth:`WorkloadCache.refresh`, at start and every resync) catches anything missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from atserver_runner.base import Runner, Workload
from supervisor.metrics import SupervisorMetrics

log = logging.getLogger("supervisor")


def _same(a: Workload | None, b: Workload | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.ident, a.state, a.fencing_token, a.port) == (
        b.ident,
        b.state,
        b.fencing_token,
        b.port,
    )


class WorkloadCache:
    """atSign -> the workload the runner reports; listeners hear which atSigns changed."""

    def __init__(
        self,
        runner: Runner,
        on_change: Callable[[set[str]], None],
        *,
        retry_interval: float = 1.0,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.runner = runner
        self.on_change = on_change
        self.retry_interval = retry_interval
        self.metrics = metrics
        self.items: dict[str, Workload] = {}
        self.events = 0
        self._versions: dict[str, int] = {}
        """atSign -> how often the supervisor put or dropped it (a start, a stop)."""

    async def refresh(self) -> set[str]:
        """List everything (the runner's full view); return the atSigns that changed.

        An atSign the supervisor started or stopped while the list was on its way keeps
        what the supervisor put there: the list is older than that."""
        before = dict(self._versions)
        found = {w.atsign: w for w in await self.runner.list()}
        moved = {a for a, v in self._versions.items() if before.get(a) != v}
        for a in moved:
            found.pop(a, None)
            if a in self.items:
                found[a] = self.items[a]
        changed = {
            a
            for a in self.items.keys() | found.keys()
            if not _same(self.items.get(a), found.get(a))
        }
        self.items = found
        return changed

    def put(self, w: Workload) -> None:
        self.items[w.atsign] = w
        self._bump(w.atsign)

    def drop(self, atsign: str) -> None:
        self.items.pop(atsign, None)
        self._bump(atsign)

    def _bump(self, atsign: str) -> None:
        self._versions[atsign] = self._versions.get(atsign, 0) + 1

    async def update(self, atsign: str) -> bool:
        """Look at one atSign's workload again; True if it changed. (Nothing changes if the
        supervisor started or stopped it meanwhile: the runner's answer is older.)"""
        version = self._versions.get(atsign)
        w = await self.runner.inspect(atsign)
        if self._versions.get(atsign) != version:
            return False
        old = self.items.get(atsign)
        if w is None:
            self.items.pop(atsign, None)
        else:
            self.items[atsign] = w
        return not _same(old, w)

    async def run(self) -> None:
        """Follow the runner's events (if it has them), retrying after an error."""
        if not hasattr(self.runner, "events"):
            return
        while True:
            try:
                async for atsign in self.runner.events():
                    self.events += 1
                    if await self.update(atsign):
                        self.on_change({atsign})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event=runner-events-failed error=%r", exc)
            await asyncio.sleep(self.retry_interval)
