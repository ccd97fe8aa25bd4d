"""etcd with authentication on: username/password reach every call, and never the logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest
from aetcd import rpc

from leases import ClaimInfo, DCSUnavailable, Timing
from leases.etcd import EtcdBackend, _prefix_end
from testbed.etcd import etcd_binary
from testbed.ports import free_port
from testbed.process import ManagedProcess

PASSWORD = "s3cret-pa55word"
# Authenticate costs a bcrypt check on the server (0.1 s and more on a busy machine):
# a 1 s request timeout (ttl 10) leaves room for it.
TIMING = Timing.for_ttl(10.0)


async def _enable_auth(endpoint: str) -> None:
    """root user with the root role, then auth on (as ``etcdctl user add root; auth enable``)."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        auth = rpc.AuthStub(channel)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=5)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


@pytest.fixture
async def auth_etcd(tmp_path: Path) -> AsyncIterator[str]:
    """A single etcd of its own (auth cannot be turned on in the shared one)."""
    client_port, peer_port = free_port(), free_port()
    endpoint = f"127.0.0.1:{client_port}"
    argv = [
        etcd_binary(),
        "--name", "auth0",
        "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", f"http://{endpoint}",
        "--advertise-client-urls", f"http://{endpoint}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"auth0=http://127.0.0.1:{peer_port}",
        "--logger", "zap",
        "--log-outputs", "stderr",
    ]  # fmt: skip
    proc = ManagedProcess("etcd-auth", argv, tmp_path / "etcd.log")
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await _enable_auth(endpoint)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline or not proc.running():
                    raise AssertionError(f"etcd did not start: {proc.log_tail()}") from None
                await asyncio.sleep(0.2)
        yield endpoint
    finally:
        proc.stop()


async def test_password_auth_works_and_stays_out_of_logs(
    auth_etcd: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = EtcdBackend([auth_etcd], key_prefix, username="root", password=PASSWORD)
    try:
        assert PASSWORD not in repr(backend)
        session = await backend.open_session("n", TIMING)
        claim = await session.claim("@auth", ClaimInfo(node="n"))
        assert claim is not None
        assert await backend.owners() == {"@auth": claim}
        events = backend.watch()
        first = await asyncio.wait_for(anext(events), 5)
        assert first.snapshot == {"@auth": claim}
        await events.aclose()  # type: ignore[attr-defined]
        assert await session._renew_once(TIMING.request_timeout)
        assert not session.lost.is_set()
        assert await session.release(claim)
        await session.close()
    finally:
        await backend.close()
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize("password", [None, "wrong"])
async def test_missing_or_wrong_credentials_are_a_clear_error(
    auth_etcd: str, key_prefix: str, password: str | None
) -> None:
    backend = EtcdBackend(
        [auth_etcd], key_prefix, username="root" if password else None, password=password
    )
    refused = r"(?i)authentication failed|user name is empty"
    try:
        if password is None:
            # etcd 3.4 grants leases to anyone; the claim is where auth bites.
            session = await backend.open_session("n", TIMING)
            with pytest.raises(DCSUnavailable, match=refused):
                await session.claim("@auth", ClaimInfo(node="n"))
            await session.close()
        else:
            with pytest.raises(DCSUnavailable, match=refused):
                await backend.open_session("n", TIMING)
        with pytest.raises(DCSUnavailable, match=refused):
            await backend.owners()
    finally:
        await backend.close()


async def _user_with_range(
    endpoint: str, name: str, key: str, perm: int, role: str | None = None
) -> None:
    """A user whose role grants ``perm`` on the keys under ``key`` (as root)."""
    role = role or name
    root = EtcdBackend([endpoint], "x", username="root", password=PASSWORD)
    try:

        async def grant(m: object, t: float, md: object) -> None:
            auth = rpc.AuthStub(m.channel)  # type: ignore[attr-defined]
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role), timeout=t, metadata=md)
            await auth.RoleGrantPermission(
                rpc.AuthRoleGrantPermissionRequest(
                    name=role,
                    perm=rpc.Permission(
                        permType=perm, key=key.encode(), range_end=_prefix_end(key.encode())
                    ),
                ),
                timeout=t,
                metadata=md,
            )
            await auth.UserAdd(
                rpc.AuthUserAddRequest(name=name, password=PASSWORD), timeout=t, metadata=md
            )
            await auth.UserGrantRole(
                rpc.AuthUserGrantRoleRequest(user=name, role=role), timeout=t, metadata=md
            )

        await root._call("grant", grant, 10)
    finally:
        await root.close()


async def test_records_are_written_by_the_writer_role_and_read_by_the_nodes(
    auth_etcd: str, key_prefix: str
) -> None:
    """docs/supervisor.md, The inventory in the DCS: Access (etcd roles)."""
    from leases.records import make_record

    await _user_with_range(auth_etcd, "nodes", f"{key_prefix}/", rpc.Permission.READ)
    await _user_with_range(
        auth_etcd, "records-writer", f"{key_prefix}/atsigns/", rpc.Permission.READWRITE
    )
    nodes = EtcdBackend([auth_etcd], key_prefix, username="nodes", password=PASSWORD)
    writer = EtcdBackend([auth_etcd], key_prefix, username="records-writer", password=PASSWORD)
    try:
        await writer.write_atsign_records([make_record("@alice", {})])
        records, _ = await nodes.atsign_records()
        assert list(records) == ["@alice"]
        with pytest.raises(DCSUnavailable, match=r"(?i)permission denied"):
            await nodes.write_atsign_records([make_record("@bob", {})])
        with pytest.raises(DCSUnavailable, match=r"(?i)permission denied"):
            await writer.owners()
    finally:
        await nodes.close()
        await writer.close()
