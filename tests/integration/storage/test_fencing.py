"""Storage-layer fencing: node B evicts and blocklists node A's CephFS client (storage.ceph_fence).

Invariant 6 of the design: before the new owner starts, it fences the old owner at the
storage layer, so that nothing the old owner writes afterwards lands, and the new owner can
open the old owner's files at once (not after the MDS's ``session_timeout``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import TextIO

import pytest

from storage import (
    CephFencer,
    ClientIdentity,
    probe_mount,
    read_mount_client_id,
    read_mount_identity,
)
from testbed.ceph import CephCluster, CephSpace
from tests.integration.storage.conftest import (
    Background,
    append_fsync,
    call,
    close_quietly,
    errno_of,
    open_append,
)

FENCED_ERRNOS = {errno.ESHUTDOWN, errno.EIO, errno.ENOTCONN, errno.EBADF}


def _later_ops_fail(d: Path, f: TextIO) -> dict[str, int | None]:
    """Every kind of operation on a fenced mount (``f``: a file it has open); name -> errno
    (None if it succeeded)."""

    def write() -> None:
        f.write("after the fence\n")
        f.flush()
        os.fsync(f.fileno())

    return {
        "write+fsync": errno_of(write),
        "create": errno_of(lambda: (d / "new-after-fence").write_text("x")),
        "stat": errno_of(lambda: os.stat(d / "f")),
        "listdir": errno_of(lambda: os.listdir(d)),
        "read": errno_of(lambda: (d / "f").read_text()),
        "mkdir": errno_of(lambda: os.mkdir(d / "dir-after-fence")),
        "rename": errno_of(lambda: os.rename(d / "f", d / "f-renamed")),
    }


async def test_a_mount_reports_its_own_identity(ceph_space: CephSpace, fencer: CephFencer) -> None:
    a = ceph_space.mount("a1")
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    assert ident.entity == a.entity
    assert ident.root == "/atservers" and ident.fs_name == "atfs" and not ident.blocklisted
    assert ident.mount_point == str(a.path)
    assert await read_mount_client_id(a.path, timeout=5) == ident.global_id
    assert ClientIdentity.from_dict(ident.to_dict()) == ident
    sessions = await fencer.list_sessions(a.entity)
    assert [(s.global_id, s.addr, s.entity) for s in sessions] == [
        (ident.global_id, ident.addr, a.entity)
    ]


async def test_evicting_a_live_node_fences_it_and_frees_its_files(
    ceph_space: CephSpace, fencer: CephFencer
) -> None:
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    f = open_append(da / "f")
    try:
        f.write("before\n")
        f.flush()
        os.fsync(f.fileno())

        result = await fencer.evict(a.entity, known=[ident], timeout=20)
        print(f"\nMEASURE evict live client: {result}")
        assert result.fenced, str(result)
        assert [s.global_id for s in result.evicted] == [ident.global_id]
        assert ident.addr in result.blocklisted
        assert await fencer.is_blocklisted(str(ident.addr))
        # b, which did not ask a for anything, opens a's file at once.
        began = time.monotonic()
        assert await call(lambda: (db / "f").read_text(), 5) == "before\n"
        print(f"MEASURE b read a's open file {time.monotonic() - began:.3f}s after the eviction")

        failures = await call(lambda: _later_ops_fail(da, f), 30)
        print(f"MEASURE errnos on the evicted mount: {failures}")
        assert all(e in FENCED_ERRNOS for e in failures.values()), failures
        assert (await read_mount_identity(a.admin_socket, timeout=5)).blocklisted
    finally:
        await call(lambda: close_quietly(f), 10)
    await asyncio.sleep(1.0)  # nothing lands later either
    assert (db / "f").read_text() == "before\n"
    assert sorted(os.listdir(db)) == ["f"]


async def test_a_frozen_node_evicted_then_thawed_writes_nothing(
    ceph_space: CephSpace, fencer: CephFencer
) -> None:
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    f = open_append(da / "f")
    f.write("acknowledged\n")
    f.flush()
    os.fsync(f.fileno())
    f.write("written just before the freeze\n")  # reaches ceph-fuse, not the OSDs
    f.flush()
    a.freeze()
    try:
        # a's capabilities on the file block b (until session_timeout, 60 s, without a fence).
        reader = Background(lambda: (db / "f").read_text())
        assert not await reader.wait(2.0), "b read a's file while a held its caps frozen"

        began = time.monotonic()
        result = await fencer.evict(a.entity, known=[ident], timeout=20)
        assert result.fenced, str(result)
        assert await reader.wait(10.0), "b still blocked after the eviction"
        assert reader.get() == "acknowledged\n"
        assert reader.finished_at is not None
        print(
            f"\nMEASURE evict frozen client: {result}; b's blocked read returned "
            f"{reader.finished_at - began:.3f}s after the eviction began"
        )
    finally:
        a.thaw()
    await asyncio.sleep(1.0)  # a learns that it was fenced (and drops its dirty data)
    # The pitfall: this fsync may report success for data that never landed ...
    fsync_errno = await call(lambda: errno_of(lambda: os.fsync(f.fileno())), 15)
    print(f"MEASURE fsync after the thaw: {'success' if fsync_errno is None else fsync_errno}")
    # ... so a write is acknowledged only after a fresh operation after the fsync succeeded:
    with pytest.raises(OSError) as fresh:
        await probe_mount(da, timeout=15)
    assert fresh.value.errno in FENCED_ERRNOS
    failures = await call(lambda: _later_ops_fail(da, f), 30)
    assert all(e in FENCED_ERRNOS for e in failures.values()), failures
    await call(lambda: close_quietly(f), 10)
    await asyncio.sleep(1.0)
    assert (db / "f").read_text() == "acknowledged\n"
    assert sorted(os.listdir(db)) == ["f"]


async def test_evicting_a_killed_node_frees_its_files_at_once(
    ceph_space: CephSpace, fencer: CephFencer
) -> None:
    """The owner dies whole (its ceph-fuse too): its session keeps its capabilities until the
    MDS's session_timeout (60 s) unless the new owner evicts it."""
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    f = open_append(da / "f")
    f.write("acknowledged\n")
    f.flush()
    os.fsync(f.fileno())
    f.write("lost with the node\n")
    f.flush()
    a.kill()
    reader = Background(lambda: (db / "f").read_text())
    assert not await reader.wait(2.0), "b read the file while the dead a held its caps"
    began = time.monotonic()
    result = await fencer.evict(a.entity, known=[ident], timeout=20)
    assert result.fenced, str(result)
    assert [s.global_id for s in result.evicted] == [ident.global_id]
    assert await reader.wait(10.0), "b still blocked after the eviction"
    assert reader.finished_at is not None
    print(
        f"\nMEASURE evict killed client: {result}; b's blocked read returned "
        f"{reader.finished_at - began:.3f}s after the eviction began"
    )
    assert reader.get() == "acknowledged\n"
    await call(lambda: close_quietly(f), 10)


