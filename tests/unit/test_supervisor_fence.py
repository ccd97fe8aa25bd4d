"""The fence, against real processes of the process runner (`sleep` stands in for atServers)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from atserver_runner.base import Workload, WorkloadSpec, WorkloadState
from atserver_runner.process import ProcessRunner
from supervisor.fence import ENDED_EVENTS, Fence, Heartbeat, read_heartbeat, write_heartbeat


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


@pytest.mark.parametrize("left_running", [False, True])
async def test_clean_shutdown_heartbeat_lets_the_fence_exit(
    runner: ProcessRunner, tmp_path: Path, left_running: bool
) -> None:
    """After a clean shutdown the fence exits at once; anything the supervisor could not
    stop (its runner failed during shutdown) is stopped first and logged."""
    if left_running:
        await start_sleeper(runner, tmp_path, "@dave", 9)
    write_heartbeat(
        tmp_path / "heartbeat.json",
        Heartbeat(pid=os.getpid(), deadline=time.monotonic() + 5, written=0, state="stopped"),
    )
    started = time.monotonic()
    async with asyncio.timeout(3):  # well before the heartbeat's deadline
        await make_fence(runner, tmp_path).run()
    assert time.monotonic() - started < 3
    assert await runner.list() == []
    log = tmp_path / "fence.log"
    entries = log.read_text().splitlines() if log.exists() else []
    if left_running:
        assert len(entries) == 1 and '"reason": "supervisor shut down"' in entries[0]
    else:
        assert entries == []


async def test_a_dead_supervisors_session_is_released_after_its_deadline_only(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    """After the supervisor died and the deadline passed (workloads stopped), the fence ends
    the recorded session once; not a record a successor wrote after the last heartbeat, and
    nothing after a clean shutdown."""
    from supervisor.resume import SessionRecord, save_record

    record = tmp_path / "session.json"
    hb = tmp_path / "heartbeat.json"
    released: list[str] = []

    async def release(sid: str) -> None:
        released.append(sid)

    async def fence_of(pid: int) -> Fence:
        return Fence(
            runner,
            hb,
            tmp_path / "fence.log",
            supervisor_pid=pid,
            poll_interval=0.05,
            kill_grace=0.3,
            session_record=record,
            release_session=release,
        )

    async def died(record_first: str | None, deadline_in: float, record_after: str | None) -> None:
        sup = await asyncio.create_subprocess_exec("sleep", "30")  # stands in for it
        try:
            if record_first:
                save_record(record, SessionRecord("etcd", "p", "n1", record_first))
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + deadline_in
            write_heartbeat(hb, Heartbeat(pid=sup.pid, deadline=deadline, written=1.0))
            fence = await fence_of(sup.pid)
            task = asyncio.create_task(fence.run())
            await asyncio.sleep(0.1)
            sup.kill()
            await sup.wait()
            if record_after:  # a successor opened a session, its heartbeat not written yet
                await asyncio.sleep(0.02)
                save_record(record, SessionRecord("etcd", "p", "n1", record_after))
            await asyncio.wait_for(task, 10)
            assert time.monotonic() >= deadline
        finally:
            if sup.returncode is None:
                sup.kill()
                await sup.wait()

    await start_sleeper(runner, tmp_path, "@alice", 5)
    await died("6a1b", 0.5, None)
    assert released == ["6a1b"]
    assert await runner.list() == []
    log = (tmp_path / "fence.log").read_text()
    assert '"event": "session-released"' in log and '"session": "6a1b"' in log

    released.clear()
    await died("6a1b", 0.3, "beef")
    assert released == []

    # A clean shutdown: the supervisor revoked its own session; nothing to release.
    save_record(record, SessionRecord("etcd", "p", "n1", "6a1c"))
    write_heartbeat(
        hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() - 1, written=2.0, state="stopped")
    )
    await asyncio.wait_for((await fence_of(os.getpid())).run(), 5)
    assert released == []


async def test_a_leftover_record_delays_the_release_but_never_keeps_the_fence(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    """An atServer that exited by itself leaves its record (STOPPED): the fence does not end
    the session while a record is listed (it could be an unfinished start), and exits once
    the session's TTL after the deadline has passed (the session is gone by then anyway)."""
    from supervisor.resume import SessionRecord, save_record

    spec = WorkloadSpec(
        atsign="@gone",
        node="n1",
        port=1,
        data_dir=tmp_path / "data" / "@gone",
        fencing_token=1,
        command=("true",),
    )
    await runner.start(spec)
    record, hb = tmp_path / "session.json", tmp_path / "heartbeat.json"
    released: list[str] = []

    async def release(sid: str) -> None:
        released.append(sid)

    sup = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        save_record(record, SessionRecord("etcd", "p", "n1", "6a1b"))
        await asyncio.sleep(0.02)
        deadline = time.monotonic() + 0.2
        write_heartbeat(hb, Heartbeat(pid=sup.pid, deadline=deadline, written=1.0))
        fence = Fence(
            runner,
            hb,
            tmp_path / "fence.log",
            supervisor_pid=sup.pid,
            poll_interval=0.05,
            kill_grace=0.3,
            session_record=record,
            release_session=release,
            session_ttl=0.5,
        )
        sup.kill()
        await sup.wait()
        await asyncio.wait_for(fence.run(), 5)
        assert time.monotonic() >= deadline + 0.5
        assert released == []
        assert [w.state for w in await runner.list()] == [WorkloadState.STOPPED]
    finally:
        if sup.returncode is None:
            sup.kill()
            await sup.wait()


