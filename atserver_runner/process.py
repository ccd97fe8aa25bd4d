"""Run atServers as plain processes: for hosts without Docker and for large local tests.

Each workload runs in its own session and process group (``start_new_session``), so it
outlives the supervisor that started it and a stop signals exactly its group. Its output
goes to ``<state_dir>/logs/<atsign>.log``; ``<state_dir>/<atsign>.json`` records the PID
together with the process's create time, so :meth:`ProcessRunner.list` finds workloads
again after a supervisor restart and never mistakes a recycled PID for one of them.
That file is first written *before* the process is spawned, with a nonce that is also put
in the process's environment: if the supervisor dies between spawning and recording the
PID, the next ``list()`` (e.g. by the fence) still finds the process through the nonce.

:meth:`ProcessRunner.events` reports an exit the moment it happens: a pidfd per running
workload (``os.pidfd_open``, which works for processes that are not our children too, such
as those adopted after a restart) becomes readable when the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from atserver_runner.atomic_file import write_atomic
from atserver_runner.base import (
    ProbeResult,
    RunnerError,
    Workload,
    WorkloadSpec,
    WorkloadState,
    check_data_dir,
)
from atserver_runner.probe import probe_atserver, probe_ssl_context
from atserver_runner.proc_start import same_process, start_ticks

EXIT_STATUS_WAIT_S = 1.0
ADOPT_SLACK_S = 5.0
NONCE_ENV = "ATFAILOVER_WORKLOAD_NONCE"
"""Set in every workload's environment to the nonce of its pid file (see ``_adopt``)."""


def safe_name(atsign: str) -> str:
    """A file/container-name-safe form of an atSign (``@alice`` -> ``alice``)."""
    bare = atsign.lstrip("@")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", bare)
    if safe != bare or not safe:
        safe = f"{safe}-{hashlib.sha256(bare.encode()).hexdigest()[:8]}"
    return safe


@dataclass(frozen=True)
class _PidRecord:
    atsign: str
    node: str
    pid: int
    create_time: float
    fencing_token: int
    host: str
    port: int
    argv: list[str]
    nonce: str = ""
    """Unique per start; also in the workload's environment (``NONCE_ENV``)."""
    start_ticks: int = 0
    """The process's start in clock ticks since boot (0: unknown, an older record): what
    tells it from a later process with its PID (see :mod:`atserver_runner.proc_start`)."""

    @property
    def pending(self) -> bool:
        """Written before the process was spawned; the PID is not known yet."""
        return self.pid <= 0

    @classmethod
    def load(cls, path: Path) -> _PidRecord:
        raw: dict[str, Any] = json.loads(path.read_text())
        return cls(
            atsign=str(raw["atsign"]),
            node=str(raw["node"]),
            pid=int(raw["pid"]),
            create_time=float(raw["create_time"]),
            fencing_token=int(raw["fencing_token"]),
            host=str(raw["host"]),
            port=int(raw["port"]),
            argv=[str(a) for a in raw.get("argv", [])],
            nonce=str(raw.get("nonce", "")),
            start_ticks=int(raw.get("start_ticks", 0) or 0),
        )


