"""The registrar against a real Consul agent: an atSign in every configured layout (legacy
``atserver`` and shards ``atserver-3f``), probe results to each, health read back through the
shard services, and a layout dropped from ``consul.shards`` cleaned up by anti-entropy."""

from __future__ import annotations

import secrets

from directory.shards import registrations
from supervisor.registration import Instance, Registrar, entry_health, health_entries
from testbed.consul import ConsulAgent
from tests.integration.supervisor import test_node_check

node_agent = test_node_check.node_agent  # the fixture: a client agent joined to the server


async def test_every_layout_is_registered_probed_read_and_an_old_one_removed(
    node_agent: ConsulAgent,
) -> None:
    base = "atserver-l" + secrets.token_hex(3)
    atsigns = ["@alice", "@bob"]
    both = Registrar(node_agent.url, node="a1", service_name=base, shards=(1, 16))
    try:
        for n, atsign in enumerate(atsigns):
            await both.register(Instance(atsign, "a1", "A", "127.0.0.1", 7000 + n, 10 + n))
            assert await both.report_probe(atsign, True, "ok")
        entries = await both.health(atsigns=atsigns)
        ids = sorted(e["Service"]["ID"] for e in entries)
        want = sorted(r.service_id for a in atsigns for r in registrations(a, base, (1, 16)))
        assert ids == want and f"{base}-alice" in ids
        assert {entry_health(e) for e in entries} == {"passing"}
        # The same through the synchronous helper that tools and tests use.
        legacy = health_entries(node_agent.url, base, atsigns, (1,), passing=True)
        assert sorted(e["Service"]["ID"] for e in legacy) == [f"{base}-alice", f"{base}-bob"]
        assert set(await both.refresh()) == set(atsigns)
        assert await both.passing_elsewhere("@alice") is None  # only this node's
    finally:
        await both.close()

    # The migration's last step: consul.shards becomes [16]. Anti-entropy removes the
    # legacy registrations this node left; the shard ones are kept and still count.
    sharded = Registrar(node_agent.url, node="a1", service_name=base, shards=(16,))
    try:
        assert set(await sharded.refresh()) == set(atsigns)
        assert health_entries(node_agent.url, base, atsigns, (1,)) == []
        shard_ids = {e["Service"]["ID"] for e in await sharded.health(atsigns=atsigns)}
        assert shard_ids == {r.service_id for a in atsigns for r in registrations(a, base, (16,))}
        assert await sharded.deregister("@alice")
        assert set(await sharded.refresh()) == {"@bob"}
    finally:
        await sharded.deregister_all(atsigns)
        await sharded.close()


async def test_an_atsign_missing_from_one_layout_is_not_counted_as_registered(
    node_agent: ConsulAgent,
) -> None:
    """The agent lost one of the two registrations (an operator, a restart): refresh says
    the atSign is not registered, so the daemon registers it again in every layout."""
    base = "atserver-m" + secrets.token_hex(3)
    reg = Registrar(node_agent.url, node="a1", service_name=base, shards=(1, 16))
    try:
        await reg.register(Instance("@carol", "a1", "A", "127.0.0.1", 7100, 3))
        assert set(await reg.refresh()) == {"@carol"}
        legacy_id = registrations("@carol", base, (1,))[0].service_id
        await reg._client.agent.service.deregister(legacy_id)
        assert await reg.refresh() == {}
    finally:
        await reg.deregister_all(["@carol"])
        await reg.close()
