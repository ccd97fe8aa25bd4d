"""A node never self-fences because its host is busy.

Both cores are pinned at 100 % by CPU-bound workload processes for three minutes while a
real `supervisor run` node holds its atSigns: zero self-fencing, zero session loss, no
atServer restarted. (Before the session keeper had its own thread, renewals waited behind
probes and starts on one event loop, and a busy node fenced everything.)
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

import psutil
import pytest

from testbed.process import ManagedProcess
from tests.integration.supervisor.conftest import MakeCluster

LOAD_SECONDS = 180
HOGS = 2 * (os.cpu_count() or 2)


@pytest.mark.slow
@pytest.mark.timeout(LOAD_SECONDS + 240)
def test_full_cpu_load_for_minutes_no_self_fencing_no_session_loss(
    make_cluster: MakeCluster,
) -> None:
    atsigns = tuple(f"@load{i:02d}" for i in range(12))
    c = make_cluster(
        "etcd", nodes=(("a1", "A"),), atsigns=atsigns, overrides={"timing.ttl": 6}, storage="local"
    )
    c.ttl = 6
    c.wait(c.all_once, 90, "every atSign running once and passing")
    node = c.nodes["a1"]
    tokens = c.running()
    hogs = [
        ManagedProcess(
            f"hog{i}",
            [sys.executable, "-c", "while True: pass"],
            c.base / f"hog{i}.log",
        )
        for i in range(HOGS)
    ]
    load: list[float] = []
    try:
        for h in hogs:
            h.start()
        end = time.monotonic() + LOAD_SECONDS
        psutil.cpu_percent(interval=None)
        while time.monotonic() < end:
            time.sleep(10)
            load.append(psutil.cpu_percent(interval=None))
            assert node.proc.running(), node.proc.log_tail(30)
    finally:
        for h in hogs:
            h.stop(timeout=5)
    print(f"\nMEASURE CPU busy during the load: {min(load):.0f}-{max(load):.0f} % ({HOGS} hogs)")
    assert min(load) > 90, load  # the cores really were pinned
    log = node.proc.log_path.read_text()
    assert log.count("event=session-opened") == 1, "the session was lost and opened again"
    assert "event=session_lost" not in log
    assert "self-fencing" not in log and "event=fenced" not in log
    assert node.fence_log() == []
    assert c.running() == tokens, "an atServer was stopped or restarted under load"
    with urllib.request.urlopen(node.api + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    fencings = [
        ln for ln in metrics.splitlines() if ln.startswith("atfailover_self_fencings_total{")
    ]
    assert fencings, "the counter is exported at 0 for every reason from the start"
    assert all(ln.endswith(" 0.0") for ln in fencings), fencings
    c.wait(c.all_once, 60, "every atSign passing again after the load")
