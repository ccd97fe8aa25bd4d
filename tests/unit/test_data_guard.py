"""The data guard: its verdict (pure), its marker file, and the daemon acting on it (fakes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atserver_runner.paths import atsign_dir
from leases.base import ClaimInfo, Generation, GenerationStamp
from supervisor import data_guard
from supervisor.data_guard import Marker, read_marker, verdict, write_marker
from tests.unit.daemon_harness import make_harness

REC = Generation("@alice", 19, "a1", "A", dir_id="d" * 32, prev=12, time=1.0)


def test_a_new_atsign_starts_fresh_with_a_new_dir_id() -> None:
    v = verdict(None, None, cloud="B")
    assert v.ok and v.stamp is not None
    assert v.stamp.expected == 0 and v.stamp.prev == 0 and len(v.stamp.dir_id) == 32


def test_the_current_copy_may_start_and_builds_on_the_record() -> None:
    v = verdict(REC, Marker(19, "d" * 32, "a1"))
    assert v.ok and v.stamp is not None
    assert (v.stamp.expected, v.stamp.dir_id, v.stamp.prev) == (19, "d" * 32, 19)


@pytest.mark.parametrize(
    ("marker", "reason"),
    [
        (None, "data dir holds no generation, the last start was 19 on a1"),
        (Marker(12, "d" * 32), "data dir holds generation 12, the last start was 19 on a1"),
        (Marker(23, "d" * 32), "data dir holds generation 23, the last start was 19 on a1"),
        (Marker(19, "e" * 32), "data dir holds generation 19 of another copy"),
    ],
)
def test_anything_but_the_recorded_copy_is_refused(marker: Marker | None, reason: str) -> None:
    v = verdict(REC, marker)
    assert not v.ok and v.stamp is None
    assert v.reason.startswith(reason), v.reason


NEVER_BEGAN = Generation("@alice", 23, "a1", "A", dir_id="d" * 32, prev=19, session="s1")
MINE = data_guard.UnstampedClaim("a1", "s1", "d" * 32, 19)


def test_a_claim_of_this_process_that_never_stamped_may_build_on_its_prev() -> None:
    """The record names start 23 on a1, but a1's own claim never got to the marker: the
    directory still holds 19, what that claim built on, so it is the latest copy."""
    v = verdict(NEVER_BEGAN, Marker(19, "d" * 32, "a1"), unstamped={MINE})
    assert v.ok and v.stamp is not None, v.reason
    assert (v.stamp.expected, v.stamp.dir_id, v.stamp.prev) == (23, "d" * 32, 19)
    assert v.reason == "data dir is current: start 23 on a1 never began"
    new = Generation("@alice", 23, "a1", dir_id="n" * 32, prev=0, session="s1")
    v = verdict(new, None, unstamped={data_guard.UnstampedClaim("a1", "s1", "n" * 32, 0)})
    assert v.ok and v.stamp is not None and v.stamp.dir_id == "n" * 32


@pytest.mark.parametrize(
    ("record", "marker", "unstamped"),
    [
        # No memory of it: another node, or this one after a restart.
        (NEVER_BEGAN, Marker(19, "d" * 32), set()),
        (NEVER_BEGAN, Marker(19, "d" * 32), {data_guard.UnstampedClaim("b1", "s1", "d" * 32, 19)}),
        # Another session's claim (an earlier process of this node).
        (NEVER_BEGAN, Marker(19, "d" * 32), {data_guard.UnstampedClaim("a1", "s0", "d" * 32, 19)}),
        # The directory is not what the claim built on.
        (NEVER_BEGAN, Marker(12, "d" * 32), {MINE}),
        (NEVER_BEGAN, Marker(19, "e" * 32), {MINE}),
        (NEVER_BEGAN, None, {MINE}),
        # A claim built on another copy or generation than the record's.
        (NEVER_BEGAN, Marker(19, "d" * 32), {data_guard.UnstampedClaim("a1", "s1", "e" * 32, 19)}),
        (NEVER_BEGAN, Marker(19, "d" * 32), {data_guard.UnstampedClaim("a1", "s1", "d" * 32, 12)}),
        # An operator's accept is not a start.
        (
            Generation("@alice", 23, "a1", dir_id="d" * 32, prev=19, accepted_by="op"),
            Marker(19, "d" * 32),
            {MINE},
        ),
    ],
)
def test_only_this_process_s_own_unstamped_claim_on_the_same_copy_is_excused(
    record: Generation, marker: Marker | None, unstamped: set[data_guard.UnstampedClaim]
) -> None:
    assert not verdict(record, marker, unstamped=unstamped).ok


def test_a_marker_without_a_record_is_refused() -> None:
    v = verdict(None, Marker(12, "d" * 32, "a1"))
    assert not v.ok
    assert "but the DCS has no generation record" in v.reason


def test_marker_round_trip_and_damage(tmp_path: Path) -> None:
    assert read_marker(tmp_path) is None
    write_marker(tmp_path, Marker(5, "x" * 32, "a1", 1.0, "@alice"))
    assert read_marker(tmp_path) == Marker(5, "x" * 32, "a1", 1.0, "@alice")
    before = data_guard.fingerprint(tmp_path)
    write_marker(tmp_path, Marker(6, "x" * 32, "a1", 2.0, "@alice"))
    assert data_guard.fingerprint(tmp_path) != before
    (tmp_path / data_guard.MARKER_NAME).write_text("{nope")
    with pytest.raises(data_guard.MarkerUnreadable, match="damaged"):
        read_marker(tmp_path)


async def test_a_start_writes_the_marker_and_the_record_with_the_claim_token(
    tmp_path: Path,
) -> None:
    h = await make_harness(tmp_path, ["@alice"])
    sentence = await h.cycle()
    assert "claimed @alice" in sentence
    token = h.dcs.claims["@alice"].token
    record = h.dcs.generations["@alice"]
    marker = read_marker(atsign_dir(h.sup.cfg.runner.data_root, "@alice"))
    assert record.token == token and record.node == "a1"
    assert marker is not None and marker.token == token and marker.dir_id == record.dir_id
    assert h.runner.started == [("@alice", token)]


async def test_separate_data_dir_is_refused_once_and_not_claimed(tmp_path: Path) -> None:
    """The measured bug: b1 took @alice over from an empty data dir. Now a1 (here) has an
    empty dir while the record says @alice last started on b1: it refuses, claims nothing."""
    h = await make_harness(tmp_path, ["@alice"])
    h.dcs.generations["@alice"] = Generation("@alice", 19, "b1", "B", dir_id="b" * 32)
    sentence = await h.cycle()
    assert "refused @alice: data dir holds no generation, the last start was 19 on b1" in sentence
    assert "@alice" not in h.dcs.claims
    assert h.runner.started == []
    assert h.dcs.nodes["a1"]["refused"] == {
        "@alice": "data dir holds no generation, the last start was 19 on b1"
    }
    assert h.sup.status()["stale_data_refused"]["@alice"]["reason"].startswith("data dir holds")
    # It does not try again while its data dir is unchanged.
    sentence = await h.cycle()
    assert "claim and start" not in sentence and "=>" not in sentence, sentence
    assert "1 vacant atSign(s) refused for stale data here" in sentence
    assert h.runner.started == []


async def test_a_refusal_is_checked_again_when_the_data_dir_changes(tmp_path: Path) -> None:
    h = await make_harness(tmp_path, ["@alice"])
    h.dcs.generations["@alice"] = Generation("@alice", 19, "b1", "B", dir_id="b" * 32)
    await h.cycle()
    assert "@alice" in h.sup.state.refused
    # The current copy arrives (a restore, a remount): the marker now matches the record.
    write_marker(atsign_dir(h.sup.cfg.runner.data_root, "@alice"), Marker(19, "b" * 32, "b1", 1.0))
    sentence = await h.cycle()
    assert "claimed @alice" in sentence, sentence
    assert h.sup.state.refused == {}
    assert h.dcs.generations["@alice"].prev == 19
    assert h.dcs.nodes["a1"]["refused"] == {}


async def test_a_restart_under_a_held_claim_releases_it_when_the_data_is_stale(
    tmp_path: Path,
) -> None:
    h = await make_harness(tmp_path, ["@alice"])
    await h.cycle()
    await h.cycle()
    h.runner.crash("@alice")
    # Meanwhile the data dir was replaced by an older copy (say, a bad restore).
    d = atsign_dir(h.sup.cfg.runner.data_root, "@alice")
    marker = read_marker(d)
    assert marker is not None
    write_marker(d, Marker(marker.token - 5, marker.dir_id, "a1", 1.0))
    sentence = await h.cycle()
    assert "refused @alice: data dir holds generation" in sentence, sentence
    assert "@alice" not in h.dcs.claims  # released: a node whose copy is current can take it


async def test_a_claim_whose_answer_was_lost_is_started_by_its_node_and_refused_elsewhere(
    tmp_path: Path,
) -> None:
    """Found in CI (200 atSigns added at once, separate data dirs): a claim committed but
    its answer timed out, so the record named a start on a1 that never stamped a marker;
    a1 then refused its own directory and b1 its empty one, and the atSign stayed unserved."""
    h = await make_harness(tmp_path, ["@alice"])
    h.session.lost_answers = 1
    sentence = await h.cycle()
    assert "claim of @alice failed: TimeoutError" in sentence, sentence
    lost = h.dcs.claims["@alice"].token
    assert h.dcs.generations["@alice"].token == lost and h.runner.started == []
    sentence = ""
    for _ in range(5):
        if h.runner.started:
            break
        await h.sync()
        sentence = await h.cycle()
    assert "refused" not in sentence and h.sup.state.refused == {}, sentence
    token = h.dcs.claims["@alice"].token
    assert token > lost and h.runner.started == [("@alice", token)]
    marker = read_marker(atsign_dir(h.sup.cfg.runner.data_root, "@alice"))
    record = h.dcs.generations["@alice"]
    assert marker is not None and (marker.token, marker.dir_id) == (record.token, record.dir_id)
    assert h.sup.state.unstamped == {}

    # Another node (no memory of that claim) with the same empty directory still refuses.
    b = await make_harness(tmp_path / "b", ["@alice"])
    b.dcs.generations["@alice"] = Generation(
        "@alice", lost, "a1", dir_id=record.dir_id, prev=0, session=h.session.session_id
    )
    sentence = await b.cycle()
    assert f"refused @alice: data dir holds no generation, the last start was {lost}" in sentence


async def test_a_marker_that_could_not_be_written_does_not_strand_the_atsign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim wrote the record, the marker write failed (a storage hiccup) and the claim
    was released: the next attempt builds on the same directory again."""
    h = await make_harness(tmp_path, ["@alice"])
    real = data_guard.stamp_marker
    calls = 0

    def flaky(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(5, "Input/output error")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data_guard, "stamp_marker", flaky)
    sentence = await h.cycle()
    assert "cannot write its data dir marker" in sentence and "@alice" not in h.dcs.claims
    for _ in range(5):
        if h.runner.started:
            break
        await h.sync()
        sentence = await h.cycle()
    assert h.runner.started == [("@alice", h.dcs.claims["@alice"].token)], sentence
    assert h.sup.state.refused == {}


