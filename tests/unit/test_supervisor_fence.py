"""The fence, against real processes of the process runner (`sleep` stands in for atServers)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atserver_runner.base import WorkloadSpec, WorkloadState
from atserver_runner.process import ProcessRunner
from supervisor.fence import Fence, Heartbeat, read_heartbeat, write_heartbeat


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[ProcessRunner]:
    r = ProcessRunner("n1", tmp_path / "workloads")
    try:
        yield r
    finally:
        for w in await r.list():
            await r.stop(w.atsign, timeout=1)


async def start_sleeper(r: ProcessRunner, tmp_path: Path, atsign: str, token: int) -> None:
    spec = WorkloadSpec(
        atsign=atsign,
        node="n1",
        port=1,
        data_dir=tmp_path / "data" / atsign,
        fencing_token=token,
        command=("sleep", "60"),
    )
    await r.start(spec)


def make_fence(r: ProcessRunner, tmp_path: Path, pid: int | None = None) -> Fence:
    return Fence(
        r,
        tmp_path / "heartbeat.json",
        tmp_path / "fence.log",
        supervisor_pid=pid or os.getpid(),
        poll_interval=0.05,
        kill_grace=0.5,
    )


async def test_fresh_heartbeat_keeps_workloads_stale_one_stops_them(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    await start_sleeper(runner, tmp_path, "@alice", 7)
    hb = tmp_path / "heartbeat.json"
    write_heartbeat(hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() + 5, written=0))
    fence = make_fence(runner, tmp_path)
    assert await fence.check_once() == 0
    assert [w.state for w in await runner.list()] == [WorkloadState.RUNNING]

    write_heartbeat(hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() - 0.01, written=0))
    assert await fence.check_once() == 1
    assert await runner.list() == []
    (entry,) = [line for line in (tmp_path / "fence.log").read_text().splitlines() if line]
    assert '"atsign": "@alice"' in entry and '"fencing_token": 7' in entry
    assert "renew deadline passed" in entry


async def test_missing_or_garbled_heartbeat_fails_safe(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    await start_sleeper(runner, tmp_path, "@bob", 3)
    (tmp_path / "heartbeat.json").write_text("{not json")
    assert read_heartbeat(tmp_path / "heartbeat.json") is None
    assert await make_fence(runner, tmp_path).check_once() == 1
    assert await runner.list() == []


async def test_a_newer_supervisors_heartbeat_rules_until_its_deadline(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    await start_sleeper(runner, tmp_path, "@carol", 4)
    fence = make_fence(runner, tmp_path, pid=os.getpid())
    # A restarted supervisor (another pid) resumed the session: its deadline counts.
    write_heartbeat(
        tmp_path / "heartbeat.json",
        Heartbeat(pid=os.getpid() + 1, deadline=time.monotonic() + 5, written=time.monotonic()),
    )
    assert await fence.check_once() == 0
    await fence.run()  # exits: the newer supervisor wrote after this fence started
    assert [w.atsign for w in await runner.list()] == ["@carol"]


async def test_clean_shutdown_heartbeat_lets_the_fence_exit(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    write_heartbeat(
        tmp_path / "heartbeat.json",
        Heartbeat(pid=os.getpid(), deadline=time.monotonic() + 5, written=0, state="stopped"),
    )
    await make_fence(runner, tmp_path).run()  # returns: stopped cleanly, nothing runs
