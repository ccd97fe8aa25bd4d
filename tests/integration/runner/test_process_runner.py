"""ProcessRunner with the dev atServer and the real atsdk client: login, data, fencing,
re-finding workloads after a supervisor restart, stopping, probing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from atserver_runner.base import Runner, WorkloadSpec, WorkloadState
from atserver_runner.devserver.fence import read_fence
from atserver_runner.process import NONCE_ENV, ProcessRunner
from testbed.process import pid_alive
from tests.integration.runner.conftest import (
    ATSIGN,
    Onboarded,
    devserver_spec,
    wait_healthy,
    wait_stopped,
)

MakeRunner = Callable[[str], ProcessRunner]


def _pid(ident: str) -> int:
    assert ident.startswith("pid:"), ident
    return int(ident[4:])


async def test_runner_satisfies_the_protocol(make_process_runner: MakeRunner) -> None:
    assert isinstance(make_process_runner("n1"), Runner)


async def test_atsdk_pkam_login_put_get_scan_delete(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    runner = make_process_runner("node-a")
    spec = devserver_spec(runner.node, tmp_path / "data", 7, onboarded)
    t0 = time.monotonic()
    started = await runner.start(spec)
    probe = await wait_healthy(runner)
    print(f"process start -> healthy: {time.monotonic() - t0:.3f}s, probe {probe.latency_s:.4f}s")
    assert started.state is WorkloadState.RUNNING and started.fencing_token == 7
    assert "token=7" in probe.detail

    out = await onboarded.atsdk.arun("exercise", spec.host, spec.port)
    assert out["authenticated"] is True
    assert out["self"] == "hello self"
    assert out["public"] == "hello world"
    assert "note.test@alice" in out["scan"]
    assert "public:card.test@alice" in out["scan"]
    assert out["after_delete"] == "AtKeyNotFoundException"
    assert "note.test@alice" not in out["scan_after_delete"]
    assert "public:card.test@alice" in out["scan_after_delete"]

    bad = await onboarded.atsdk.arun("badsig", spec.host, spec.port)
    assert bad["authenticated"] is False, bad
    # The server survived the bad login and still serves.
    assert (await runner.probe(ATSIGN)).healthy

    t0 = time.monotonic()
    assert await runner.stop(ATSIGN, timeout=10.0) is True
    print(f"process graceful stop: {time.monotonic() - t0:.3f}s")
    assert not pid_alive(_pid(started.ident), started.started_at)
    assert "stopped atsign=@alice exit_code=0" in runner.log_file(ATSIGN).read_text()
    assert await runner.list() == []
    assert await runner.stop(ATSIGN) is False


async def test_data_written_before_is_there_on_another_node(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    data = tmp_path / "shared-data"
    a, b = make_process_runner("node-a"), make_process_runner("node-b")
    spec_a = devserver_spec(a.node, data, 10, onboarded)
    await a.start(spec_a)
    await wait_healthy(a)
    put = await onboarded.atsdk.arun("put", spec_a.host, spec_a.port, "moving.test", "kept")
    assert "error" not in put, put
    assert await a.stop(ATSIGN) is True

    spec_b = devserver_spec(b.node, data, 11, onboarded)
    await b.start(spec_b)
    await wait_healthy(b)
    assert await a.list() == []
    got = await onboarded.atsdk.arun("get", spec_b.host, spec_b.port, "moving.test")
    assert got == {"value": "kept"}
    assert read_fence(data) == 11


async def test_lower_token_refuses_to_start(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    a, b = make_process_runner("node-a"), make_process_runner("node-b")
    await a.start(devserver_spec(a.node, data, 20, onboarded))
    await wait_healthy(a)
    await a.stop(ATSIGN)

    await b.start(devserver_spec(b.node, data, 19, onboarded))
    stopped = await wait_stopped(b)
    assert stopped.exit_code == 3, stopped
    assert "refused_to_start" in b.log_file(ATSIGN).read_text()
    assert not (await b.probe(ATSIGN, timeout=1.0)).healthy
    assert read_fence(data) == 20


async def test_overtaken_server_stops_acknowledging_writes_and_exits(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    old, mid, new = (make_process_runner(n) for n in ("node-old", "node-mid", "node-new"))
    # A long fence poll: only the check made before acknowledging a write can catch the takeover.
    spec_old = devserver_spec(old.node, data, 30, onboarded, extra=("--fence-poll", "60"))
    await old.start(spec_old)
    await wait_healthy(old)

    spec_mid = devserver_spec(mid.node, data, 31, onboarded, extra=("--fence-poll", "0.2"))
    await mid.start(spec_mid)
    await wait_healthy(mid)
    assert (await old.probe(ATSIGN)).healthy  # still answers reads, but...

    refused = await onboarded.atsdk.arun("put", spec_old.host, spec_old.port, "late.test", "lost")
    assert "error" in refused, refused
    assert "AT0024" in refused["detail"], refused
    old_end = await wait_stopped(old)
    assert old_end.exit_code == 4

    ok = await onboarded.atsdk.arun("put", spec_mid.host, spec_mid.port, "acked.test", "kept")
    assert "error" not in ok, ok

    # A newer token appears with no write in flight: the poll alone stops the mid server.
    spec_new = devserver_spec(new.node, data, 32, onboarded)
    await new.start(spec_new)
    await wait_healthy(new)
    mid_end = await wait_stopped(mid, timeout=10.0)
    assert mid_end.exit_code == 4
    assert "fenced" in mid.log_file(ATSIGN).read_text()

    assert await onboarded.atsdk.arun("get", spec_new.host, spec_new.port, "acked.test") == {
        "value": "kept"
    }
    lost = await onboarded.atsdk.arun("get", spec_new.host, spec_new.port, "late.test")
    assert lost["error"] == "AtKeyNotFoundException", lost


async def test_list_refinds_workloads_of_an_earlier_runner_instance(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    first = make_process_runner("node-a")
    spec = devserver_spec(first.node, tmp_path / "data", 40, onboarded)
    started = await first.start(spec)
    await wait_healthy(first)

    # A new supervisor process: same node name and state dir, no memory of the child.
    again = ProcessRunner("node-a", first.state_dir)
    found = await again.list()
    assert [(w.atsign, w.ident, w.fencing_token, w.state) for w in found] == [
        (ATSIGN, started.ident, 40, WorkloadState.RUNNING)
    ]
    assert (await again.probe(ATSIGN)).healthy
    # Starting the same token again returns the running one instead of a second copy.
    assert (await again.start(spec)).ident == started.ident
    with pytest.raises(Exception, match="already running"):
        await again.start(devserver_spec(again.node, tmp_path / "data", 41, onboarded))
    # Another node's runner does not see it.
    assert await make_process_runner("node-b").list() == []

    assert await again.stop(ATSIGN) is True
    assert not pid_alive(_pid(started.ident), started.started_at)
    assert await first.list() == []


async def test_recycled_pid_is_not_mistaken_for_a_workload(make_process_runner: MakeRunner) -> None:
    runner = make_process_runner("node-a")
    me = psutil.Process(os.getpid())
    record = {
        "atsign": ATSIGN,
        "node": "node-a",
        "pid": me.pid,  # a live PID, but not the process this record was written for
        "create_time": me.create_time() - 100.0,
        "fencing_token": 1,
        "host": "127.0.0.1",
        "port": 1,
        "argv": [],
    }
    runner.pid_file(ATSIGN).write_text(json.dumps(record))
    [w] = await runner.list()
    assert w.state is WorkloadState.STOPPED
    assert await runner.stop(ATSIGN) is False  # and we are still alive to assert it
    assert not runner.pid_file(ATSIGN).exists()


async def test_stop_kills_a_process_that_ignores_sigterm(
    make_process_runner: MakeRunner, tmp_path: Path
) -> None:
    runner = make_process_runner("node-a")
    ready = tmp_path / "ready"
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)"
    )
    spec = WorkloadSpec(
        atsign=ATSIGN,
        node=runner.node,
        port=1,
        data_dir=tmp_path / "d",
        fencing_token=1,
        command=(sys.executable, "-c", code),
    )
    w = await runner.start(spec)
    for _ in range(400):  # up to 20 s for the interpreter to start
        if ready.exists():
            break
        await asyncio.sleep(0.05)
    assert ready.exists()
    t0 = time.monotonic()
    assert await runner.stop(ATSIGN, timeout=1.0) is True
    took = time.monotonic() - t0
    assert 1.0 <= took < 10.0, took
    assert not pid_alive(_pid(w.ident), w.started_at)


async def test_probe_reports_frozen_and_dead_servers(
    make_process_runner: MakeRunner, onboarded: Onboarded, tmp_path: Path
) -> None:
    runner = make_process_runner("node-a")
    w = await runner.start(devserver_spec(runner.node, tmp_path / "data", 50, onboarded))
    await wait_healthy(runner)
    latencies = [(await runner.probe(ATSIGN)).latency_s for _ in range(20)]
    print(
        f"probe latency: median {sorted(latencies)[10] * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )

    pid = _pid(w.ident)
    os.kill(pid, signal.SIGSTOP)  # our own child: a frozen server still accepts TCP (backlog)
    try:
        t0 = time.monotonic()
        frozen = await runner.probe(ATSIGN, timeout=1.0)
        assert not frozen.healthy
        assert "within 1.0s" in frozen.detail, frozen
        assert time.monotonic() - t0 < 3.0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await runner.probe(ATSIGN)).healthy

    os.kill(pid, signal.SIGKILL)
    dead = await wait_stopped(runner)
    assert dead.exit_code == -signal.SIGKILL
    result = await runner.probe(ATSIGN, timeout=1.0)
    assert not result.healthy
    assert "ConnectionRefusedError" in result.detail, result
    assert (await runner.probe("@nobody")).detail.startswith("@nobody: no workload")


async def test_start_error_names_the_atsign(
    make_process_runner: MakeRunner, tmp_path: Path
) -> None:
    runner = make_process_runner("node-a")
    spec = WorkloadSpec(ATSIGN, runner.node, 1, tmp_path / "d", 1, command=())
    with pytest.raises(Exception, match=r"@alice: WorkloadSpec\.command is empty"):
        await runner.start(spec)
    missing = WorkloadSpec(ATSIGN, runner.node, 1, tmp_path / "d", 1, command=("/nonexistent/x",))
    with pytest.raises(Exception, match=r"@alice: cannot run '/nonexistent/x'"):
        await runner.start(missing)


async def test_workload_spawned_just_before_the_runner_died_is_found_and_stopped(
    make_process_runner: MakeRunner, tmp_path: Path
) -> None:
    """The runner wrote its pending pid file and spawned the process, then was SIGKILLed
    before recording the PID: a new runner (e.g. the fence) must still find and stop it."""
    runner = make_process_runner("node-a")
    nonce = uuid.uuid4().hex
    pending = {
        "atsign": ATSIGN,
        "node": "node-a",
        "pid": 0,
        "create_time": time.time(),
        "fencing_token": 3,
        "host": "127.0.0.1",
        "port": 1,
        "argv": [],
        "nonce": nonce,
    }
    runner.pid_file(ATSIGN).write_text(json.dumps(pending))
    [before] = await runner.list()
    assert before.state is WorkloadState.STOPPED  # nothing carries the nonce yet

    orphan = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, NONCE_ENV: nonce},
        start_new_session=True,
    )
    try:
        fence_view = ProcessRunner("node-a", runner.state_dir)
        [found] = await fence_view.list()
        assert (found.ident, found.state, found.fencing_token) == (
            f"pid:{orphan.pid}",
            WorkloadState.RUNNING,
            3,
        )
        assert json.loads(runner.pid_file(ATSIGN).read_text())["pid"] == orphan.pid
        assert await fence_view.stop(ATSIGN, timeout=5.0) is True
        assert orphan.wait(timeout=10) == -signal.SIGTERM
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(timeout=10)


async def test_every_start_records_a_nonce_in_the_environment(
    make_process_runner: MakeRunner, tmp_path: Path
) -> None:
    runner = make_process_runner("node-a")
    out = tmp_path / "env.txt"
    code = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.environ[{NONCE_ENV!r}])"
    spec = WorkloadSpec(
        ATSIGN, runner.node, 1, tmp_path / "d", 1, command=(sys.executable, "-c", code)
    )
    await runner.start(spec)
    await wait_stopped(runner)
    assert out.read_text() == json.loads(runner.pid_file(ATSIGN).read_text())["nonce"]
