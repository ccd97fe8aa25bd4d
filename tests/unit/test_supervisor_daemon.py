"""The daemon itself (not only its pure cycle), driven through in-memory fakes.

Each test breaks one part the way production does: an HTTP peer that hangs up, a
Docker engine that errors, a DCS that is down, a claim lost under a pending handoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atserver_runner.base import Workload, WorkloadState
from tests.unit.daemon_harness import FakeRunner, make_harness


@contextlib.asynccontextmanager
async def hang_up_server() -> AsyncIterator[str]:
    """An HTTP 'peer' on loopback that closes every connection at once (no answer)."""

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("api", ["hang-up", "http://[bad-url"])
async def test_a_failing_action_is_contained_and_no_sibling_outlives_the_cycle(
    tmp_path: Path, api: str
) -> None:
    """The failback request fails with an aiohttp error that is not an OSError
    (ServerDisconnectedError, InvalidURL) while a slow start runs beside it."""
    h = await make_harness(
        tmp_path,
        [{"atsign": "@alice", "prefer_nodes": ["a1"]}, "@bob"],
        placement={"failback": "auto", "rank_delay": 0},
    )
    h.runner.start_delay = 0.3
    async with hang_up_server() as url:
        h.dcs.put("@alice", "other", "b1", api=url if api == "hang-up" else api)
        sentence = await h.cycle()
        # No action outlives its cycle: the slow start finished inside it.
        assert h.runner.in_flight == 0
    assert ("@bob", h.dcs.claims["@bob"].token) in h.runner.started
    assert "claimed @bob" in sentence
    assert "RequestFailback @alice failed:" in sentence, sentence
    assert "1 action(s) failed" in sentence
    assert h.sup.state.last_failures == 1


async def test_a_cancelled_cycle_cancels_its_actions(tmp_path: Path) -> None:
    h = await make_harness(tmp_path, ["@alice", "@bob"])
    h.runner.start_delay = 5
    task = asyncio.create_task(h.cycle())
    for _ in range(100):
        if h.runner.in_flight == 2:
            break
        await asyncio.sleep(0.01)
    assert h.runner.in_flight == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.runner.in_flight == 0


async def test_runner_errors_while_the_session_is_lost_do_not_end_run(tmp_path: Path) -> None:
    """A Docker error in runner.list() in the lost-session branch: run() goes on, and
    shutdown still closes the session and tells the fence it stopped."""
    h = await make_harness(tmp_path, ["@alice"])
    await h.cycle()
    assert "@alice" in h.runner.workloads
    first = h.session
    h.runner.broken = RuntimeError("Error while fetching server API version")
    first.lose()
    stop = asyncio.Event()
    run = asyncio.create_task(h.sup.run(stop))
    await asyncio.sleep(1.5)
    assert not run.done(), run
    # While the fence-everything cycle keeps failing, no new session is opened: its fresh
    # heartbeat would stop the fence from stopping what the lost session left running.
    assert h.backend.opened == [first]
    hb = json.loads(h.sup.heartbeat_path.read_text())
    assert hb["deadline"] <= first.renew_deadline + 1e-9  # the fence may act now
    stop.set()
    await asyncio.wait_for(run, 10)
    hb = json.loads(h.sup.heartbeat_path.read_text())
    assert hb["state"] == "stopped"
    assert all(s.closed for s in h.backend.opened)
    assert h.registrar.closed


async def test_a_runner_that_recovers_lets_the_node_fence_then_open_a_new_session(
    tmp_path: Path,
) -> None:
    h = await make_harness(tmp_path, ["@alice"])
    await h.cycle()
    first = h.session
    h.runner.broken = RuntimeError("docker: connection refused")
    first.lose()
    stop = asyncio.Event()
    run = asyncio.create_task(h.sup.run(stop))
    await asyncio.sleep(0.8)
    h.runner.broken = None
    for _ in range(100):
        if len(h.backend.opened) == 2 and "@alice" in h.runner.workloads:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(run, 10)
    assert "@alice" in h.runner.stopped  # the old token was fenced first
    assert len(h.backend.opened) == 2
    tokens = [t for a, t in h.runner.started if a == "@alice"]
    assert len(tokens) == 2 and tokens[1] > tokens[0]


async def test_a_crash_leftover_is_fenced_then_claimed_without_waiting_for_a_resync(
    tmp_path: Path,
) -> None:
    """A restarted node finds its old atServer dead (a host crash) and the claim vacant:
    fencing it changes nothing the claims watch would report, so the fence itself must
    make the node look again (it used to wait for the next resync, 30 s)."""

    def leftover(_b: object, runner: FakeRunner, _r: object) -> None:
        runner.workloads["@alice"] = Workload(
            "@alice", "a1", 7, "127.0.0.1", 30001, WorkloadState.STOPPED, "fake:@alice", 137
        )

    h = await make_harness(tmp_path, ["@alice"], configure=leftover)
    await h.sync()
    h.sup.queue.take()  # what the caches marked so far: this full cycle looks at it all
    sentence, _ = await h.sup.run_cycle(None)
    assert "fenced @alice" in sentence and "claimed" not in sentence, sentence
    assert h.runner.stopped == ["@alice"]
    # Nothing else will change: the fence itself put @alice back in the queue.
    dirty = h.sup.queue.take()
    assert dirty is not None and "@alice" in dirty, dirty
    sentence, _ = await h.sup.run_cycle(dirty)
    assert "claimed @alice" in sentence, sentence
    assert [a for a, _ in h.runner.started] == ["@alice"] and h.runner.started[0][1] > 7


async def test_a_dcs_outage_does_not_leak_tasks(tmp_path: Path) -> None:
    h = await make_harness(tmp_path, ["@alice"], open_session=False, timing={"ttl": 2})
    h.backend.down = True
    stop = asyncio.Event()
    run = asyncio.create_task(h.sup.run(stop))
    await asyncio.sleep(0.5)
    baseline = len(asyncio.all_tasks())
    await asyncio.sleep(2.0)  # about six passes of the outage branch (renew_interval 1/3 s)
    grown = len(asyncio.all_tasks()) - baseline
    stop.set()
    await asyncio.wait_for(run, 10)
    assert grown <= 1, f"{grown} more pending tasks after 2 s of outage"


async def test_a_handoff_request_dies_with_the_claim(tmp_path: Path) -> None:
    h = await make_harness(tmp_path, ["@alice"])
    await h.cycle()  # claims and starts
    await h.cycle()  # sees its claim
    assert h.sup.request_handoff("@alice") == "handing off @alice"
    # Before the next cycle, the claim is lost (another node's session took it).
    h.runner.workloads.clear()
    h.dcs.put("@alice", "other", "b1")
    await h.cycle()
    assert h.sup.state.handoffs == set()
    # Later the atSign is vacant again and this node wins it: it serves it, it does not
    # hand it off at once because of a request made under the old claim.
    h.dcs.drop("@alice")
    sentence = await h.cycle()
    assert "claimed @alice" in sentence
    sentence = await h.cycle()
    assert "hand off" not in sentence, sentence
    assert "@alice" in h.runner.workloads


async def test_handoff_history_is_bounded_and_status_returns_the_latest(tmp_path: Path) -> None:
    from supervisor.daemon import REPORTS_KEPT, STATUS_REPORTS

    h = await make_harness(tmp_path, ["@alice"])
    rounds = REPORTS_KEPT + 30
    for _ in range(rounds):
        h.dcs.drop("@alice")
        h.sup.state.excluded.clear()
        h.registrar.passing_elsewhere_nodes.clear()
        await h.cycle()  # claims and starts
        await h.cycle()  # sees its claim
        h.sup.request_handoff("@alice")
        await h.cycle()  # hands off: in flight until it passes elsewhere
        h.registrar.passing_elsewhere_nodes["@alice"] = "b1"
        await h.cycle()  # the report is done
    assert len(h.sup.ctx.handoffs.reports) == REPORTS_KEPT
    st = h.sup.status()
    assert len(st["handoff_reports"]) == STATUS_REPORTS
    assert st["handoff_reports_total"] == rounds
    seqs = [r["seq"] for r in st["handoff_reports"]]
    assert seqs == list(range(rounds - STATUS_REPORTS + 1, rounds + 1))
    assert all(r["to_node"] == "b1" for r in st["handoff_reports"])
    assert len(h.sup.status(reports=REPORTS_KEPT * 2)["handoff_reports"]) == REPORTS_KEPT


async def test_a_marker_written_after_the_guard_read_it_lets_the_refusal_go(
    tmp_path: Path,
) -> None:
    """Shared storage: this node reads the marker, the claim's winner (b1) stamps it, then
    this node refuses. The refusal must rest on what was read, so the stamp counts as a
    change and the atSign is looked at again (found in CI: a2 refused @alice for good, and
    when b1 died nobody served it)."""
    from leases.base import GenerationStamp
    from supervisor import data_guard

    h = await make_harness(tmp_path, ["@alice"])
    data_dir = h.sup.guard.data_dir("@alice")
    data_dir.mkdir(parents=True)
    data_guard.stamp_marker(data_dir, 10, "d1", "a1", "@alice")
    h.dcs.stamp("@alice", 10, "a1", GenerationStamp(0, "d1", 0))
    h.dcs.stamp("@alice", 20, "b1", GenerationStamp(10, "d1", 10))  # b1 won the claim
    verdict = await h.sup.guard.check("@alice")
    assert not isinstance(verdict, str) and not verdict.ok, verdict
    data_guard.stamp_marker(data_dir, 20, "d1", "b1", "@alice")  # b1 writes the marker
    h.sup.guard.refuse("@alice", verdict)
    assert h.sup.guard.changed() == {"@alice"}
    assert "@alice" not in h.sup.state.refused