async def test_the_generation_changing_under_the_check_loses_the_race(tmp_path: Path) -> None:
    """Check and claim are one step: a record that moved on makes the claim fail."""
    h = await make_harness(tmp_path, ["@alice"])
    session = h.session
    h.dcs.generations["@alice"] = Generation("@alice", 19, "b1", dir_id="b" * 32)
    stale = GenerationStamp(expected=12, dir_id="b" * 32, prev=12)
    assert await session.claim("@alice", ClaimInfo(node="a1"), generation=stale) is None
    assert "@alice" not in h.dcs.claims and h.dcs.generations["@alice"].token == 19


def test_the_marker_is_json_any_image_can_ignore(tmp_path: Path) -> None:
    write_marker(tmp_path, Marker(5, "x" * 32, "a1", 1.0, "@alice"))
    data = json.loads((tmp_path / ".atfailover-generation").read_text())
    assert data == {"atsign": "@alice", "dir_id": "x" * 32, "node": "a1", "time": 1.0, "token": 5}


async def test_a_marker_newer_than_the_record_read_is_judged_against_the_current_record(
    tmp_path: Path,
) -> None:
    """Found in the chaos runs (17 refusals per run): a node read the record (62), spent
    seconds fencing the lost owner, and meanwhile a third node claimed and started the
    atSign (record and marker 77): the node refused the current copy as stale."""
    h = await make_harness(tmp_path, ["@alice"])
    old = Generation("@alice", 62, "a2", dir_id="d" * 32, prev=50)
    new = Generation("@alice", 77, "b1", dir_id="d" * 32, prev=62)
    reads: list[int] = []
    real = h.backend.generation

    async def moving(atsign: str) -> Generation | None:
        reads.append(1)
        if len(reads) == 1:
            write_marker(atsign_dir(h.sup.cfg.runner.data_root, "@alice"), Marker(77, "d" * 32))
            h.dcs.generations["@alice"] = new
            return old
        return await real(atsign)

    h.backend.generation = moving  # type: ignore[method-assign]
    h.dcs.generations["@alice"] = old
    checked = await h.sup.guard.check("@alice")
    assert not isinstance(checked, str) and checked.ok, checked
    assert checked.stamp is not None and checked.stamp.expected == 77
    assert len(reads) == 2
