"""Workload histories from the atServers' own logs, the fences' logs and the harness's kills.

Every dev atServer logs (``--log-json``) ``listening`` with its fencing token when it starts
serving and ``stopped`` when it stops; the process runner appends them to
``<node state>/workloads/logs/<atsign>.log``. A SIGKILLed atServer logs nothing, so its end
is the earliest other evidence: the node fence's ``fence.log`` line (written after the stop
completed) or the harness's own record of the kill (:class:`chaos.checker.FaultRecord`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chaos.checker import FaultRecord, Instance
from supervisor.fence import ENDED_EVENTS


@dataclass(frozen=True)
class NodeLogs:
    node: str
    workload_logs: Path
    fence_log: Path


@dataclass
class _Open:
    atsign: str
    node: str
    token: int
    start: float


def _json_lines(path: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float | str) else 0.0


def _close(
    run: _Open,
    end: float | None,
    source: str,
    fenced: dict[tuple[str, int], list[float]],
    kills: dict[tuple[str, str], list[float]],
) -> Instance:
    """The instance with the earliest evidence of its end (``None`` without any)."""
    candidates = [(end, source)] if end is not None else []
    candidates += [
        (t, "fence.log") for t in fenced.get((run.atsign, run.token), []) if t >= run.start
    ]
    candidates += [
        (t, "harness kill") for t in kills.get((run.node, run.atsign), []) if t >= run.start
    ]
    if not candidates:
        return Instance(run.atsign, run.node, run.token, run.start, None)
    when, why = min(candidates)
    return Instance(run.atsign, run.node, run.token, run.start, when, why)


def collect_instances(nodes: Sequence[NodeLogs], faults: Iterable[FaultRecord]) -> list[Instance]:
    """Every atServer instance of every node, with the earliest evidence of its end."""
    kills: dict[tuple[str, str], list[float]] = {}
    for f in faults:
        for node, atsign, when in f.killed:
            kills.setdefault((node, atsign), []).append(when)
    instances: list[Instance] = []
    for n in nodes:
        fenced: dict[tuple[str, int], list[float]] = {}
        for e in _json_lines(n.fence_log):
            if e.get("event") in ENDED_EVENTS:  # ended by then either way
                key = (str(e.get("atsign")), int(_num(e.get("fencing_token"))))
                fenced.setdefault(key, []).append(_num(e.get("wall")))
        for log in sorted(n.workload_logs.glob("*.log")):
            current: _Open | None = None
            for e in _json_lines(log):
                ev = e.get("event")
                ts = _num(e.get("ts"))
                if ev == "listening":
                    if current is not None:
                        # A new start without a 'stopped': the old one was killed. The runner
                        # never starts a second copy on a node, so the next start bounds it.
                        instances.append(
                            _close(current, ts, "next start on the node", fenced, kills)
                        )
                    current = _Open(
                        str(e.get("atsign")), n.node, int(_num(e.get("fencing_token"))), ts
                    )
                elif ev == "stopped" and current is not None:
                    instances.append(_close(current, ts, "stopped event", fenced, kills))
                    current = None
            if current is not None:
                instances.append(_close(current, None, "", fenced, kills))
    return instances
