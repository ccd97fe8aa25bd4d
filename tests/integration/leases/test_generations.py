"""Generation records and node records, run unchanged against real etcd and real Consul."""

from __future__ import annotations

import asyncio
import time

from leases import ClaimInfo
from leases.base import GenerationStamp

from .conftest import DCS


async def test_a_claim_writes_the_generation_in_its_own_transaction(dcs: DCS) -> None:
    backend = dcs.make()
    s = await backend.open_session("a1", dcs.timing)
    assert await backend.generation("@alice") is None
    stamp = GenerationStamp(expected=0, dir_id="d1", prev=0, cloud="A")
    claim = await s.claim("@alice", ClaimInfo(node="a1", cloud="A"), generation=stamp)
    assert claim is not None
    g = await backend.generation("@alice")
    assert g is not None
    assert (g.token, g.node, g.cloud, g.dir_id, g.prev) == (claim.token, "a1", "A", "d1", 0)
    assert abs(g.time - time.time()) < 60
    assert (await backend.generations())["@alice"] == g

    # The record outlives the claim: a release, then the end of the session.
    assert await s.release(claim)
    assert await backend.generation("@alice") == g
    await s.close()
    assert await backend.generation("@alice") == g


async def test_a_claim_against_a_changed_generation_loses_and_writes_nothing(dcs: DCS) -> None:
    backend = dcs.make()
    a = await backend.open_session("a1", dcs.timing)
    first = await a.claim("@bob", ClaimInfo(node="a1"), generation=GenerationStamp(0, "d1", 0))
    assert first is not None
    assert await a.release(first)
    b = await dcs.make().open_session("b1", dcs.timing)
    # b1 checked its data dir against no record (expected 0): the record exists now.
    assert (
        await b.claim("@bob", ClaimInfo(node="b1"), generation=GenerationStamp(0, "d2", 0)) is None
    )
    # ... or against an older one.
    stale = GenerationStamp(first.token - 1, "d1", first.token - 1)
    assert await b.claim("@bob", ClaimInfo(node="b1"), generation=stale) is None
    assert await backend.owner("@bob") is None
    g = await backend.generation("@bob")
    assert g is not None and g.token == first.token and g.node == "a1"
    # Against the current one it wins, and the new record builds on it.
    won = await b.claim(
        "@bob", ClaimInfo(node="b1"), generation=GenerationStamp(first.token, "d1", first.token)
    )
    assert won is not None and won.token > first.token
    g2 = await backend.generation("@bob")
    assert g2 is not None and (g2.token, g2.node, g2.prev) == (won.token, "b1", first.token)
    await a.close()
    await b.close()


async def test_accept_generation_only_while_unclaimed_and_unchanged(dcs: DCS) -> None:
    backend = dcs.make()
    s = await backend.open_session("a1", dcs.timing)
    claim = await s.claim("@carol", ClaimInfo(node="a1"), generation=GenerationStamp(0, "d1", 0))
    assert claim is not None
    assert await backend.accept_generation("@carol", claim.token, "b1", "d9", 3) is None  # claimed
    assert await s.release(claim)
    assert await backend.accept_generation("@carol", claim.token - 1, "b1", "d9", 3) is None
    g = await backend.accept_generation("@carol", claim.token, "b1", "d9", 3)
    assert g is not None
    assert g.token > claim.token and (g.accepted_by, g.dir_id, g.prev) == ("b1", "d9", 3)
    assert await backend.generation("@carol") == g
    # A brand-new atSign can be accepted too (expected 0).
    fresh = await backend.accept_generation("@dave", 0, "b1", "d8", 0)
    assert fresh is not None and fresh.accepted_by == "b1"
    await s.close()


async def test_node_records_live_with_their_session(dcs: DCS) -> None:
    backend = dcs.make()
    s = await backend.open_session("a1", dcs.timing)
    await s.publish_node({"name": "a1", "cloud": "A", "refused": {"@x": "why"}})
    assert (await backend.nodes())["a1"]["refused"] == {"@x": "why"}
    await s.publish_node({"name": "a1", "cloud": "A", "refused": {}})
    assert (await backend.nodes())["a1"]["refused"] == {}
    await s.close()
    for _ in range(50):
        if "a1" not in await backend.nodes():
            break
        await asyncio.sleep(0.1)
    assert "a1" not in await backend.nodes()
