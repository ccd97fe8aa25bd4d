"""An outside observer of which node answers for each atSign, and the intervals it implies.

:class:`CopyObserver` holds one TLS connection per (node, port) it is told to watch and asks
``info:brief`` on it every ``interval`` seconds; an answer names the atSign and fencing token
of the atServer behind that port (the dev atServer and the real one answer it before
authentication). No answer (refused, closed, timed out) is no sample. It knows nothing of
the system that placed the atServers, so it watches Docker Swarm and the supervisor alike.

The pure functions turn samples into answering intervals per (atSign, node), the intervals
with two or more nodes answering at once (double owners), and percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class Sample:
    """One answer: at wall time ``t`` the atServer on ``node``:``port`` served ``atsign``."""

    t: float
    node: str
    port: int
    atsign: str
    token: int


@dataclass(frozen=True)
class Interval:
    atsign: str
    node: str
    start: float
    end: float


@dataclass(frozen=True)
class Overlap:
    """While ``start``..``end``, ``nodes`` (two or more) all answered for ``atsign``."""

    atsign: str
    start: float
    end: float
    nodes: tuple[str, ...]

    @property
    def duration(self) -> float:
        return self.end - self.start


def answer_intervals(samples: Iterable[Sample], max_gap: float) -> list[Interval]:
    """Per (atSign, node): runs of samples no more than ``max_gap`` apart, as intervals from
    the first to the last sample of the run."""
    by_key: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        by_key.setdefault((s.atsign, s.node), []).append(s.t)
    out: list[Interval] = []
    for (atsign, node), times in sorted(by_key.items()):
        times.sort()
        start = prev = times[0]
        for t in times[1:]:
            if t - prev > max_gap:
                out.append(Interval(atsign, node, start, prev))
                start = t
            prev = t
        out.append(Interval(atsign, node, start, prev))
    return out


def overlaps(intervals: Iterable[Interval]) -> list[Overlap]:
    """The maximal spans in which two or more nodes answered for one atSign."""
    by_atsign: dict[str, list[Interval]] = {}
    for i in intervals:
        by_atsign.setdefault(i.atsign, []).append(i)
    out: list[Overlap] = []
    for atsign, runs in sorted(by_atsign.items()):
        events: list[tuple[float, int, str]] = []
        for r in runs:
            events.append((r.start, 1, r.node))
            events.append((r.end, -1, r.node))
        # ends before starts at the same instant: touching intervals do not overlap
        events.sort(key=lambda e: (e[0], e[1]))
        active: dict[str, int] = {}
        span_start: float | None = None
        span_nodes: set[str] = set()
        for t, delta, node in events:
            active[node] = active.get(node, 0) + delta
            if active[node] == 0:
                del active[node]
            if len(active) >= 2:
                if span_start is None:
                    span_start = t
                span_nodes |= set(active)
            elif span_start is not None:
                if t > span_start:
                    out.append(Overlap(atsign, span_start, t, tuple(sorted(span_nodes))))
                span_start = None
                span_nodes = set()
    return out


def covered(intervals: Iterable[Interval], atsign: str, lo: float, hi: float) -> float:
    """Seconds of ``lo``..``hi`` in which at least one node answered for ``atsign``."""
    spans = sorted((max(i.start, lo), min(i.end, hi)) for i in intervals if i.atsign == atsign)
    total = 0.0
    cur_s: float | None = None
    cur_e = 0.0
    for s, e in spans:
        if e <= s:
            continue
        if cur_s is None or s > cur_e:
            if cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_s is not None:
        total += cur_e - cur_s
    return total


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float | int | None]:
    """n, p50, p99, max (seconds, rounded)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values) if values else None),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 2 digits; ``None`` when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


class CopyObserver:
    """Watches ``targets`` ((node, host, port) triples) every ``interval`` seconds; see the
    module docstring. Use :meth:`view` for the latest answers, :attr:`samples` for all."""

    def __init__(
        self,
        targets: Sequence[tuple[str, str, int]],
        ssl_ctx: ssl.SSLContext,
        *,
        interval: float = 0.2,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.targets = list(targets)
        self.ssl_ctx = ssl_ctx
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.samples: list[Sample] = []
        self._latest: dict[tuple[str, int], Sample] = {}
        self._host: dict[str, str] = {n: h for n, h, _ in self.targets}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for node, host, port in self.targets:
            self._tasks.append(asyncio.create_task(self._watch(node, host, port)))

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3 * self.timeout + 2)
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    def view(self, atsign: str, max_age: float | None = None) -> list[tuple[str, str, int]]:
        """(node, host, port) of every copy that answered for ``atsign`` within ``max_age``
        (default three intervals), in node order."""
        age = 3 * self.interval if max_age is None else max_age
        now = self.clock()
        return sorted(
            (s.node, self._host[s.node], s.port)
            for s in self._latest.values()
            if s.atsign == atsign and now - s.t <= age
        )

    def copies(self, atsigns: Iterable[str], max_age: float | None = None) -> dict[str, int]:
        return {a: len(self.view(a, max_age)) for a in atsigns}

    async def _watch(self, node: str, host: str, port: int) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(host, port, ssl=self.ssl_ctx, server_hostname=host),
                        self.timeout,
                    )
                    await self._read_prompt(conn[0])
                reader, writer = conn
                writer.write(b"info:brief\n")
                await asyncio.wait_for(writer.drain(), self.timeout)
                answer = await self._read_prompt(reader)
                info = json.loads(answer.strip().removeprefix("data:"))
                s = Sample(self.clock(), node, port, str(info["atSign"]), int(info["fencingToken"]))
                self.samples.append(s)
                self._latest[(node, port)] = s
            except (OSError, TimeoutError, ssl.SSLError, ValueError, KeyError, EOFError):
                self._latest.pop((node, port), None)
                if conn is not None:
                    conn[1].close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn[1].wait_closed(), 0.5)
                conn = None
            left = self.interval - (time.monotonic() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.01, left))
        if conn is not None:
            conn[1].close()

    async def _read_prompt(self, reader: asyncio.StreamReader) -> str:
        """Read until a line (or the buffer) ends with the ``@`` prompt; the text before."""
        buf = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), self.timeout)
            if not chunk:
                raise EOFError("closed")
            buf += chunk
            if len(buf) > MAX_ANSWER:
                raise ValueError("answer too long")
            if buf.endswith(b"@") and (buf == b"@" or buf[:-1].endswith(b"\n")):
                return buf[:-1].decode(errors="replace")
