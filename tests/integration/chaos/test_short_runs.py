"""Short chaos runs against real etcd/Consul, supervisors, dev atServers and the directory.

Each run starts its own cluster (3-member etcd or a Consul dev agent) because the faults
kill and freeze its servers; the session-wide fixtures stay untouched.
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

REPO = Path(__file__).resolve().parents[3]

KINDS = {b: kinds_for(b, partition=True) for b in ("etcd", "consul")}


@pytest.mark.slow
@pytest.mark.timeout(600)
# Seeds chosen so the short schedules cover most fault kinds (9 of 10 for etcd, 5 of 6 for Consul).
@pytest.mark.parametrize(("backend", "faults", "seed"), [("etcd", 10, 383), ("consul", 5, 391)])
def test_short_chaos_run_has_no_violation_and_loses_no_write(
    tmp_path: Path, backend: str, faults: int, seed: int
) -> None:
    result = run_chaos(
        RunOptions(
            backend=backend, nodes=3, atsigns=3, faults=faults, seed=seed,
            report_dir=tmp_path / "report", kinds=KINDS[backend],
        )
    )  # fmt: skip
    r = result.report
    assert r["violations"] == [], r["violations"]
    assert r["lost_writes"] == 0
    assert r["acknowledged_writes"] > 50
    assert r["verified_writes"] == r["acknowledged_writes"]
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
    assert "still running after stop" not in out


def test_demo_says_what_did_not_come_up(tmp_path: Path) -> None:
    """Never pretend: an impossible cluster (the etcd binary missing) fails with the reason."""
    env = {**os.environ, "PATH": "/nonexistent", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "demo", "--duration", "60",
         "--base-dir", str(tmp_path / "demo")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "did not come up" in out and "etcd" in out


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