async def test_a_workload_that_exits_between_the_list_and_the_stop_is_logged_already_gone(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    """With Consul session checks a new owner may fence the node's storage while the fence
    runs, and an atServer exits on its fenced mount: that is no failed stop."""
    import json
    import signal

    import psutil

    await start_sleeper(runner, tmp_path, "@alice", 7)
    await start_sleeper(runner, tmp_path, "@bob", 8)
    hb = tmp_path / "heartbeat.json"
    write_heartbeat(hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() - 1, written=0))
    fence = make_fence(runner, tmp_path)
    listed = runner.list

    async def list_then_bob_exits() -> list[Workload]:
        found = await listed()
        bob = json.loads(runner.pid_file("@bob").read_text())["pid"]
        os.killpg(bob, signal.SIGKILL)
        for _ in range(100):  # until it is reaped or a zombie: gone either way
            try:
                if psutil.Process(bob).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            await asyncio.sleep(0.02)
        return found

    runner.list = list_then_bob_exits  # type: ignore[method-assign]
    try:
        assert await fence.check_once() == 1
    finally:
        runner.list = listed  # type: ignore[method-assign]
    events = {
        e["atsign"]: e["event"]
        for e in map(json.loads, (tmp_path / "fence.log").read_text().splitlines())
    }
    assert events == {"@alice": "fenced", "@bob": "already-gone"}


async def test_a_workload_exited_before_the_list_is_logged_once_and_its_record_kept(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    """The new owner may fence the node's storage before the node's own deadline (Consul
    session checks end the session sooner): an atServer that exited on the fenced mount is in
    the fence log as found-exited (it ended by then), once, and its pid file stays for the
    supervisor (a pending start's record must survive until a list adopts its process)."""
    import json
    import signal

    import psutil

    await start_sleeper(runner, tmp_path, "@alice", 7)
    await start_sleeper(runner, tmp_path, "@bob", 8)
    bob = json.loads(runner.pid_file("@bob").read_text())["pid"]
    os.killpg(bob, signal.SIGKILL)
    for _ in range(100):
        try:
            if psutil.Process(bob).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        await asyncio.sleep(0.02)
    hb = tmp_path / "heartbeat.json"
    fence = make_fence(runner, tmp_path)
    write_heartbeat(hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() + 60, written=0))
    assert await fence.check_once() == 0
    assert not (tmp_path / "fence.log").exists()  # a fresh heartbeat: nothing to say yet
    write_heartbeat(hb, Heartbeat(pid=os.getpid(), deadline=time.monotonic() - 1, written=0))
    assert await fence.check_once() == 1
    assert await fence.check_once() == 0
    entries = [json.loads(ln) for ln in (tmp_path / "fence.log").read_text().splitlines()]
    assert sorted((e["atsign"], e["event"]) for e in entries) == [
        ("@alice", "fenced"),
        ("@bob", "found-exited"),
    ]
    bob_entry = next(e for e in entries if e["atsign"] == "@bob")
    assert bob_entry["fencing_token"] == 8 and bob_entry["deadline"] is not None
    assert {e["event"] for e in entries} <= ENDED_EVENTS
    assert runner.pid_file("@bob").exists() and not runner.pid_file("@alice").exists()


async def test_a_wall_clock_step_does_not_hide_a_running_workload_from_the_fence(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    """psutil's create time moves with the wall clock (its boot time is wall-clock
    seconds): after a one-second step, a pid file's create time no longer matches the
    process. Its start ticks still do, and the fence still stops it."""
    await start_sleeper(runner, tmp_path, "@carol", 5)
    pid_file = runner.pid_file("@carol")
    rec = json.loads(pid_file.read_text())
    assert rec["start_ticks"] > 0
    pid_file.write_text(json.dumps({**rec, "create_time": rec["create_time"] - 1.0}))
    assert [w.state for w in await runner.list()] == [WorkloadState.RUNNING]
    write_heartbeat(
        tmp_path / "heartbeat.json",
        Heartbeat(pid=os.getpid(), deadline=time.monotonic() - 0.01, written=0),
    )
    assert await make_fence(runner, tmp_path).check_once() == 1
    assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).status() == "zombie"
