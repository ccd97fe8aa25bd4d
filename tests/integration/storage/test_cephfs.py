"""The CephFS test cluster: shared data between nodes, and each node key confined to its path."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest

from testbed.ceph import DATA_NAMESPACE, CephCluster, CephSpace
from tests.integration.storage.conftest import append_fsync


def test_fsynced_writes_are_visible_on_the_other_node_at_once(ceph_space: CephSpace) -> None:
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    took = []
    for i in range(20):
        began = time.perf_counter()
        append_fsync(da / "log", f"record {i}\n")
        took.append(time.perf_counter() - began)
        # No sleep, no retry: b reads what a fsynced.
        assert (db / "log").read_text().splitlines()[-1] == f"record {i}"
    # The other way round, the atomic-replace pattern: create, write, fsync, rename.
    tmp = db / "state.json.tmp"
    with open(tmp, "w") as f:
        f.write('{"token": 812}')
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, db / "state.json")
    assert json.loads((da / "state.json").read_text()) == {"token": 812}
    assert sorted(os.listdir(da)) == ["log", "state.json"]
    print(
        f"\nMEASURE cephfs 20-byte append+fsync on ceph-fuse: p50 "
        f"{statistics.median(took) * 1000:.1f} ms, max {max(took) * 1000:.1f} ms"
    )


def test_a_node_key_cannot_read_or_write_outside_its_path(
    ceph_cluster: CephCluster, ceph_space: CephSpace, tmp_path: Path
) -> None:
    import cephfs  # type: ignore[import-not-found]
    import rados  # type: ignore[import-not-found]

    # Something outside /atservers, written by the admin.
    outside = f"/outside-{ceph_space.token}"
    admin = ceph_cluster.admin_fs()
    admin.mkdirs(outside.encode(), 0o755)
    fd = admin.open(f"{outside}/secret".encode(), "w", 0o644)
    admin.write(fd, b"not for nodes", 0)
    admin.fsync(fd, 0)
    admin.close(fd)
    secret_ino = admin.stat(f"{outside}/secret".encode()).st_ino

    a = ceph_space.mount("a1")
    append_fsync(ceph_space.dir(a) / "mine", "mine")
    mine_ino = os.stat(ceph_space.dir(a) / "mine").st_ino
    name = ceph_space.entity_name("a1")
    # The mount's root is /atservers: nothing outside it is visible through it.
    assert outside.strip("/") not in os.listdir(a.path)

    # 1. ceph-fuse with the node key cannot mount the fs root or another directory.
    for i, root in enumerate(("/", outside)):
        with pytest.raises(RuntimeError, match="exited"):
            ceph_cluster.mount(name, tmp_path / f"bad{i}", root=root, timeout=30)

    conf = {"keyring": str(ceph_cluster.keyring_path(f"client.{name}"))}
    node = rados.Rados(conffile=str(ceph_cluster.conf_path), name=f"client.{name}", conf=conf)
    node.connect()
    try:
        # 2. Neither can libcephfs (the same check, without FUSE).
        for root in ("/", outside):
            fs = cephfs.LibCephFS(rados_inst=node)
            with pytest.raises(cephfs.PermissionError):
                fs.mount(root.encode(), filesystem_name=ceph_cluster.fs_name.encode())
            fs.shutdown()
        # 3. Raw RADOS, around the MDS: the file data outside /atservers (default namespace)
        # can be neither read nor written; the node's own file data (namespace atservers) can.
        io = node.open_ioctx(ceph_cluster.data_pool)
        with pytest.raises(rados.PermissionError):
            io.read(f"{secret_ino:x}.00000000")
        with pytest.raises(rados.PermissionError):
            io.write_full(f"{secret_ino:x}.00000000", b"overwritten")
        io.set_namespace(DATA_NAMESPACE)
        assert io.read(f"{mine_ino:x}.00000000") == b"mine"
        io.close()
        with pytest.raises(rados.PermissionError):
            meta = node.open_ioctx(ceph_cluster.metadata_pool)
            meta.read("1.00000000")
        # 4. A node key cannot fence anyone: no blocklisting, no MDS commands.
        bl = {"prefix": "osd blocklist", "blocklistop": "add", "addr": "127.0.0.1:0/1"}
        assert node.mon_command(json.dumps(bl), b"")[0] == -13
        fs = cephfs.LibCephFS(rados_inst=node)
        fs.init()
        active = ceph_cluster.active_mds()
        assert fs.mds_command(active, json.dumps({"prefix": "session ls"}), b"")[0] == -13
        fs.shutdown()
    finally:
        node.shutdown()
    # The secret is unchanged.
    fd = admin.open(f"{outside}/secret".encode(), "r", 0)
    assert admin.read(fd, 0, 100) == b"not for nodes"
    admin.close(fd)


def test_the_fencer_key_reads_no_data_and_cannot_unfence(
    ceph_cluster: CephCluster, ceph_space: CephSpace
) -> None:
    import rados

    a = ceph_space.mount("a1")
    append_fsync(ceph_space.dir(a) / "data", "private")
    ino = os.stat(ceph_space.dir(a) / "data").st_ino
    conf = {"keyring": str(ceph_cluster.fencer_keyring("fence"))}
    fencer = rados.Rados(conffile=str(ceph_cluster.conf_path), name="client.fence", conf=conf)
    fencer.connect()
    try:
        io = fencer.open_ioctx(ceph_cluster.data_pool)
        io.set_namespace(DATA_NAMESPACE)
        with pytest.raises(rados.PermissionError):
            io.read(f"{ino:x}.00000000")
        io.close()
        rm = {"prefix": "osd blocklist", "blocklistop": "rm", "addr": "127.0.0.1:0/1"}
        assert fencer.mon_command(json.dumps(rm), b"")[0] == -13
        auth = {"prefix": "auth get-or-create", "entity": "client.evil", "caps": ["mds", "allow"]}
        assert fencer.mon_command(json.dumps(auth), b"")[0] == -13
    finally:
        fencer.shutdown()