async def test_a_blocklist_alone_fences_when_no_mds_is_asked(
    ceph_cluster: CephCluster, ceph_space: CephSpace
) -> None:
    """The fence without MDS commands (no MDS answers, or a key with mon caps only): blocklist
    the published address; the MDS drops the session when it sees the OSD map."""
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    append_fsync(da / "f", "acknowledged\n")
    f = open_append(da / "f")
    f.write("dirty\n")
    f.flush()
    a.freeze()
    blocklister = CephFencer(
        conffile=ceph_cluster.conf_path,
        entity="client.blocklister",
        keyring=ceph_cluster.blocklister_keyring(),
        timeout=10,
    )
    await blocklister.connect()
    try:
        reader = Background(lambda: (db / "f").read_text())
        assert not await reader.wait(1.0)
        began = time.monotonic()
        assert await blocklister.blocklist(str(ident.addr), timeout=10) == ident.addr
        listed = time.monotonic() - began
        assert await reader.wait(40.0), "the MDS did not drop the blocklisted session"
        assert reader.finished_at is not None
        print(
            f"\nMEASURE blocklist only: committed in {listed:.3f}s; b's blocked read returned "
            f"{reader.finished_at - began:.2f}s after it began (the MDS applied the OSD map)"
        )
        assert reader.get() == "acknowledged\n"
        assert await blocklister.is_blocklisted(str(ident.addr))
        # This key cannot list sessions: evict() says so instead of claiming a fence.
        result = await blocklister.evict(a.entity, known=[ident])
        assert not result.fenced and result.blocklisted == (ident.addr,), str(result)
        assert any("errno 13" in e for e in result.errors), str(result)
    finally:
        a.thaw()
        await blocklister.close()
    with pytest.raises(OSError) as fresh:
        await probe_mount(da, timeout=15)
    assert fresh.value.errno in FENCED_ERRNOS
    await call(lambda: close_quietly(f), 10)
    assert (db / "f").read_text() == "acknowledged\n"


