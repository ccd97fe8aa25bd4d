"""Planned handoffs in flight, and the bounded history of finished ones.

A handoff is done when the atSign passes on another node (asked of Consul for that one
atSign, so the cost does not grow with the fleet), or when its time limit ran out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.registration import Registrar, RegistrationError

log = logging.getLogger("supervisor")

REPORTS_KEPT = 200
"""Finished handoff reports the daemon keeps (older ones are dropped)."""

STATUS_REPORTS = 50
"""Finished handoff reports ``/status`` returns unless asked for more."""

POLL_INTERVAL = 0.1
"""Seconds between Consul reads of an atSign while its handoff is in flight."""


@dataclass
class HandoffReport:
    """How one planned handoff went, as seen from the node that let go."""

    atsign: str
    reason: str
    started: float
    seq: int = 0
    """1, 2, 3, ... in the order the reports finished (clients page by it)."""
    to_node: str | None = None
    unavailable_s: float | None = None
    done: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "atsign": self.atsign,
            "reason": self.reason,
            "to_node": self.to_node,
            "unavailable_s": None if self.unavailable_s is None else round(self.unavailable_s, 3),
            "done": self.done,
            "note": self.note,
        }


class HandoffTracker:
    """In-flight handoffs and the latest finished ones; :meth:`run` finishes them."""

    def __init__(
        self,
        registrar: Registrar,
        *,
        limit: float,
        clock: Callable[[], float],
        on_done: Callable[[str], None],
    ) -> None:
        self.registrar = registrar
        self.limit = limit
        self.clock = clock
        self.on_done = on_done
        self.in_flight: dict[str, HandoffReport] = {}
        self.reports: deque[HandoffReport] = deque(maxlen=REPORTS_KEPT)
        self.total = 0
        self._wake = asyncio.Event()

    def start(self, report: HandoffReport) -> None:
        self.in_flight[report.atsign] = report
        self._wake.set()

    def finish(self, report: HandoffReport, note: str = "") -> None:
        if note:
            report.note = note
        self.in_flight.pop(report.atsign, None)
        report.done = True
        self.total += 1
        report.seq = self.total
        self.reports.append(report)
        log.info(
            "event=handoff-done atsign=%s to=%s unavailable_s=%s note=%r",
            report.atsign,
            report.to_node,
            report.unavailable_s,
            report.note,
        )
        self.on_done(report.atsign)

    def latest(self, count: int) -> list[dict[str, Any]]:
        return [r.to_json() for r in list(self.reports)[-count:]] if count > 0 else []

    async def check(self) -> None:
        """One look at every in-flight handoff."""

        async def one(report: HandoffReport) -> None:
            try:
                node = await self.registrar.passing_elsewhere(report.atsign)
            except RegistrationError:
                return
            now = self.clock()
            if node is not None:
                report.to_node = node
                report.unavailable_s = now - report.started
                self.finish(report)
            elif now - report.started > self.limit:
                self.finish(report, f"not passing elsewhere after {self.limit:g}s")

        await asyncio.gather(*(one(r) for r in list(self.in_flight.values())))

    async def run(self) -> None:
        while True:
            if not self.in_flight:
                self._wake.clear()
                await self._wake.wait()
            await self.check()
            await asyncio.sleep(POLL_INTERVAL)
