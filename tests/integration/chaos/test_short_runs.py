"""Short chaos runs against real etcd/Consul, supervisors, dev atServers and the directory.

Each run starts its own cluster (3-member etcd or a Consul dev agent) because the faults
kill and freeze its servers; the data is on the session's CephFS (each node its own mount;
its daemons killed by the storage faults are healed after each test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.faults import kinds_for
from chaos.run import RunOptions, recheck, run_chaos
from testbed.ceph import CephCluster

REPO = Path(__file__).resolve().parents[3]

KINDS = {b: kinds_for(b, partition=True) for b in ("etcd", "consul")}


@pytest.mark.slow
@pytest.mark.timeout(600)
# Seeds chosen so the short schedules cover the three storage faults and most others (10 of 13
# kinds for etcd, 6 of 9 for Consul).
@pytest.mark.parametrize(("backend", "faults", "seed"), [("etcd", 10, 419), ("consul", 6, 6)])
def test_short_chaos_run_has_no_violation_and_loses_no_write(
    tmp_path: Path, backend: str, faults: int, seed: int, ceph_cluster: CephCluster
) -> None:
    result = run_chaos(
        RunOptions(
            backend=backend, nodes=3, atsigns=3, faults=faults, seed=seed,
            report_dir=tmp_path / "report", kinds=KINDS[backend], ceph=ceph_cluster,
        )
    )  # fmt: skip
    r = result.report
    assert r["violations"] == [], r["violations"]
    assert r["lost_writes"] == 0
    assert r["acknowledged_writes"] > 50
    assert r["verified_writes"] == r["acknowledged_writes"]
    # And again from the files on CephFS, each atSign through a node that does not own it.
    assert r["verified_through_other_mounts"] == r["acknowledged_writes"], r["mount_readback"]
    assert len(r["faults"]) == faults
    for f in r["faults"]:  # a member fault says whether it hit the leader
        if f["kind"] in ("kill-etcd-member", "freeze-etcd-member"):
            assert f["detail"].endswith(("was the leader", "was a follower")), f
    assert r["notes"] == []  # steady state before every fault, nothing left running
    assert result.report_path.is_file()
    assert result.timeline_path.stat().st_size > 10_000
    again = json.loads(json.dumps(recheck(tmp_path / "report").to_json()))
    saved = json.loads(result.report_path.read_text())
    assert again == {k: saved[k] for k in again}  # the saved histories give the same verdict


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_per_node_data_roots_show_refusals_instead_of_lost_writes(tmp_path: Path) -> None:
    """One disk per node: a node killed whole leaves its atSigns refused elsewhere (their
    copies are not the latest) until it returns; nothing acknowledged is ever lost."""
    result = run_chaos(
        RunOptions(
            backend="etcd", nodes=3, atsigns=3, faults=3, seed=5,
            report_dir=tmp_path / "report", kinds=("kill-node",), data_roots="per-node",
            storage="local",
        )
    )  # fmt: skip
    r = result.report
    assert r["violations"] == [], r["violations"]
    assert r["lost_writes"] == 0
    assert r["verified_writes"] == r["acknowledged_writes"] > 20
    assert r["stale_data_refusals"] > 0, r
    assert r["notes"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_tour_without_a_terminal_fails_over_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--nodes", "3", "--atsigns", "3",
         "--duration", "150", "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=280,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Consul UI:" in out and "directory:" in out and "status:" in out
    assert "SIGKILL node" in out and "failover:" in out
    flat = " ".join(out.split())  # rich wraps long lines
    assert "data on cephfs" in flat, out
    # Every acknowledged write (5 per atSign) is read back through the new owners.
    assert "read back 15/15 acknowledged writes after the failover" in flat, out
    assert "still running after stop" not in out


def test_demo_says_what_did_not_come_up(tmp_path: Path) -> None:
    """Never pretend: an impossible cluster (the etcd binary missing) fails with the reason."""
    env = {**os.environ, "PATH": "/nonexistent", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--duration", "60", "--storage", "local",
         "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "did not come up" in out and "etcd" in out


def test_demo_without_ceph_says_so_and_never_falls_back(tmp_path: Path) -> None:
    """CephFS is the default: when Ceph cannot start, the demo says so and exits 1 (it
    never runs on a shared local directory instead)."""
    env = {**os.environ, "PATH": "/nonexistent", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--duration", "60",
         "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    flat = " ".join(out.split())
    assert "did not come up: Ceph (CephFS) did not start" in flat, out
    assert "Traceback" not in out and "SIGKILL node" not in out, out


def test_demo_with_docker_and_no_engine_says_what_is_missing(tmp_path: Path) -> None:
    """No engine answers and dockerd cannot be started: one line saying so, no traceback."""
    env = {
        **os.environ,
        "PATH": "/nonexistent",
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--runner", "docker", "--duration", "60",
         "--storage", "local", "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "DockerException" not in out, out
    flat = " ".join(out.split())
    assert f"no Docker engine on {tmp_path}/no-engine.sock: dockerd not found" in flat, out


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(400)
def test_demo_tour_with_the_docker_runner(tmp_path: Path, docker_client: object) -> None:
    """Docker on request: containers instead of processes, none left behind."""
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--runner", "docker", "--nodes", "3",
         "--atsigns", "3", "--duration", "240", "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=380,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    flat = " ".join(out.split())  # rich wraps long lines
    assert "(docker runner)" in flat and "failover:" in flat
    assert "still running after stop" not in out
