"""The fence: stops this node's atServers when the supervisor has not renewed in time.

``supervisor run`` starts ``supervisor fence`` as a companion process in its
own session (so a SIGKILL or SIGSTOP of the supervisor's process group does
not reach it). After every successful renewal the supervisor atomically
writes the session's renew deadline, in CLOCK_MONOTONIC seconds (system-wide
on Linux, so both processes share the clock), to a heartbeat file. The fence
polls it every ``min(0.1 s, stop_budget/5)``; once now >= deadline, or if the
file is missing or garbled (fail safe), it stops every workload of the node
through the runner (short SIGTERM grace, then SIGKILL) and writes one line per
workload to ``fence.log``. Since ``renew_deadline + stop_budget < ttl``, the
workloads are gone before the claims can expire on the DCS. A dead (SIGKILLed)
supervisor is treated like a frozen one: its workloads run until the deadline,
which lets a supervisor restarted in time resume the session and adopt them
(:mod:`supervisor.resume`); the claims cannot expire before that anyway.

The supervisor writes the heartbeat *before* it starts anything, and the
fence re-reads the heartbeat after listing workloads and before stopping
them, so a workload started under a fresh heartbeat is never fenced by a
stale one. The fence exits when its supervisor is gone and nothing runs, when the
supervisor shut down cleanly (state ``stopped``), or when a newer supervisor
(with its own fence) wrote the heartbeat after this fence started.

A supervisor that died (not one that shut down cleanly) leaves its DCS session behind,
and with it every claim until the session's TTL runs out (on Consul up to 2 x ttl). Once
the deadline has passed and nothing runs any more, the fence ends that session
(``release_session``, the id in the session record, unless a successor wrote it), so
standbys take over after the deadline instead of the TTL. Safe: the node acts on nothing
by then; a supervisor that resumes the session later finds it gone and opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atserver_runner.atomic_file import write_atomic
from atserver_runner.base import Runner, WorkloadState
from atserver_runner.proc_start import same_process, start_ticks
from supervisor.resume import load_record

log = logging.getLogger(__name__)

FENCE_EVENTS: dict[bool | None, str] = {True: "fenced", False: "already-gone", None: "fence-failed"}
"""The fence log's event per stop result: stopped it; found it exited since the list (it
ended before this entry's time); could not stop it."""

EXITED_EVENT = "found-exited"
"""The fence log's event for a workload already exited when the fence listed it after the
deadline (e.g. the new owner fenced the node's storage first): it ended before this entry's
time. Logged once per start; the record is left to the supervisor (it may be a start whose
process a later list adopts, which the fence then stops)."""

ENDED_EVENTS = frozenset({FENCE_EVENTS[True], FENCE_EVENTS[False], EXITED_EVENT})
"""Fence log events that say the workload had ended by the entry's ``wall`` time."""


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    deadline: float
    """CLOCK_MONOTONIC seconds by which the supervisor must have stopped acting."""
    written: float
    state: str = "running"
    """``running`` or ``stopped`` (clean shutdown: everything already stopped)."""


def write_heartbeat(path: Path, hb: Heartbeat) -> None:
    """Atomically replace the heartbeat file (write a temp file, then rename)."""
    # Not fsynced: the fence reads it through the page cache, and after a power loss
    # there is no workload left to fence.
    write_atomic(
        path,
        json.dumps(
            {"pid": hb.pid, "deadline": hb.deadline, "written": hb.written, "state": hb.state}
        ),
        durable=False,
    )


