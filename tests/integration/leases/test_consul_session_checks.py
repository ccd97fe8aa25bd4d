"""Consul sessions bound to serfHealth and a TTL check (``session_check_ttl``), on real agents.

A session without checks outlives its holder by at least its TTL (10 s minimum, up to
2 x ttl); bound to the checks it ends when the holder stops passing its check (a dead
supervisor) or when its agent dies (a dead node), in seconds. Both are measured from the
last renewal and must come before the ttl could have run out.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.request
from pathlib import Path

import pytest

from leases import ClaimInfo, Timing
from leases.consul import ConsulBackend, session_check_id
from testbed.consul import ConsulAgent

pytestmark = pytest.mark.timeout(120)

# renew every 1 s, deadline 2 s, stop budget 1 s: lock_delay 4 > 3; check ttl 2 >= 2 x 1.
TIMING = Timing(ttl=10, renew_interval=1, renew_deadline=2, stop_budget=1, request_timeout=0.5)
CHECK_TTL = 2.0
LOCK_DELAY = 4.0


def agent_check(agent_url: str, check_id: str) -> dict[str, object] | None:
    with urllib.request.urlopen(agent_url + "/v1/agent/checks", timeout=2) as resp:
        checks: dict[str, dict[str, object]] = json.loads(resp.read())
    return checks.get(check_id)


async def wait_gone(reader: ConsulBackend, atsign: str, timeout: float) -> float:
    """Seconds until ``atsign`` has no claim (polled every 0.1 s), or fail after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await reader.owner(atsign) is None:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"the claim of {atsign} was still there after {timeout:g}s")


async def test_a_holder_that_stops_passing_its_check_loses_the_session_in_seconds(
    consul_agent: ConsulAgent, key_prefix: str
) -> None:
    node = f"n-{secrets.token_hex(3)}"
    holder = ConsulBackend(
        consul_agent.url, key_prefix, lock_delay=LOCK_DELAY, session_check_ttl=CHECK_TTL
    )
    reader = ConsulBackend(consul_agent.url, key_prefix)
    try:
        session = await holder.open_session(node, TIMING)
        assert await session.claim("@alice", ClaimInfo(node=node)) is not None
        # Renewals keep the check passing for many check TTLs.
        await asyncio.sleep(4 * CHECK_TTL)
        assert (await reader.owner("@alice")) is not None
        check = agent_check(consul_agent.url, session_check_id(node))
        assert check is not None and check["Status"] == "passing", check
        # A dead supervisor: no more renewals or passes, nothing revoked.
        last_renewal = session.renew_deadline - TIMING.renew_deadline
        await session.close(revoke=False)
        await wait_gone(reader, "@alice", TIMING.ttl)
        since_renewal = time.monotonic() - last_renewal
        print(f"\nMEASURE consul session check: claim gone {since_renewal:.1f}s after renewal")
        assert since_renewal < TIMING.ttl, "the session lived as long as without the check"
        check = agent_check(consul_agent.url, session_check_id(node))
        assert check is not None and check["Status"] == "critical", check
        # A standby must wait out the lock-delay, then the key is free.
        standby = await reader.open_session(f"s-{secrets.token_hex(3)}", Timing.for_ttl(10))
        try:
            deadline = time.monotonic() + LOCK_DELAY + 5
            claim = None
            while claim is None and time.monotonic() < deadline:
                claim = await standby.claim("@alice", ClaimInfo(node="standby"))
                await asyncio.sleep(0.2)
            assert claim is not None
        finally:
            await standby.close()
    finally:
        await holder.close()
        await reader.close()


async def test_a_revoked_session_takes_its_check_away(
    consul_agent: ConsulAgent, key_prefix: str
) -> None:
    node = f"n-{secrets.token_hex(3)}"
    holder = ConsulBackend(
        consul_agent.url, key_prefix, lock_delay=LOCK_DELAY, session_check_ttl=CHECK_TTL
    )
    try:
        session = await holder.open_session(node, TIMING)
        assert agent_check(consul_agent.url, session_check_id(node)) is not None
        await session.close()
        # Left behind it would turn critical, and with it every service on the agent's node.
        assert agent_check(consul_agent.url, session_check_id(node)) is None
    finally:
        await holder.close()


async def test_a_dead_node_agent_ends_the_session_before_its_ttl(
    consul_agent: ConsulAgent, key_prefix: str, tmp_path: Path
) -> None:
    node = f"n-{secrets.token_hex(3)}"
    client = ConsulAgent(tmp_path, name=f"agent-{node}", join=consul_agent)
    client.start()
    holder = ConsulBackend(
        client.url, key_prefix, lock_delay=LOCK_DELAY, session_check_ttl=CHECK_TTL
    )
    reader = ConsulBackend(consul_agent.url, key_prefix)
    try:
        session = await holder.open_session(node, TIMING)
        assert await session.claim("@bob", ClaimInfo(node=node)) is not None
        await asyncio.sleep(2.0)
        # The whole node dies: its agent with it (the check can no longer expire on it;
        # only the servers' gossip failure detection, serfHealth, can tell).
        assert client.process is not None
        last_renewal = session.renew_deadline - TIMING.renew_deadline
        client.process.kill()
        await wait_gone(reader, "@bob", 2 * TIMING.ttl)
        since_renewal = time.monotonic() - last_renewal
        print(f"\nMEASURE consul serfHealth: claim gone {since_renewal:.1f}s after renewal")
        assert since_renewal < TIMING.ttl, "the session lived as long as without serfHealth"
    finally:
        await holder.close()
        await reader.close()
        client.stop()


async def test_a_restarted_holder_opens_a_session_although_its_old_check_went_critical(
    consul_agent: ConsulAgent, key_prefix: str
) -> None:
    """A supervisor that crashed (its check lapsed, left registered) or lost its session
    while the servers restarted must get a new session: Consul refuses to bind a critical
    check, and re-registering a TTL check that expired leaves it critical."""
    node = f"n-{secrets.token_hex(3)}"
    first = ConsulBackend(
        consul_agent.url, key_prefix, lock_delay=LOCK_DELAY, session_check_ttl=CHECK_TTL
    )
    second = ConsulBackend(
        consul_agent.url, key_prefix, lock_delay=LOCK_DELAY, session_check_ttl=CHECK_TTL
    )
    try:
        session = await first.open_session(node, TIMING)
        await session.close(revoke=False)  # a crash: no revoke, the check stays behind
        deadline = time.monotonic() + 3 * CHECK_TTL
        check = agent_check(consul_agent.url, session_check_id(node))
        while time.monotonic() < deadline and (check or {}).get("Status") != "critical":
            await asyncio.sleep(0.2)
            check = agent_check(consul_agent.url, session_check_id(node))
        assert check is not None and check["Status"] == "critical", check
        again = await asyncio.wait_for(second.open_session(node, TIMING), 3 * CHECK_TTL)
        try:
            assert await again.claim("@carol", ClaimInfo(node=node)) is not None
        finally:
            await again.close()
    finally:
        await first.close()
        await second.close()
