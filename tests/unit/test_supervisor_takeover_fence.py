"""Before a takeover on shared storage: fence the lost owner's client, then touch the data.

A real Supervisor on the in-memory fakes, with a fake storage fence: the order of the
fence and the marker read, when a live owner is left alone, and that nothing is claimed
while the fence cannot be done.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atserver_runner.paths import atsign_dir
from leases.base import DCSUnavailable, Generation
from supervisor import data_guard
from tests.unit.daemon_harness import Harness, make_harness

CLIENT = "client.b1/4242/127.0.0.1:0/777"


class FakeFence:
    """Records each fence (and what had happened by then); ``ok`` decides the outcome."""

    def __init__(self, events: list[str], ok: bool = True) -> None:
        self.events = events
        self.ok = ok

    async def fence(self, client_ref: str, fallback_entity: str) -> tuple[bool, str]:
        self.events.append(f"fence {client_ref or fallback_entity}")
        return self.ok, "fenced" if self.ok else "no MDS answered"

    async def close(self) -> None:
        return None


async def harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ok: bool = True
) -> tuple[Harness, list[str]]:
    """@alice last started on b1 (token 7, client CLIENT); its data dir holds that start."""
    h = await make_harness(tmp_path, ["@alice"])
    events: list[str] = []
    h.sup.ctx.takeover_fence = FakeFence(events, ok)  # type: ignore[assignment]
    h.dcs.generations["@alice"] = Generation(
        "@alice", 7, "b1", "B", "dir-1", 0, 1.0, client=CLIENT, session="s-b1"
    )
    data = atsign_dir(h.sup.cfg.runner.data_root, "@alice")
    data.mkdir(parents=True)
    data_guard.stamp_marker(data, 7, "dir-1", "b1", "@alice")
    real_read = data_guard.read_marker

    def read_marker(path: Path) -> data_guard.Marker | None:
        events.append("read marker")
        return real_read(path)

    monkeypatch.setattr(data_guard, "read_marker", read_marker)
    return h, events


async def test_a_lost_owner_is_fenced_before_its_data_dir_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, events = await harness(tmp_path, monkeypatch)  # b1 has no node record: lost
    sentence = await h.cycle()
    assert events[:2] == [f"fence {CLIENT}", "read marker"], events
    assert "claimed @alice" in sentence and "started @alice" in sentence, sentence
    assert h.dcs.claims["@alice"].info.node == "a1"


async def test_an_owner_with_a_live_session_is_not_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b1 handed @alice off (or restarted with a new session): its mount serves its other
    atSigns, and it stopped @alice itself."""
    h, events = await harness(tmp_path, monkeypatch)
    h.dcs.nodes["b1"] = {"session": "s-b1-new"}
    sentence = await h.cycle()
    assert not [e for e in events if e.startswith("fence")], events
    assert "claimed @alice" in sentence, sentence


async def test_nothing_is_claimed_while_the_lost_owner_cannot_be_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, events = await harness(tmp_path, monkeypatch, ok=False)
    sentence = await h.cycle()
    assert events == [f"fence {CLIENT}"], events  # the data dir was not touched
    assert "@alice" not in h.dcs.claims and not h.runner.started
    assert "could not fence the lost owner b1's storage (no MDS answered)" in sentence


async def test_nothing_is_claimed_when_the_owner_s_liveness_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, events = await harness(tmp_path, monkeypatch)

    async def nodes_down() -> dict[str, dict[str, object]]:
        raise DCSUnavailable("fake DCS: node records unreadable")

    monkeypatch.setattr(h.backend, "nodes", nodes_down)
    sentence = await h.cycle()
    assert events == [], events  # neither a fence of a maybe-live node nor a read
    assert "@alice" not in h.dcs.claims
    assert "cannot tell whether b1 is alive to fence it" in sentence, sentence
