"""The work queue: which atSigns a cycle must look at, and when.

As client-go's rate-limited work queue: changes mark atSigns *dirty* (or everything, for a
resync); timers mark one atSign when due (a rank delay, an exclusion, a retry); an atSign
*busy* with a running action stays dirty until that action is done, so two cycles never
act on one atSign at once.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterable, KeysView


class WorkQueue:
    """Dirty atSigns, timers and busy marks of one node; ``wake`` is set on new work."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._all = True
        self._timers: list[tuple[float, str]] = []
        self._busy: dict[str, int] = {}

    def mark(self, atsigns: Iterable[str] | None) -> None:
        """Look at these atSigns (``None``: all) in a cycle, now."""
        if atsigns is None:
            self._all = True
        else:
            self._dirty.update(atsigns)
        self.wake.set()

    def later(self, atsign: str, at: float) -> None:
        """Look at ``atsign`` again at monotonic time ``at``."""
        heapq.heappush(self._timers, (at, atsign))
        self.wake.set()

    def retry(self, atsign: str, delay: float) -> None:
        """Look at ``atsign`` again after ``delay`` seconds."""
        self.later(atsign, self.clock() + delay)

    def next_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def take(self) -> set[str] | None:
        """The atSigns for the next cycle (``None``: all); busy ones stay for later."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            self._dirty.add(heapq.heappop(self._timers)[1])
        if self._all:
            self._all = False
            self._dirty.clear()
            return None
        ready = {a for a in self._dirty if a not in self._busy}
        self._dirty -= ready
        return ready

    @property
    def busy(self) -> KeysView[str]:
        return self._busy.keys()

    def enter(self, atsigns: Iterable[str]) -> None:
        for atsign in atsigns:
            self._busy[atsign] = self._busy.get(atsign, 0) + 1

    def leave(self, atsigns: Iterable[str]) -> None:
        for atsign in atsigns:
            left = self._busy.get(atsign, 1) - 1
            if left > 0:
                self._busy[atsign] = left
            else:
                self._busy.pop(atsign, None)
        if self._dirty:  # some waited while they were busy
            self.wake.set()
