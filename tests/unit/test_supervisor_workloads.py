"""The workload cache: what the runner reports, never older than what the supervisor did."""

from __future__ import annotations

import asyncio

from atserver_runner.base import Workload, WorkloadState
from supervisor.workloads import WorkloadCache


def workload(atsign: str, token: int, state: WorkloadState = WorkloadState.RUNNING) -> Workload:
    return Workload(atsign, "a1", token, "127.0.0.1", 30000 + token, state, f"p{token}")


class SlowRunner:
    """``inspect`` and ``list`` answer what they read at their start, once let go."""

    def __init__(self) -> None:
        self.now: dict[str, Workload] = {}
        self.go = asyncio.Event()

    async def inspect(self, atsign: str) -> Workload | None:
        seen = self.now.get(atsign)
        await self.go.wait()
        return seen

    async def list(self) -> list[Workload]:
        seen = list(self.now.values())
        await self.go.wait()
        return seen


async def test_an_exit_event_read_before_a_stop_does_not_bring_the_workload_back() -> None:
    """The atServer exits during the supervisor's stop; the exit event's inspect read the
    pid file before the stop removed it and answers after the stop dropped the workload."""
    runner = SlowRunner()
    cache = WorkloadCache(runner, lambda _: None)  # type: ignore[arg-type]
    cache.put(workload("@alice", 1))
    runner.now["@alice"] = workload("@alice", 1, WorkloadState.STOPPED)
    inspecting = asyncio.create_task(cache.update("@alice"))
    await asyncio.sleep(0)
    cache.drop("@alice")  # the stop finished
    runner.now.clear()
    runner.go.set()
    assert await inspecting is False
    assert "@alice" not in cache.items


async def test_a_full_list_older_than_a_start_keeps_the_start() -> None:
    runner = SlowRunner()
    cache = WorkloadCache(runner, lambda _: None)  # type: ignore[arg-type]
    runner.now["@bob"] = workload("@bob", 3)
    listing = asyncio.create_task(cache.refresh())
    await asyncio.sleep(0)
    cache.put(workload("@alice", 2))  # started while the list was on its way
    runner.go.set()
    changed = await listing
    assert set(cache.items) == {"@alice", "@bob"}
    assert changed == {"@bob"}
    # Without anything done meanwhile, the list is the truth.
    runner.go.clear()
    runner.now.pop("@bob")
    listing = asyncio.create_task(cache.refresh())
    await asyncio.sleep(0)
    runner.go.set()
    assert await listing == {"@alice", "@bob"}
    assert cache.items == {}
