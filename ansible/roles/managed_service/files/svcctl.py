#!/usr/bin/env python3
"""Run a long-lived service in the background with a pid file, for hosts without systemd.

Used by the ``managed_service`` role when ``managed_service_manager: pidfile``
(the local rollout test; see ansible/README.md). Production hosts use systemd.

A service is described by a JSON spec file::

    {"name": "etcd", "argv": [...], "env": {...}, "cwd": "/dir", "log": "/dir/etcd.log",
     "pidfile": "/dir/etcd.pid", "stop_timeout": 10}

The pid file holds the pid *and* the kernel start time of the process, so a
recycled pid is never signalled. Every service runs in its own session (process
group); stop signals that group only.

Commands (each prints one line saying what it did, which Ansible uses to report changes):
    svcctl.py start SPEC      start unless running             -> "started ..." / "running ..."
    svcctl.py stop SPEC       SIGTERM, SIGKILL after timeout   -> "stopped ..." / "not running"
    svcctl.py restart SPEC    stop then start                  -> "restarted ..."
    svcctl.py status SPEC     exit 0 if running, 3 if not
    svcctl.py stop-all DIR    stop every service whose spec is in DIR (teardown)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SETTLE_SECONDS = 0.7
"""A service that exits within this time after start counts as failed to start."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else start


def _read_pidfile(path: Path) -> tuple[int, str] | None:
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), str(data["start_time"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def running_pid(spec: dict) -> int | None:
    """The pid of the service if the process recorded in its pid file is still that process."""
    recorded = _read_pidfile(Path(spec["pidfile"]))
    if recorded is None:
        return None
    pid, start = recorded
    return pid if _start_time(pid) == start else None


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def start(spec: dict) -> int:
    pid = running_pid(spec)
    if pid is not None:
        print(f"running {spec['name']} pid {pid}")
        return 0
    log = Path(spec["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env.update({str(k): str(v) for k, v in spec.get("env", {}).items()})
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in spec["argv"]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=spec.get("cwd") or None,
            env=env,
            start_new_session=True,
        )
    start_time = None
    for _ in range(50):  # /proc may lag the fork by a moment
        start_time = _start_time(proc.pid)
        if start_time is not None:
            break
        time.sleep(0.01)
    pidfile = Path(spec["pidfile"])
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "start_time": start_time}))
    tmp.replace(pidfile)
    time.sleep(SETTLE_SECONDS)
    code = proc.poll()
    if code is not None:
        pidfile.unlink(missing_ok=True)
        print(f"{spec['name']} exited with code {code} right after start; log {log}:")
        print(_log_tail(log))
        return 1
    print(f"started {spec['name']} pid {proc.pid}")
    return 0


def stop(spec: dict) -> int:
    pidfile = Path(spec["pidfile"])
    pid = running_pid(spec)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        print(f"not running {spec['name']}")
        return 0
    timeout = float(spec.get("stop_timeout", 10))
    for sig in (signal.SIGCONT, signal.SIGTERM):  # SIGCONT first, in case it was frozen
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(spec) == pid:
        time.sleep(0.05)
    if running_pid(spec) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    print(f"stopped {spec['name']} pid {pid}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop", "restart", "status", "stop-all"):
        print(__doc__, file=sys.stderr)
        return 2
    command, target = argv[1], Path(argv[2])
    if command == "stop-all":
        specs = sorted(target.glob("*.json")) if target.is_dir() else []
        for path in specs:
            stop(json.loads(path.read_text()))
        return 0
    spec = json.loads(target.read_text())
    if command == "start":
        return start(spec)
    if command == "stop":
        return stop(spec)
    if command == "restart":
        stop(spec)
        code = start(spec)
        if code == 0:
            print(f"restarted {spec['name']}")
        return code
    return 0 if running_pid(spec) is not None else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
