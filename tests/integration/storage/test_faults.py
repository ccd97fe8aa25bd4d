"""Daemon faults under a writing node: an OSD kill and an active MDS kill lose no fsynced data."""

from __future__ import annotations

import time

import pytest

from testbed.ceph import CephCluster, CephSpace
from tests.integration.storage.conftest import append_fsync, call


def _records(n: int, start: int = 0) -> list[str]:
    return [f"record {i}" for i in range(start, start + n)]


async def _write(space_dir: object, records: list[str], timeout: float) -> list[float]:
    """Append+fsync each record in a worker thread; returns each one's latency."""

    def run() -> list[float]:
        took = []
        for r in records:
            began = time.monotonic()
            append_fsync(space_dir / "log", r + "\n")  # type: ignore[operator]
            took.append(time.monotonic() - began)
        return took

    result: list[float] = await call(run, timeout)
    return result


async def test_an_osd_kill_loses_no_fsynced_write(
    ceph_cluster: CephCluster, ceph_space: CephSpace
) -> None:
    a = ceph_space.mount("a1")
    da = ceph_space.dir(a)
    await _write(da, _records(10), 30)
    ceph_cluster.kill_osd(1)
    during = await _write(da, _records(10, 10), 60)
    began = time.monotonic()
    ceph_cluster.restart_osd(1)
    up = time.monotonic() - began
    after = await _write(da, _records(10, 20), 60)
    ceph_cluster.wait_healthy(120)
    clean = time.monotonic() - began
    print(
        f"\nMEASURE OSD SIGKILL under writes: append+fsync max {max(during):.2f}s while down, "
        f"{max(after):.2f}s after the restart; osd up again {up:.1f}s, all PGs clean "
        f"{clean:.1f}s after the restart"
    )
    # A fresh node reads every acknowledged record from the cluster, not from a's cache.
    c = ceph_space.mount("c1")
    assert (ceph_space.dir(c) / "log").read_text().splitlines() == _records(30)


@pytest.mark.slow  # ~20 s: the mons replace a silent MDS after mds_beacon_grace (15 s)
async def test_an_active_mds_kill_loses_no_fsynced_write(
    ceph_cluster: CephCluster, ceph_space: CephSpace
) -> None:
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da = ceph_space.dir(a)
    await _write(da, _records(10), 30)
    began = time.monotonic()
    killed = ceph_cluster.kill_active_mds()
    # Metadata operations stall until the standby is active (mds_beacon_grace, 15 s).
    during = await _write(da, _records(5, 10), 120)
    took = time.monotonic() - began
    now = ceph_cluster.wait_active_mds(60, other_than=killed)
    print(
        f"\nMEASURE active MDS SIGKILL (mds.{killed} -> mds.{now}): the next append+fsync took "
        f"{max(during):.1f}s; 5 writes done {took:.1f}s after the kill"
    )
    assert (ceph_space.dir(b) / "log").read_text().splitlines() == _records(15)
    c = ceph_space.mount("c1")
    assert (ceph_space.dir(c) / "log").read_text().splitlines() == _records(15)
    ceph_cluster.restart_mds(killed)
