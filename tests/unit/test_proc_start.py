"""A recorded PID names its process by the kernel's start ticks, not a wall-clock time."""

from __future__ import annotations

import subprocess
import time

import psutil

from atserver_runner.proc_start import same_process, start_ticks


def test_start_ticks_name_the_process_whatever_the_wall_clock_says() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        ticks = start_ticks(child.pid)
        assert ticks is not None and ticks > 0
        assert start_ticks(child.pid) == ticks  # stable
        created = psutil.Process(child.pid).create_time()
        assert same_process(child.pid, ticks=ticks)
        # A create time off by a clock step does not matter when the ticks are known...
        assert same_process(child.pid, ticks=ticks, create_time=created + 1.0)
        # ...and other ticks are another process that reused the PID.
        assert not same_process(child.pid, ticks=ticks + 1)
        # Records of an earlier version (no ticks) are compared by create time.
        assert same_process(child.pid, create_time=created)
        assert not same_process(child.pid, create_time=created - 1.0)
        child.kill()
        child.wait(timeout=5)
        assert not same_process(child.pid, ticks=ticks)
        assert start_ticks(child.pid) is None
    finally:
        child.kill()
        child.wait(timeout=5)


def test_a_zombie_is_not_running() -> None:
    child = subprocess.Popen(["true"])
    try:
        ticks = start_ticks(child.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it has exited (not reaped: a zombie)
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        assert not same_process(child.pid, ticks=ticks)
    finally:
        child.wait(timeout=5)
