"""The node's CephFS client identity: what generation records name for a takeover to fence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import storage.ceph_fence as ceph_fence
from storage.ceph_fence import CephFenceError, ClientIdentity
from supervisor.storage import StorageGuard
from supervisor.takeover_fence import parse_client_ref
from tests.unit.daemon_harness import node_config


def cephfs_guard(tmp_path: Path, changes: list[str]) -> StorageGuard:
    for name in ("ceph.conf", "fence.keyring"):
        (tmp_path / name).write_text("")
    cfg = node_config(
        tmp_path,
        atsigns=[],
        storage={
            "kind": "cephfs",
            "cephfs": {
                "conf": str(tmp_path / "ceph.conf"),
                "entity": "client.a1-test",
                "mount": "external",
                "admin_socket": str(tmp_path / "fuse.asok"),
                "fencer_keyring": str(tmp_path / "fence.keyring"),
            },
        },
    )
    guard = StorageGuard(
        cfg, on_change=lambda: changes.append("changed"), nothing_runs=lambda: True
    )

    async def ok() -> tuple[bool, str, bool]:
        return True, "", False

    guard._probe = ok  # type: ignore[method-assign]
    return guard


def test_a_failed_identity_read_is_retried_and_the_entity_named_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[ClientIdentity | Exception] = [
        CephFenceError("no answer from the admin socket within 2s"),
        ClientIdentity("client.a1-test", 4160, "127.0.0.1:0/1234"),
    ]

    async def read(sock: Path, *, timeout: float) -> ClientIdentity:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(ceph_fence, "read_mount_identity", read)
    changes: list[str] = []
    guard = cephfs_guard(tmp_path, changes)

    async def run() -> None:
        assert await guard.check()  # ready; the identity read fails
        assert guard.identity is None
        # Not empty: a takeover fences every mount of the entity, not a guessed client.<node>.
        assert guard.client_ref() == "client.a1-test//"
        assert parse_client_ref(guard.client_ref()) == ("client.a1-test", None, None)
        assert changes == ["changed"]
        assert await guard.check()  # still ready: the read is tried again, and works
        assert guard.client_ref() == "client.a1-test/4160/127.0.0.1:0/1234"
        assert changes == ["changed", "changed"]  # the node record learns the client
        assert await guard.check()  # known now: no further read
        assert not answers

    asyncio.run(run())


def test_no_client_ref_off_cephfs(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, atsigns=[])
    guard = StorageGuard(cfg, on_change=lambda: None, nothing_runs=lambda: True)
    assert guard.client_ref() == ""


def test_the_published_client_is_kept_for_the_next_mount_to_evict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed whole comes back with a new mount; the instance it mounted last is
    evicted first, once (its capabilities would block reads for a minute)."""

    async def read(sock: Path, *, timeout: float) -> ClientIdentity:
        return ClientIdentity("client.a1-test", 4160, "127.0.0.1:0/1234")

    monkeypatch.setattr(ceph_fence, "read_mount_identity", read)
    evicted: list[str] = []

    async def evict(ref: str) -> tuple[bool, str]:
        evicted.append(ref)
        return True, "evicted 1 session"

    async def run() -> None:
        guard = cephfs_guard(tmp_path, [])
        await guard.evict_previous_client()
        assert evicted == []  # nothing recorded yet
        assert await guard.check()
        # The node dies; its next supervisor (same state_dir) mounts anew.
        after = cephfs_guard(tmp_path, [])
        after.evict = evict
        await after.evict_previous_client()
        await after.evict_previous_client()
        assert evicted == ["client.a1-test/4160/127.0.0.1:0/1234"]

    asyncio.run(run())
