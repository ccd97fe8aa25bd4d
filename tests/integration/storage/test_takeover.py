"""Takeovers on CephFS: real supervisors, each with its own ceph-fuse mount (its own cephx key)
of the session's Ceph cluster, etcd or Consul, the directory and an at-protocol client.

The owner is killed whole (supervisor, fence, atServer, ceph-fuse, Consul agent): the node
that takes over fences its client at the storage layer and serves every acknowledged write
from its own mount. The owner freezes whole with a write in flight and thaws after the
takeover: that write never lands and is never acknowledged. The owner's ceph-fuse dies: it
hands its atSigns off and mounts again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos.atclient import AtConnection, AtError, client_ssl_context
from chaos.cluster import Cluster, ClusterSpec, Node
from storage import CephFencer
from testbed.ceph import CephCluster
from tests.integration.chaos_cluster import (
    directory_answer,
    owner,
    read,
    readyz,
    served_by,
    status_row,
    wait,
    write,
)

WRITES = 20


@pytest.fixture
def make(tmp_path: Path, ceph_cluster: CephCluster) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def start(backend: str = "etcd", nodes: int = 2) -> Cluster:
        spec = ClusterSpec(
            base_dir=tmp_path / f"c{len(made)}",
            backend=backend,  # type: ignore[arg-type]
            nodes=nodes,
            atsigns=1,
            storage="cephfs",
            ceph=ceph_cluster,
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


def client_of(node: Node) -> dict[str, object]:
    """The CephFS client the node publishes (entity, global id, address)."""
    st = node.status() or {}
    client = (st.get("storage") or {}).get("client")
    assert client, f"{node.name} publishes no CephFS client: {st.get('storage')}"
    return dict(client)


def storage_fences(node: Node) -> list[str]:
    return [
        line
        for line in node.process.log_path.read_text(errors="replace").splitlines()
        if "event=storage-fence " in line
    ]


async def sessions_of(ceph: CephCluster, entity: str) -> list[int]:
    """Global ids of the MDS sessions of ``entity`` (what is still mounted as it)."""
    async with CephFencer(
        conffile=ceph.conf_path,
        entity="client.fence",
        keyring=ceph.fencer_keyring("fence"),
        fs_name=ceph.fs_name,
        timeout=20.0,
    ) as fencer:
        return [s.global_id for s in await fencer.list_sessions() if s.entity == entity]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["etcd", "consul"])
def test_a_killed_owner_s_writes_are_served_by_the_node_that_takes_over(
    make: Callable[..., Cluster], ceph_cluster: CephCluster, backend: str
) -> None:
    c = make(backend)
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(90)
    first = owner(c, atsign)
    other = next(n for n in c.nodes if n is not first)
    old_client = client_of(first)
    assert old_client["entity"] == c.ceph_entity(first.name)
    written = write(c, WRITES)
    assert len(written) == WRITES

    killed = time.monotonic()
    first.kill_node()
    bound = 2 * c.ttl + 30 if backend == "consul" else c.ttl + 30
    took = wait(lambda: served_by(c, other, atsign), bound, f"{other.name} to serve {atsign}")
    print(f"\nMEASURE {backend} cephfs takeover: served by {other.name} {took:.1f}s after the kill")

    # Every acknowledged write, from the other node's own mount of the same fs.
    back = read(c, written)
    assert back.complete and back.found == WRITES, back
    row = status_row(other, atsign)
    assert row["owner"] == other.name and row["generation"] == row["token"], row

    # The lost owner's client was fenced before the start: evicted, and its MDS session gone.
    fences = storage_fences(other)
    assert fences and "ok=True" in fences[0], fences
    assert str(old_client["global_id"]) in fences[0], fences
    gids = asyncio.run(sessions_of(ceph_cluster, str(old_client["entity"])))
    assert int(str(old_client["global_id"])) not in gids, gids
    print(f"MEASURE {backend} fence: {fences[0].split('event=storage-fence ', 1)[1]}")
    assert time.monotonic() - killed < bound + 30


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_frozen_owner_that_thaws_after_the_takeover_lands_nothing(
    make: Callable[..., Cluster],
) -> None:
    c = await asyncio.to_thread(make, "etcd")
    keys = c.atsigns[0]
    atsign = keys.atsign
    contested = f"contested.fence{atsign}"
    await asyncio.to_thread(c.wait_all_serving, 90)
    first = await asyncio.to_thread(owner, c, atsign)
    other = next(n for n in c.nodes if n is not first)
    before = await asyncio.to_thread(write, c, 10)
    where = await asyncio.to_thread(directory_answer, c, atsign)
    assert where is not None
    # A client of the owner, logged in, whose next write will reach it only after the thaw.
    ctx = client_ssl_context(c.ca.cert_path)
    zombie = AtConnection(atsign, keys.load_private(), ctx, timeout=120.0)
    await zombie.connect(*where)
    try:
        first.freeze_node()
        in_flight = asyncio.create_task(zombie.update(contested, "from-the-frozen-owner"))
        await asyncio.sleep(0.5)
        assert not in_flight.done()

        took = await asyncio.to_thread(
            wait, lambda: served_by(c, other, atsign), c.ttl + 30, f"{other.name} to serve"
        )
        print(f"\nMEASURE cephfs takeover of a frozen owner: {took:.1f}s")
        new = AtConnection(atsign, keys.load_private(), ctx, timeout=5.0)
        there = await asyncio.to_thread(directory_answer, c, atsign)
        assert there is not None
        await new.connect(*there)
        try:
            await new.update(contested, "from-the-new-owner")
        finally:
            await new.close()
        after = await asyncio.to_thread(write, c, 10)

        first.thaw_node()
        # The frozen atServer wakes up with a write to do, on a mount that was evicted.
        try:
            answer = await asyncio.wait_for(in_flight, 60)
        except AtError as exc:
            print(f"MEASURE the thawed owner's write failed: {exc}")
        else:
            pytest.fail(f"the fenced owner acknowledged a write after the takeover: {answer}")
    finally:
        await zombie.close()

    # Nothing it did landed: the new owner serves its own value and every earlier write.
    back = await asyncio.to_thread(read, c, [*before, (contested, "from-the-new-owner")])
    assert back.complete, back
    assert (await asyncio.to_thread(read, c, after)).complete

    # The thawed node stops what it ran, mounts anew (its client was fenced) and is ready.
    await asyncio.to_thread(wait, lambda: bool((first.status() or {}).get("ready")), 90, "ready")
    st = first.status() or {}
    assert atsign not in st.get("claims_held", []), st
    assert (
        st["storage"]["ready"]
        and st["storage"]["client"]["global_id"] != (client_of(other)["global_id"])
    )
    log = first.process.log_path.read_text(errors="replace")
    assert "event=storage-mounted" in log, "the fenced node did not mount again"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_owner_whose_mount_dies_hands_off_and_mounts_again(
    make: Callable[..., Cluster],
) -> None:
    c = make("etcd")
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(90)
    first = owner(c, atsign)
    other = next(n for n in c.nodes if n is not first)
    written = write(c, WRITES)
    fuse = first.fuse_pid()
    assert fuse is not None
    old_gid = client_of(first)["global_id"]
    killed = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(fuse[0], signal.SIGKILL)

    def not_ready_because_of_storage() -> bool:
        body = readyz(first)
        return body.get("ready") is False and "storage not ready" in str(body.get("why"))

    wait(not_ready_because_of_storage, 30, f"{first.name} to say its storage is not ready")
    wait(lambda: served_by(c, other, atsign), c.ttl + 30, f"{other.name} to serve")
    took = time.monotonic() - killed
    print(f"\nMEASURE a dead ceph-fuse: {atsign} served by {other.name} {took:.1f}s later")
    assert read(c, written).complete
    # A handoff, not a takeover: nothing to fence.
    assert not storage_fences(other), storage_fences(other)
    wait(lambda: bool((first.status() or {}).get("ready")), 60, f"{first.name} ready again")
    print(f"MEASURE {first.name} mounted again, ready {time.monotonic() - killed:.1f}s after")
    assert client_of(first)["global_id"] != old_gid
    log = first.process.log_path.read_text(errors="replace")
    assert f"event=storage-dead-client-evicted client=client.{first.name}" in log
    assert "ok=True" in log.split("event=storage-dead-client-evicted", 1)[1].splitlines()[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_owner_killed_whole_and_back_at_once_evicts_its_old_client_itself(
    make: Callable[..., Cluster], ceph_cluster: CephCluster
) -> None:
    """The chaos runs' kill-node tail (57-63 s p99): a node killed whole and started again
    before its claims expired has a live session, so the node taking its atSigns over does
    not fence it, and its dead client's capabilities blocked every read of the files it had
    open (and the node's own readiness probe) until the MDS timed the session out. The new
    mount now evicts the instance the node mounted last first."""
    c = make("etcd")
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(90)
    first = owner(c, atsign)
    old_client = client_of(first)
    written = write(c, WRITES)
    assert len(written) == WRITES

    killed = time.monotonic()
    first.kill_node()
    first.start()  # back at once: its old session still lives, nobody fences it as lost

    def served() -> bool:
        return any(served_by(c, n, atsign) for n in c.nodes)

    bound = c.ttl + 20  # the MDS's session timeout is 37-62 s here
    took = wait(served, bound, f"{atsign} to be served again")
    ready = wait(lambda: bool((first.status() or {}).get("ready")), bound, "ready again")
    print(
        f"\nMEASURE killed whole and back at once: {atsign} served {took:.1f}s after the "
        f"kill, {first.name} ready {time.monotonic() - killed:.1f}s after (wait {ready:.1f}s)"
    )
    assert read(c, written).complete
    log = first.process.log_path.read_text(errors="replace")
    evicted = [ln for ln in log.splitlines() if "event=storage-previous-client-evicted" in ln]
    assert evicted and "ok=True" in evicted[0], evicted
    assert f"/{old_client['global_id']}/" in evicted[0], (old_client, evicted)
    gids = asyncio.run(sessions_of(ceph_cluster, str(old_client["entity"])))
    assert int(str(old_client["global_id"])) not in gids, gids
    assert client_of(first)["global_id"] != old_client["global_id"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_node_killed_whole_that_ran_nothing_is_fenced_by_a_live_peer(
    make: Callable[..., Cluster], ceph_cluster: CephCluster
) -> None:
    """Its dead client's capabilities would block other nodes' atServers on files it had
    cached (the chaos runs' 46-63 s outages after killing a node that ran nothing): once
    its record leaves the DCS, the first live node evicts it."""
    c = make("etcd")
    atsign = c.atsigns[0].atsign
    c.wait_all_serving(90)
    first = owner(c, atsign)
    other = next(n for n in c.nodes if n is not first)
    gone = client_of(other)
    killed = time.monotonic()
    other.kill_node()

    def fence_lines() -> list[str]:
        return [
            ln
            for ln in first.process.log_path.read_text(errors="replace").splitlines()
            if "event=storage-departed-node-fenced" in ln and f"node={other.name}" in ln
        ]

    took = wait(lambda: bool(fence_lines()), c.ttl + 30, f"{first.name} to fence {other.name}")
    print(
        f"\nMEASURE a departed node's client fenced {took:.1f}s after the kill: {fence_lines()[0]}"
    )
    assert "ok=True" in fence_lines()[0] and f"/{gone['global_id']}/" in fence_lines()[0]
    gids = asyncio.run(sessions_of(ceph_cluster, str(gone["entity"])))
    assert int(str(gone["global_id"])) not in gids, gids
    assert served_by(c, first, atsign)  # the owner was not disturbed
    assert time.monotonic() - killed < c.ttl + 60

    # Back: it mounts anew (a new instance) and is ready.
    other.start()
    wait(lambda: bool((other.status() or {}).get("ready")), 60, f"{other.name} ready again")
    assert client_of(other)["global_id"] != gone["global_id"]
