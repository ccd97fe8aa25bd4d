"""etcd with three members: sessions and claims survive losing one member, not two."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from leases import ClaimInfo, DCSUnavailable, SessionState, Timing
from leases.etcd import EtcdBackend, EtcdSession
from testbed.etcd import EtcdCluster, EtcdMember

# A leader election takes etcd's election timeout (1 s here, randomized up to 2x)
# plus a round of votes; renewals cannot succeed meanwhile. renew_deadline (ttl/2)
# must outlast that plus one renew interval, so a cluster wants ttl >= 6 s.
TIMING = Timing.for_ttl(6.0)


@pytest.fixture
async def backend(etcd_cluster: EtcdCluster, key_prefix: str) -> AsyncIterator[EtcdBackend]:
    b = EtcdBackend(etcd_cluster.endpoints, key_prefix)
    try:
        yield b
    finally:
        await b.close()


def _member_at(cluster: EtcdCluster, endpoint: str) -> EtcdMember:
    return next(m for m in cluster.members if m.endpoint == endpoint)


async def _stays_alive(session: EtcdSession, seconds: float) -> None:
    """The session never reports LOST for ``seconds`` (longer than its renew deadline)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert session.state is not SessionState.LOST, session.lost_reason
        await asyncio.sleep(0.02)


async def _claim_within(session: EtcdSession, atsign: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            claim = await session.claim(atsign, ClaimInfo(node=session.node))
            assert claim is not None, f"{atsign} is free, the claim must succeed"
            return claim.token
        except DCSUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_killing_the_client_member_then_the_leader_keeps_claims(
    etcd_cluster: EtcdCluster, backend: EtcdBackend
) -> None:
    session = await backend.open_session("n1", TIMING)
    first = await session.claim("@kept", ClaimInfo(node="n1"))
    assert first is not None

    # 1. The member this client talks to dies: it moves on to another one.
    used = _member_at(etcd_cluster, backend.current_endpoint)
    await asyncio.to_thread(etcd_cluster.kill_member, used)
    await _stays_alive(session, TIMING.renew_deadline + 1.0)
    assert backend.current_endpoint != used.endpoint
    token = await _claim_within(session, "@after-member-loss", TIMING.renew_deadline)
    assert token > first.token
    assert (await backend.owner("@kept")) == first
    await asyncio.to_thread(etcd_cluster.restart_member, used)

    # 2. The leader dies (an election follows): renewals and claims keep working.
    leader = await asyncio.to_thread(etcd_cluster.leader)
    await asyncio.to_thread(etcd_cluster.kill_member, leader)
    await _stays_alive(session, TIMING.renew_deadline + 1.0)
    token2 = await _claim_within(session, "@after-leader-loss", TIMING.renew_deadline)
    assert token2 > token
    assert (await backend.owner("@kept")) == first
    assert session.state is SessionState.ALIVE
    await session.close()


async def test_a_frozen_member_costs_a_call_part_of_its_deadline_not_all(
    etcd_cluster: EtcdCluster, backend: EtcdBackend
) -> None:
    """The client's member is frozen (a follower): one call moves on to another member."""
    session = await backend.open_session("n1", TIMING)
    leader = await asyncio.to_thread(etcd_cluster.leader)
    follower = next(m for m in etcd_cluster.members if m is not leader)
    while backend.current_endpoint != follower.endpoint:
        backend._rotate_from(backend._current)
    await backend.owners()  # connected: calls on it now hang instead of failing fast
    assert backend.current_endpoint == follower.endpoint
    assert follower.process is not None
    follower.process.freeze()
    try:
        started = time.monotonic()
        claim = await session.claim("@via-another-member", ClaimInfo(node="n1"))
        assert claim is not None
        assert time.monotonic() - started < backend.request_timeout + 0.5
        assert backend.current_endpoint != follower.endpoint
    finally:
        follower.process.thaw()
    await session.close()


@pytest.mark.slow
async def test_a_frozen_leader_is_ridden_through(
    etcd_cluster: EtcdCluster, backend: EtcdBackend
) -> None:
    """SIGSTOP on the leader: TCP stays open but nothing answers until a new election."""
    session = await backend.open_session("n1", TIMING)
    first = await session.claim("@kept", ClaimInfo(node="n1"))
    assert first is not None
    leader = await asyncio.to_thread(etcd_cluster.leader)
    # Make the client talk to the leader, the worst case: its calls hang, not fail.
    while backend.current_endpoint != leader.endpoint:
        backend._rotate_from(backend._current)
    assert leader.process is not None
    leader.process.freeze()
    try:
        await _stays_alive(session, TIMING.renew_deadline + 1.0)
        token = await _claim_within(session, "@after-freeze", TIMING.renew_deadline)
        assert token > first.token
        assert (await backend.owner("@kept")) == first
    finally:
        leader.process.thaw()
    assert session.state is SessionState.ALIVE
    await session.close()


@pytest.mark.slow
async def test_losing_quorum_makes_the_session_lost_by_its_deadline(
    etcd_cluster: EtcdCluster, backend: EtcdBackend
) -> None:
    session = await backend.open_session("n1", TIMING)
    assert await session.claim("@quorum", ClaimInfo(node="n1")) is not None
    survivor = _member_at(etcd_cluster, backend.current_endpoint)
    for m in etcd_cluster.members:
        if m is not survivor:
            await asyncio.to_thread(etcd_cluster.kill_member, m)
    killed_at = time.monotonic()
    # No renewal can succeed without a quorum; the deadline cannot move any more
    # once the last renewal that was already in flight has come back.
    await asyncio.wait_for(session.lost.wait(), TIMING.renew_deadline + 2.0)
    assert session.state is SessionState.LOST
    assert time.monotonic() - killed_at <= TIMING.renew_deadline + 1.0
    started = time.monotonic()
    with pytest.raises(DCSUnavailable):
        await backend.owners()  # a member without a leader answers no linearizable read
    assert time.monotonic() - started < backend.request_timeout + 1.0
    await session.close(revoke=False)