def read_heartbeat(path: Path) -> Heartbeat | None:
    """The heartbeat, or ``None`` when missing or garbled (the caller then fences)."""
    try:
        data = json.loads(path.read_text())
        return Heartbeat(
            pid=int(data["pid"]),
            deadline=float(data["deadline"]),
            written=float(data["written"]),
            state=str(data.get("state", "running")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Fence:
    """The fence loop for one node (see module docstring)."""

    def __init__(
        self,
        runner: Runner,
        heartbeat_path: Path,
        log_path: Path,
        *,
        supervisor_pid: int,
        poll_interval: float,
        kill_grace: float,
        session_record: Path | None = None,
        release_session: Callable[[str], Awaitable[None]] | None = None,
        session_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.session_record = session_record
        self.release_session = release_session
        self.session_ttl = session_ttl
        """How long after the deadline a record in another state than running (a start the
        supervisor did not finish) may keep the fence waiting to end the session: by then
        the session has expired anyway."""
        self.released: str | None = None
        """The session id the fence ended, if it did."""
        self.heartbeat_path = heartbeat_path
        self.log_path = log_path
        self.supervisor_pid = supervisor_pid
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self.clock = clock
        self.started = clock()
        self._sup_start = start_ticks(supervisor_pid)
        self._seen_exited: set[tuple[str, str]] = set()
        """Exited workloads already logged (atSign, runner ident)."""

    def _expired(self) -> tuple[bool, Heartbeat | None, str]:
        hb = read_heartbeat(self.heartbeat_path)
        if hb is None:
            return True, None, "heartbeat file missing or unreadable"
        now = self.clock()
        if now >= hb.deadline:
            return True, hb, f"renew deadline passed {now - hb.deadline:.3f}s ago"
        if hb.pid != self.supervisor_pid:
            return False, hb, ""  # another supervisor's heartbeat: its deadline rules
        if hb.state == "stopped":
            return True, hb, "supervisor shut down"
        # A dead supervisor's workloads keep running until its deadline: a supervisor
        # restarted by then resumes the session and adopts them (supervisor.resume).
        return False, hb, ""

    def _record(self, entry: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    async def check_once(self) -> int:
        """One poll: stop everything if the heartbeat is stale; return how many were stopped."""
        expired, hb, why = self._expired()
        if not expired:
            return 0
        listed = await self.runner.list()
        workloads = [w for w in listed if w.state is WorkloadState.RUNNING]
        exited = [
            w
            for w in listed
            if w.state is WorkloadState.STOPPED and (w.atsign, w.ident) not in self._seen_exited
        ]
        if not workloads and not exited:
            return 0
        expired, hb, why = self._expired()  # a fresh heartbeat may have come meanwhile
        if not expired:
            return 0
        deadline = hb.deadline if hb is not None else None
        seen = self.clock()
        for w in exited:
            self._seen_exited.add((w.atsign, w.ident))
            self._record(
                {
                    "event": EXITED_EVENT,
                    "node": w.node,
                    "atsign": w.atsign,
                    "fencing_token": w.fencing_token,
                    "exit_code": w.exit_code,
                    "reason": why,
                    "wall": time.time(),
                    "mono": seen,
                    "deadline": deadline,
                }
            )
            log.warning("fence: %s %s (token %s): %s", EXITED_EVENT, w.atsign, w.fencing_token, why)
        if not workloads:
            return 0

        async def stop(atsign: str) -> bool | None:
            """True: stopped; False: it was gone already (it exited since the list, e.g.
            its storage was fenced by the new owner); None: the stop failed."""
            try:
                return await self.runner.stop(atsign, timeout=self.kill_grace)
            except Exception as exc:
                log.error("fence: could not stop %s: %r", atsign, exc)
                return None

        started = self.clock()
        results = await asyncio.gather(*(stop(w.atsign) for w in workloads))
        done = self.clock()
        for w, ok in zip(workloads, results, strict=True):
            self._record(
                {
                    "event": FENCE_EVENTS[ok],
                    "node": w.node,
                    "atsign": w.atsign,
                    "fencing_token": w.fencing_token,
                    "reason": why,
                    "wall": time.time(),
                    "mono": done,
                    "deadline": deadline,
                    "stop_seconds": round(done - started, 3),
                }
            )
            log.warning(
                "fence: %s %s (token %s): %s", FENCE_EVENTS[ok], w.atsign, w.fencing_token, why
            )
        return sum(1 for ok in results if ok)

    def supervisor_alive(self) -> bool:
        return self._sup_start is not None and same_process(
            self.supervisor_pid, ticks=self._sup_start
        )

    def _dead_supervisors_session(self) -> str | None:
        """The session id our supervisor recorded, if the record is not a successor's.

        A supervisor writes the record when it opens (or resumes) its session, before its
        first heartbeat. So a record written no later than the heartbeat that still carries
        our supervisor's pid is our supervisor's; a newer one is a successor's, which is
        about to write its own heartbeat (same file system, same clock for both mtimes)."""
        if self.session_record is None:
            return None
        try:
            heartbeat_written = self.heartbeat_path.stat().st_mtime
            record_written = self.session_record.stat().st_mtime
        except OSError:
            return None
        hb = read_heartbeat(self.heartbeat_path)
        if hb is None or hb.pid != self.supervisor_pid or record_written > heartbeat_written:
            return None
        rec = load_record(self.session_record)
        return rec.session_id if rec is not None else None

    async def _release_due(self, hb: Heartbeat | None) -> bool:
        """After the deadline of a supervisor that died: end its session (once). True while
        the fence should keep polling for it (the deadline has not passed yet)."""
        if self.release_session is None or self.released or hb is None:
            return False
        if hb.pid != self.supervisor_pid or hb.state == "stopped":
            return False
        if self.clock() < hb.deadline:
            return True
        sid = self._dead_supervisors_session()
        if sid is None:
            return False
        try:
            await self.release_session(sid)
        except Exception as exc:  # best effort: the TTL ends it anyway
            log.warning("event=fence-release-failed session=%s error=%r", sid, exc)
            return False
        self.released = sid
        self._record(
            {"event": "session-released", "session": sid, "wall": time.time(), "mono": self.clock()}
        )
        log.warning("event=fence-released-session session=%s (its supervisor died)", sid)
        return False

    async def run(self) -> None:
        """Poll until the supervisor is gone (or stopped cleanly) and nothing runs."""
        while True:
            try:
                await self.check_once()
            except Exception as exc:  # keep fencing whatever happens
                log.error("fence: check failed: %r", exc)
            hb = read_heartbeat(self.heartbeat_path)
            if (
                hb is not None
                and hb.pid != self.supervisor_pid
                and hb.written > self.started
                and self.clock() < hb.deadline
            ):
                log.info("fence: supervisor %s took over the heartbeat: exiting", hb.pid)
                return
            clean = hb is not None and hb.state == "stopped" and hb.pid == self.supervisor_pid
            if clean or not self.supervisor_alive():
                with contextlib.suppress(Exception):
                    listed = await self.runner.list()
                    running = [w for w in listed if w.state is WorkloadState.RUNNING]
                    # The session only once nothing is listed at all: a record in another
                    # state may be a start the supervisor did not finish (its process not
                    # found yet), which a later pass adopts and stops.
                    if clean:
                        keep = False
                    elif listed:
                        keep = hb is not None and self.clock() < hb.deadline + self.session_ttl
                    else:
                        keep = await self._release_due(hb)
                    if not running and not keep:
                        log.info(
                            "fence: supervisor %s gone, nothing runs: exiting", self.supervisor_pid
                        )
                        return
            await asyncio.sleep(self.poll_interval)