class ProcessRunner:
    """Starts, stops, finds and probes atServer processes of one node.

    ``state_dir`` must be private to this node (two nodes never share it).
    ``probe_ca``: verify probes against this CA; by default probes skip certificate checks
    (a local liveness check, not an identity check). ``data_root``: when given, a spec whose
    data directory is not inside it is refused before anything is created.
    """

    def __init__(
        self,
        node: str,
        state_dir: Path,
        *,
        probe_ca: Path | None = None,
        inherit_env: bool = True,
        data_root: Path | None = None,
    ) -> None:
        self.node = node
        self.data_root = data_root
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.inherit_env = inherit_env
        self._probe_ssl: ssl.SSLContext = probe_ssl_context(probe_ca)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._watch: Callable[[str, int], None] | None = None
        """Set while :meth:`events` runs: watch (atSign, pid) for its exit (thread-safe)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def pid_file(self, atsign: str) -> Path:
        return self.state_dir / f"{safe_name(atsign)}.json"

    def log_file(self, atsign: str) -> Path:
        return self.log_dir / f"{safe_name(atsign)}.log"

    # --- finding -----------------------------------------------------------------------------

    def _adopt(self, rec: _PidRecord) -> _PidRecord:
        """Complete a pending record (the runner that wrote it died between spawning the
        process and recording its PID) by finding the process whose environment carries the
        record's nonce among processes created since the record was written."""
        if not rec.pending or not rec.nonce:
            return rec
        for proc in psutil.process_iter(["pid", "create_time"]):
            created = float(proc.info.get("create_time") or 0.0)
            # psutil derives create times from a boot time in whole seconds: compare loosely
            # (the nonce is what identifies the process; this only skips older ones).
            if created < rec.create_time - ADOPT_SLACK_S:
                continue
            try:
                if proc.environ().get(NONCE_ENV) != rec.nonce:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            found = _PidRecord(
                **{
                    **rec.__dict__,
                    "pid": proc.pid,
                    "create_time": created,
                    "start_ticks": start_ticks(proc.pid) or 0,
                }
            )
            write_atomic(self.pid_file(rec.atsign), json.dumps(found.__dict__))
            return found
        return rec

    def _alive(self, rec: _PidRecord) -> bool:
        """The recorded process is running, is the one we started, and is not a zombie."""
        if rec.pending:
            return False
        child = self._children.get(rec.pid)
        if child is not None and child.poll() is not None:
            return False
        # Not the same start: the PID was recycled by an unrelated process.
        return same_process(rec.pid, ticks=rec.start_ticks, create_time=rec.create_time)

    def _workload(self, rec: _PidRecord) -> Workload:
        alive = self._alive(rec)
        child = self._children.get(rec.pid)
        if not alive and child is not None and child.poll() is None:
            # A zombie leader whose other threads are still exiting: not reapable for a
            # moment yet, but its exit status is about to be known.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=EXIT_STATUS_WAIT_S)
        return Workload(
            atsign=rec.atsign,
            node=rec.node,
            fencing_token=rec.fencing_token,
            host=rec.host,
            port=rec.port,
            state=WorkloadState.RUNNING if alive else WorkloadState.STOPPED,
            ident=f"pid:{rec.pid}",
            started_at=rec.create_time,
            exit_code=None if alive or child is None else child.poll(),
        )

    def _read(self, atsign: str) -> _PidRecord | None:
        path = self.pid_file(atsign)
        try:
            return self._adopt(_PidRecord.load(path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise RunnerError(f"{atsign}: unreadable pid file {path}: {exc}") from exc

    def _list_sync(self) -> list[Workload]:
        out: list[Workload] = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                rec = self._adopt(_PidRecord.load(path))
            except (ValueError, KeyError, TypeError, FileNotFoundError):
                continue  # not ours, or removed meanwhile
            if rec.node == self.node:
                w = self._workload(rec)
                out.append(w)
                if w.state is WorkloadState.RUNNING and self._watch is not None:
                    self._watch(rec.atsign, rec.pid)
        return out

    async def list(self) -> list[Workload]:
        """Every workload with a pid file, RUNNING or STOPPED (exited, not yet stopped)."""
        return await asyncio.to_thread(self._list_sync)

    # --- starting ----------------------------------------------------------------------------

    def _start_sync(self, spec: WorkloadSpec) -> Workload:
        check_data_dir(self.data_root, spec)
        rec = self._read(spec.atsign)
        if rec is not None and self._alive(rec):
            if rec.fencing_token == spec.fencing_token:
                return self._workload(rec)
            raise RunnerError(
                f"{spec.atsign}: already running on node {self.node} with fencing token "
                f"{rec.fencing_token} (pid {rec.pid}); stop it before starting token "
                f"{spec.fencing_token}"
            )
        if not spec.command:
            raise RunnerError(
                f"{spec.atsign}: WorkloadSpec.command is empty; ProcessRunner needs an argv"
            )
        spec.data_dir.mkdir(parents=True, exist_ok=True)
        nonce = uuid.uuid4().hex
        env = {**os.environ, **spec.env} if self.inherit_env else dict(spec.env)
        env[NONCE_ENV] = nonce
        intent = _PidRecord(
            atsign=spec.atsign,
            node=self.node,
            pid=0,
            create_time=time.time(),
            fencing_token=spec.fencing_token,
            host=spec.host,
            port=spec.port,
            argv=list(spec.command),
            nonce=nonce,
        )
        # Recorded before spawning: if this process dies right after Popen, list() still
        # finds the workload (by the nonce in its environment) and the fence can stop it.
        write_atomic(self.pid_file(spec.atsign), json.dumps(intent.__dict__))
        log_path = self.log_file(spec.atsign)
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"=== {stamp} start {spec.atsign} token {spec.fencing_token} ===\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(
                    list(spec.command),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    self.pid_file(spec.atsign).unlink()
                raise RunnerError(f"{spec.atsign}: cannot run {spec.command[0]!r}: {exc}") from exc
        self._children[child.pid] = child
        ticks = start_ticks(child.pid) or 0
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = time.time()  # exited already; list() shows it STOPPED
        rec = _PidRecord(
            **{
                **intent.__dict__,
                "pid": child.pid,
                "create_time": create_time,
                "start_ticks": ticks,
            }
        )
        write_atomic(self.pid_file(spec.atsign), json.dumps(rec.__dict__))
        if self._watch is not None:
            self._watch(spec.atsign, child.pid)
        return self._workload(rec)

    async def start(self, spec: WorkloadSpec) -> Workload:
        """Start the process (or return the running one with the same token)."""
        return await asyncio.to_thread(self._start_sync, spec)

    # --- stopping ----------------------------------------------------------------------------

    def _signal_group(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def _wait_gone(self, rec: _PidRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        child = self._children.get(rec.pid)
        while time.monotonic() < deadline:
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            if not self._alive(rec):
                return True
            if child is None:
                time.sleep(0.02)
        return not self._alive(rec)

    def _stop_sync(self, atsign: str, timeout: float) -> bool:
        rec = self._read(atsign)
        if rec is None:
            return False
        stopped = False
        if self._alive(rec):
            self._signal_group(rec.pid, signal.SIGCONT)  # in case it is frozen
            self._signal_group(rec.pid, signal.SIGTERM)
            if not self._wait_gone(rec, timeout):
                self._signal_group(rec.pid, signal.SIGKILL)
                if not self._wait_gone(rec, 10.0):
                    raise RunnerError(f"{atsign}: pid {rec.pid} survived SIGKILL for 10 s")
            stopped = True
        child = self._children.pop(rec.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file(atsign).unlink()
        return stopped

    async def stop(self, atsign: str, timeout: float = 10.0) -> bool:
        """SIGTERM the process group, SIGKILL after ``timeout``; forget it.

        ``False`` if nothing was running (a stale pid file is removed all the same)."""
        return await asyncio.to_thread(self._stop_sync, atsign, timeout)

    async def inspect(self, atsign: str) -> Workload | None:
        """The atSign's workload (from its pid file), or ``None``."""

        def one() -> Workload | None:
            rec = self._read(atsign)
            return None if rec is None or rec.node != self.node else self._workload(rec)

        return await asyncio.to_thread(one)

    async def events(self) -> AsyncIterator[str]:
        """atSigns whose process ended, as it ends (and those found exited by ``list()``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        watched: dict[int, tuple[int, str]] = {}  # pid -> (pidfd, atSign)

        def exited(pid: int) -> None:
            fd, atsign = watched.pop(pid, (-1, ""))
            if fd >= 0:
                loop.remove_reader(fd)
                os.close(fd)
            if atsign:
                queue.put_nowait(atsign)

        def watch(atsign: str, pid: int) -> None:
            if pid in watched:
                return
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                queue.put_nowait(atsign)  # already gone
                return
            except OSError:
                return  # no pidfd (old kernel): the periodic list() finds it
            watched[pid] = (fd, atsign)
            loop.add_reader(fd, exited, pid)

        def watch_threadsafe(atsign: str, pid: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(watch, atsign, pid)

        self._watch = watch_threadsafe
        try:
            await self.list()  # watch what already runs
            while True:
                yield await queue.get()
        finally:
            self._watch = None
            for pid in list(watched):
                fd, _ = watched.pop(pid)
                loop.remove_reader(fd)
                os.close(fd)

    # --- probing -----------------------------------------------------------------------------

    async def probe(self, atsign: str, timeout: float = 2.0) -> ProbeResult:
        rec = await asyncio.to_thread(self._read, atsign)
        if rec is None:
            return ProbeResult(False, f"{atsign}: no workload on node {self.node}")
        return await probe_atserver(
            rec.host, rec.port, timeout=timeout, ssl_context=self._probe_ssl, expect_atsign=atsign
        )
