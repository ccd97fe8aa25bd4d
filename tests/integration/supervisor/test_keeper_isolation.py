"""Renewals never wait behind other work: the session keeper has its own thread and loop.

A real Supervisor on real etcd (its runner and registrar in memory): the main event loop is
blocked for longer than the renew deadline, as a burst of reconcile work on a starved host
would; the session must stay alive, renewed and heartbeated all the while.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from leases.etcd import EtcdBackend
from supervisor.daemon import Supervisor
from testbed.etcd import EtcdCluster
from tests.unit.daemon_harness import FakeRegistrar, FakeRunner, node_config


async def test_a_blocked_main_loop_does_not_starve_the_session(
    etcd: EtcdCluster, tmp_path: Path, key_prefix: str
) -> None:
    cfg = node_config(
        tmp_path,
        atsigns=[{"atsign": "@alice"}],
        dcs={"prefix": key_prefix, "etcd": {"endpoints": etcd.endpoints}},
        timing={"ttl": 4},
    )
    backend = EtcdBackend(etcd.endpoints, key_prefix)
    sup = Supervisor(
        cfg,
        backend=backend,
        runner=FakeRunner(),
        registrar=FakeRegistrar(),  # type: ignore[arg-type]
        session_backend=lambda: EtcdBackend(etcd.endpoints, key_prefix),
        threaded_keeper=True,
    )
    stop = asyncio.Event()
    run = asyncio.create_task(sup.run(stop))
    try:
        for _ in range(100):
            if sup.ready:
                break
            await asyncio.sleep(0.05)
        assert sup.ready
        proxy = sup.session
        assert proxy is not None
        sid = proxy.session_id
        before = json.loads(sup.heartbeat_path.read_text())["deadline"]
        # Block the main loop for 1.5 x the renew deadline (2 s at ttl 4).
        time.sleep(3.0)  # noqa: ASYNC251 - blocking the loop is the point of this test
        after = json.loads(sup.heartbeat_path.read_text())["deadline"]
        assert after > before + 2.0, (before, after)  # the keeper renewed and wrote it
        assert not proxy.lost.is_set()
        assert sup.session is proxy and proxy.session_id == sid
        assert proxy.inner.renewals >= 2  # type: ignore[attr-defined]
        assert await backend.owner("@alice") is not None  # the claim is still held
    finally:
        stop.set()
        await asyncio.wait_for(run, 20)
        await backend.close()
    assert json.loads(sup.heartbeat_path.read_text())["state"] == "stopped"
