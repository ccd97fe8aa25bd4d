"""The data guard against real supervisors, etcd/Consul, the directory and an at-protocol client.

Nodes with their own data roots (one disk per machine, as ansible/ deployed them): the owner
is killed whole and the standby must refuse rather than serve an empty copy; a restored
backup is refused until ``supervisor data accept --yes``. (Nodes that share their storage,
CephFS, and serve every acknowledged write after a takeover: ``tests/integration/storage``.)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atserver_runner.paths import atsign_dir
from chaos.cluster import Cluster, ClusterSpec
from tests.integration.chaos_cluster import (
    cli,
    directory_answer,
    owner,
    read,
    served_port,
    status_row,
    wait,
    write,
)

WRITES = 20


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def start(backend: str, data_roots: str, nodes: int = 2) -> Cluster:
        spec = ClusterSpec(
            base_dir=tmp_path / f"c{len(made)}",
            backend=backend,  # type: ignore[arg-type]
            nodes=nodes,
            atsigns=1,
            data_roots=data_roots,  # type: ignore[arg-type]
            start_timeout=120,
        )
        cluster = Cluster(spec)
        made.append(cluster)
        cluster.start()
        return cluster

    try:
        yield start
    finally:
        for c in made:
            c.stop()
            assert c.leftovers() == []


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["etcd", "consul"])
def test_separate_data_roots_refuse_instead_of_serving_an_empty_copy(
    make: Callable[..., Cluster], backend: str
) -> None:
    c = make(backend, "per-node")
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(60)
    first = owner(c, atsign)
    other = next(n for n in c.nodes if n is not first)
    written = write(c, WRITES)
    assert len(written) == WRITES

    first.kill_node()  # supervisor, fence and atServer: SIGKILL
    bound = 2 * c.ttl + 10 if backend == "consul" else c.ttl + 10

    def refused() -> bool:
        st = other.status(timeout=2.0) or {}
        return atsign in st.get("stale_data_refused", {})

    took = wait(refused, bound, f"{other.name} to refuse {atsign}")
    print(f"\nMEASURE {backend} refusal {took:.1f}s after the kill (ttl {c.ttl:g})")
    reason = other.status()["stale_data_refused"][atsign]["reason"]  # type: ignore[index]
    assert reason.startswith("data dir holds no generation, the last start was "), reason
    assert reason.endswith(f" on {first.name}"), reason
    # The cycle's sentence is logged when the cycle ends, just after status shows the refusal.
    sentence = f"refused {atsign}: {reason}"
    wait(lambda: sentence in other.process.log_path.read_text(), 5, "the cycle's sentence")
    # Visible: status names the refusing node; the directory says null, never an empty store.
    row = status_row(other, atsign)
    assert row["owner"] is None and row["health"] == f"stale-data@{other.name}", row
    # The dead node's instance turns critical with its node check (TTL: the renew deadline);
    # its Consul agent may take until an anti-entropy pass to tell the servers (seconds to
    # ~15 s on Consul 1.8). Until then the directory names the dead atServer, never another.
    took = wait(lambda: directory_answer(c, atsign) is None, 40, "the directory to say null")
    print(f"MEASURE {backend} the directory said null {took:.1f}s after the refusal")
    time.sleep(2)  # and it stays that way
    assert not other.status()["claims_held"]  # type: ignore[index]
    assert directory_answer(c, atsign) is None

    # The node with the current copy comes back: it serves every acknowledged write.
    first.start()
    # A restarted Consul agent restores its registrations with the checks they had, so
    # until the supervisor fails its node check the directory may name the dead atServer
    # (a client retries); it must end up naming the one that runs.
    restarted = time.monotonic()
    stale_until = None

    def names_the_new_one() -> bool:
        nonlocal stale_until
        answer, port = directory_answer(c, atsign), served_port(first, atsign)
        if answer is not None and answer[1] != port:
            stale_until = time.monotonic() - restarted
        return answer is not None and answer[1] == port

    took = wait(names_the_new_one, 60, f"the directory to name {first.name}'s new atServer")
    print(
        f"MEASURE {backend} serving again {took:.1f}s after the restart; the directory named "
        f"an old address until {stale_until}s"
    )
    back = read(c, written)
    assert back.complete, back
    assert owner(c, atsign) is first


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_restored_backup_is_refused_until_accepted(make: Callable[..., Cluster]) -> None:
    c = make("etcd", "per-node")
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(60)
    node = owner(c, atsign)
    data_dir = atsign_dir(c.node_data_root(node.name), atsign)
    early = write(c, 5)
    backup = c.base / "backup"
    shutil.copytree(data_dir, backup)  # the backup holds the current generation
    # A new generation on the same node (the atServer crashed and was started again).
    token_before = status_row(node, atsign)["token"]
    node.crash_workload(atsign)
    wait(
        lambda: (
            (status_row(node, atsign)["token"] or 0) > token_before
            and status_row(node, atsign)["health"] == "passing"
        ),
        60,
        "a restart with a new generation",
    )
    late = write(c, 5)
    node.stop()  # clean: deregistered, released
    # The disk is lost and restored from the backup: one generation behind.
    shutil.rmtree(data_dir)
    shutil.copytree(backup, data_dir)
    node.start()

    def refused() -> bool:
        st = node.status(timeout=2.0) or {}
        return atsign in st.get("stale_data_refused", {})

    wait(refused, 60, "the restored node to refuse its copy")
    reason = node.status()["stale_data_refused"][atsign]["reason"]  # type: ignore[index]
    assert "data dir holds generation" in reason and "the last start was" in reason, reason
    assert directory_answer(c, atsign) is None

    dry = cli("data", "accept", atsign, "--config", str(node.config_path))
    assert dry.returncode == 0, dry.stderr
    assert "the last start was generation" in dry.stdout and "given up" in dry.stdout
    assert "give --yes" in dry.stdout
    time.sleep(2)
    assert directory_answer(c, atsign) is None  # only printed

    res = cli("data", "accept", atsign, "--config", str(node.config_path), "--yes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "recorded generation" in res.stdout
    accepted = int(res.stdout.split("recorded generation ")[1].split()[0])
    wait(lambda: directory_answer(c, atsign) is not None, 60, "the accepted copy to be served")
    row = status_row(node, atsign)
    assert row["health"] == "passing" and row["generation"] > accepted, row
    assert row["generation"] == row["token"]
    assert read(c, early).complete
    gone = read(c, late)
    assert gone.found == 0  # given up, as accept said

    # accept refuses while the atSign runs anywhere.
    running = cli("data", "accept", atsign, "--config", str(node.config_path), "--yes")
    assert running.returncode == 1
    assert f"{atsign} is running on {node.name}" in running.stderr
