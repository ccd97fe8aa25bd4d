"""AtSign records on real etcd and real Consul: writes in transactions, reads, the watch."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import AsyncIterator

from leases.base import ClaimEventKind
from leases.records import RecordEvent, make_record

from .conftest import DCS


def _raw_put(dcs: DCS, key: str, value: bytes) -> None:
    """Write a value behind the backend's back (etcd's v3 JSON gateway, Consul's KV API)."""
    if dcs.kind == "etcd":
        url = f"http://{dcs.endpoints[0]}/v3/kv/put"
        body = json.dumps(
            {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value).decode(),
            }
        ).encode()
        req = urllib.request.Request(url, data=body, method="POST")
    else:
        req = urllib.request.Request(f"{dcs.endpoints[0]}/v1/kv/{key}", data=value, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


async def _close(events: AsyncIterator[RecordEvent]) -> None:
    """End a watch (the backends' watches are async generators)."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


async def _next(events: AsyncIterator[RecordEvent], timeout: float = 15.0) -> RecordEvent:
    async with asyncio.timeout(timeout):
        return await anext(events)


async def test_records_are_written_read_and_watched(dcs: DCS) -> None:
    backend = dcs.make()
    watcher = dcs.make()
    events = watcher.watch_atsign_records()
    first = await _next(events)
    assert first.kind is ClaimEventKind.RESYNC and first.snapshot == {}

    # 150 records: more than one transaction's worth (64 operations each).
    many = [make_record(f"@r{i:03d}", {"prefer_clouds": ["A"]}) for i in range(150)]
    await backend.write_atsign_records(many)
    records, problems = await backend.atsign_records()
    assert problems == {}
    assert sorted(records) == [r.atsign for r in many]
    assert records["@r007"].prefer_clouds == ("A",)
    assert await backend.atsign_record("@r007") == records["@r007"]
    assert await backend.atsign_record("@nobody") is None
    seen: set[str] = set()
    while len(seen) < 150:
        e = await _next(events)
        assert e.kind is ClaimEventKind.PUT and e.record is not None, e
        seen.add(e.record.atsign)

    # An update and a delete arrive as one event each, with the new content.
    await backend.write_atsign_records(
        [make_record("@r001", {"prefer_nodes": ["a1"], "disabled": True, "tier": "gold"})],
        ["@r002"],
    )
    got = {}
    for _ in range(2):
        e = await _next(events)
        got[e.atsign] = e
    assert got["@r001"].kind is ClaimEventKind.PUT
    rec = got["@r001"].record
    assert rec is not None and rec.disabled and rec.prefer_nodes == ("a1",)
    assert rec.extra == {"tier": "gold"}
    assert got["@r002"].kind is ClaimEventKind.DELETE
    await backend.write_atsign_records([], [r.atsign for r in many])
    assert await backend.atsign_records() == ({}, {})
    await _close(events)


async def test_a_stored_value_that_is_not_a_record_is_reported_not_used(dcs: DCS) -> None:
    backend = dcs.make()
    key = f"{dcs.prefix}/atsigns/@broken"
    await asyncio.to_thread(_raw_put, dcs, key, b"{not json")
    await backend.write_atsign_records([make_record("@fine", {})])
    records, problems = await backend.atsign_records()
    assert list(records) == ["@fine"]
    assert "not JSON" in problems["@broken"]
    assert await backend.atsign_record("@broken") is None  # counts as absent
    events = backend.watch_atsign_records()
    first = await _next(events)
    assert first.snapshot is not None and list(first.snapshot) == ["@fine"]
    await _close(events)
    await backend.write_atsign_records([], ["@broken", "@fine"])