async def test_a_fenced_mount_comes_back_with_a_remount(
    ceph_space: CephSpace, fencer: CephFencer
) -> None:
    a, b = ceph_space.mount("a1"), ceph_space.mount("b1")
    da, db = ceph_space.dir(a), ceph_space.dir(b)
    append_fsync(da / "f", "before\n")
    old = await read_mount_identity(a.admin_socket, timeout=5)
    assert (await fencer.evict(a.entity, known=[old])).fenced
    assert errno_of(lambda: os.listdir(da)) in FENCED_ERRNOS

    took = a.remount()
    new = await read_mount_identity(a.admin_socket, timeout=5)
    await probe_mount(da, timeout=10)
    print(f"\nMEASURE remount of a fenced mount: {took:.2f}s (new client {new.global_id})")
    assert (new.global_id, new.addr) != (old.global_id, old.addr)
    assert await fencer.is_blocklisted(str(old.addr))
    assert not await fencer.is_blocklisted(str(new.addr))
    assert (da / "f").read_text() == "before\n"
    append_fsync(da / "f", "after the remount\n")
    assert (db / "f").read_text() == "before\nafter the remount\n"


async def test_evicting_a_node_without_sessions_blocklists_its_published_address(
    ceph_space: CephSpace, fencer: CephFencer
) -> None:
    a = ceph_space.mount("a1")
    ident = await read_mount_identity(a.admin_socket, timeout=5)
    a.unmount()
    result = await fencer.evict(a.entity, known=[ident])
    assert result.fenced and result.evicted == () and result.blocklisted == (ident.addr,)
    assert "no session" in str(result)
    with pytest.raises(ValueError, match="own entity"):
        await fencer.evict("client.fence")
    with pytest.raises(ValueError, match="nonce 0"):
        await fencer.blocklist("127.0.0.1:0/0")


async def test_evicting_one_instance_keeps_the_nodes_new_mount(
    ceph_space: CephSpace, ceph_cluster: CephCluster, fencer: CephFencer, tmp_path: Path
) -> None:
    """A node that lost its claims may have mounted anew since: the takeover fences the
    client instance that held the atSign (its global id), not every mount of the node."""
    old = ceph_space.mount("a1")
    new = ceph_cluster.mount(ceph_space.entity_name("a1"), tmp_path / "again")
    ceph_space.mounts["a1-again"] = new  # unmounted by the space at the end
    old_id = await read_mount_identity(old.admin_socket, timeout=5)
    new_id = await read_mount_identity(new.admin_socket, timeout=5)
    assert old_id.entity == new_id.entity and old_id.global_id != new_id.global_id
    result = await fencer.evict(
        old.entity, known=[old_id], instances=[old_id.global_id], timeout=20
    )
    assert result.fenced, str(result)
    assert [s.global_id for s in result.evicted] == [old_id.global_id]
    assert result.blocklisted == (old_id.addr,)
    with pytest.raises(OSError):
        await probe_mount(ceph_space.dir(old), timeout=10)
    await probe_mount(ceph_space.dir(new), timeout=10)  # the new mount works
    assert not await fencer.is_blocklisted(str(new_id.addr))
