"""svcctl.py, the pid-file service control the local rollout hosts use instead of systemd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.integration.ansible.local_cluster import ANSIBLE_DIR

SVCCTL = ANSIBLE_DIR / "roles" / "managed_service" / "files" / "svcctl.py"


def _svcctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SVCCTL), *args], capture_output=True, text=True, timeout=30
    )


def _spec(tmp_path: Path, argv: list[str], name: str = "sleeper") -> Path:
    spec = {
        "name": name,
        "argv": argv,
        "env": {"GREETING": "hi"},
        "cwd": str(tmp_path),
        "log": str(tmp_path / f"{name}.log"),
        "pidfile": str(tmp_path / f"{name}.pid"),
        "stop_timeout": 2,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _pid(tmp_path: Path, name: str = "sleeper") -> int:
    return int(json.loads((tmp_path / f"{name}.pid").read_text())["pid"])


def test_start_is_idempotent_and_stop_kills_the_group(tmp_path: Path) -> None:
    # The service forks a child in its group: stop must end both.
    spec = _spec(tmp_path, ["/bin/sh", "-c", "sleep 60 & echo $GREETING; wait"])
    pid: int = 0
    group: list[psutil.Process] = []
    try:
        first = _svcctl("start", str(spec))
        assert first.returncode == 0 and first.stdout.startswith("started sleeper"), first
        pid = _pid(tmp_path)
        again = _svcctl("start", str(spec))
        assert again.stdout.startswith(f"running sleeper pid {pid}"), again
        assert _svcctl("status", str(spec)).returncode == 0
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == pid]
        assert len(group) >= 2, group
        assert "hi" in (tmp_path / "sleeper.log").read_text()
    finally:
        stopped = _svcctl("stop", str(spec))
    assert stopped.stdout.startswith(f"stopped sleeper pid {pid}"), stopped
    assert _svcctl("status", str(spec)).returncode == 3
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.is_running() for p in group):
        time.sleep(0.05)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert _svcctl("stop", str(spec)).stdout.startswith("not running")


def test_a_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    # A pid file naming a live process with another start time (ours): not the service.
    spec = _spec(tmp_path, ["/bin/sleep", "60"])
    (tmp_path / "sleeper.pid").write_text(json.dumps({"pid": os.getpid(), "start_time": "1"}))
    assert _svcctl("status", str(spec)).returncode == 3
    assert _svcctl("stop", str(spec)).stdout.startswith("not running")
    assert not (tmp_path / "sleeper.pid").exists()


def test_a_service_that_exits_at_once_fails_to_start(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["/bin/sh", "-c", "echo broken config >&2; exit 2"])
    result = _svcctl("start", str(spec))
    assert result.returncode == 1
    assert "exited with code 2" in result.stdout and "broken config" in result.stdout
    assert not (tmp_path / "sleeper.pid").exists()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
