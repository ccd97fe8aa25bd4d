"""Consul with ACLs on (default deny): the token option reaches every call, and never the logs."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from leases import ClaimInfo, DCSUnavailable, Timing
from leases.consul import ConsulBackend
from testbed.consul import ConsulAgent

MASTER = "d3c0ffee-0000-4000-8000-00000000a11d"
TIMING = Timing.for_ttl(10.0)


class AclConsulAgent(ConsulAgent):
    """A dev agent with ACLs enabled, default deny, and a known master token."""

    def _argv(self) -> list[str]:
        acl = f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{MASTER}" }} }}'
        return [*super()._argv(), "-hcl", acl]

    def ready(self) -> bool:
        req = urllib.request.Request(
            self.url + "/v1/agent/self", headers={"X-Consul-Token": MASTER}
        )
        with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=1) as resp:
            if not json.loads(resp.read()):
                return False
        with urllib.request.urlopen(req, timeout=1) as resp:
            return resp.status == 200


@pytest.fixture
def acl_agent(tmp_path: Path) -> Iterator[AclConsulAgent]:
    agent = AclConsulAgent(tmp_path / "consul-acl", name="consul-acl")
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


async def test_token_is_used_for_every_call_and_never_logged(
    acl_agent: AclConsulAgent, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = ConsulBackend(acl_agent.url, key_prefix, token=MASTER, lock_delay=1)
    try:
        assert MASTER not in repr(backend)
        session = await backend.open_session("n", TIMING)
        claim = await session.claim("@acl", ClaimInfo(node="n"))
        assert claim is not None
        assert await backend.owner("@acl") == claim
        assert await backend.owners() == {"@acl": claim}
        events = backend.watch()
        first = await anext(events)
        assert first.snapshot == {"@acl": claim}
        await events.aclose()  # type: ignore[attr-defined]
        assert session._renew_once is not None and await session._renew_once(1.0)
        assert await session.release(claim)
        await session.close()
        assert await backend.owner("@acl") is None
    finally:
        await backend.close()
    assert MASTER not in caplog.text


@pytest.mark.parametrize("token", [None, "00000000-0000-4000-8000-000000000000"])
async def test_missing_or_wrong_token_is_a_clear_error(
    acl_agent: AclConsulAgent, key_prefix: str, token: str | None
) -> None:
    backend = ConsulBackend(acl_agent.url, key_prefix, token=token)
    try:
        with pytest.raises(DCSUnavailable, match=r"(?i)permission denied|ACL not found|403"):
            await backend.open_session("n", TIMING)
        # Consul filters a recursive read by the ACLs (an empty answer, not a 403):
        # the backend must not take that for "nobody holds anything".
        with pytest.raises(DCSUnavailable, match=r"(?i)permission denied|ACL not found|403"):
            await backend.owners()
        with pytest.raises(DCSUnavailable, match=r"(?i)permission denied|ACL not found|403"):
            await backend.owner("@alice")
        # The watch keeps retrying (and logging) instead of reporting an empty state.
        events = backend.watch()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 1.5)
    finally:
        await backend.close()


def _acl_put(agent: AclConsulAgent, path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        agent.url + path,
        data=json.dumps(body).encode(),
        headers={"X-Consul-Token": MASTER},
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        answer: dict[str, object] = json.loads(resp.read())
        return answer


def _token(agent: AclConsulAgent, name: str, rules: str) -> str:
    _acl_put(agent, "/v1/acl/policy", {"Name": name, "Rules": rules})
    return str(_acl_put(agent, "/v1/acl/token", {"Policies": [{"Name": name}]})["SecretID"])


async def test_records_are_written_with_the_writer_token_and_read_with_the_nodes(
    acl_agent: AclConsulAgent, key_prefix: str
) -> None:
    """docs/supervisor.md, The inventory in the DCS: Access."""
    from leases.records import make_record

    reader = _token(acl_agent, "nodes", f'key_prefix "{key_prefix}/" {{ policy = "read" }}')
    writer = _token(
        acl_agent, "records-writer", f'key_prefix "{key_prefix}/atsigns/" {{ policy = "write" }}'
    )
    nodes = ConsulBackend(acl_agent.url, key_prefix, token=reader)
    registrar = ConsulBackend(acl_agent.url, key_prefix, token=writer)
    try:
        await registrar.write_atsign_records([make_record("@alice", {"prefer_clouds": ["A"]})])
        records, _ = await nodes.atsign_records()
        assert list(records) == ["@alice"]
        with pytest.raises(DCSUnavailable, match="permission denied"):
            await nodes.write_atsign_records([make_record("@bob", {})])
        with pytest.raises(DCSUnavailable, match="permission denied"):
            await registrar.owners()  # the writer's token is for the records only
        await registrar.write_atsign_records([], ["@alice"])
        assert await nodes.atsign_records() == ({}, {})
    finally:
        await nodes.close()
        await registrar.close()
