"""The dev atServer's durable key store and fence file (pure file I/O in tmp dirs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from atserver_runner.devserver.fence import Fence, FenceError, FenceFileCorrupt, read_fence
from atserver_runner.devserver.store import KeyStore, StoreCorrupt


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_writes_survive_reopen_and_compaction(tmp_path: Path) -> None:
    s = KeyStore(tmp_path)
    s.open()
    s.put("a@alice", "1", {})
    s.put("a@alice", "2", {"ttl": 0})
    s.put("b@alice", "x", {})
    s.delete("b@alice")
    assert s.commit_id == 4
    s.close()
    again = KeyStore(tmp_path)
    again.open()
    rec = again.get("a@alice")
    assert rec is not None and rec.value == "2" and rec.version == 1
    assert again.get("b@alice") is None
    assert again.commit_id == 4  # survives compaction
    assert len(again.path.read_text().splitlines()) == 2  # seq line + one live key
    again.put("c@alice", "y", {})
    assert again.commit_id == 5
    again.close()


def test_torn_last_line_is_dropped_but_a_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    s = KeyStore(tmp_path)
    s.open()
    s.put("a@alice", "1", {})
    s.close()
    with open(s.path, "ab") as f:
        f.write(b'{"op":"put","key":"torn')  # crash mid-write: never acknowledged
    again = KeyStore(tmp_path)
    again.open()
    assert again.live_keys() == ["a@alice"]
    again.close()
    s.path.write_text('{"op":"seq","seq":1}\nnot json\n{"op":"delete","key":"a@alice"}\n')
    with pytest.raises(StoreCorrupt, match="line 2"):
        KeyStore(tmp_path).open()


def test_ttl_and_ttb(tmp_path: Path) -> None:
    clock = Clock()
    s = KeyStore(tmp_path, clock=clock)
    s.open()
    s.put("short@alice", "v", {"ttl": 1000})
    s.put("later@alice", "v", {"ttb": 1000})
    assert s.live_keys() == ["short@alice"]
    clock.now += 1.5
    assert s.live_keys() == ["later@alice"]
    meta = s._records["short@alice"].metadata_json()
    assert meta["ttl"] == 1000 and "expiresAt" in meta
    s.close()


def test_fence_refuses_lower_token_and_detects_takeover(tmp_path: Path) -> None:
    old = Fence(tmp_path, 5)
    assert old.claim() == 0
    assert read_fence(tmp_path) == 5
    with old.held():
        pass
    with pytest.raises(FenceError, match="fencing token 4 is lower than token 5"):
        Fence(tmp_path, 4).claim()
    new = Fence(tmp_path, 6)
    assert new.claim() == 5
    with pytest.raises(FenceError) as err:
        old.check()
    assert (err.value.ours, err.value.current) == (5, 6)
    new.check()
    same = Fence(tmp_path, 6)  # a restart with the same token is allowed
    assert same.claim() == 6
    for f in (old, new, same):
        f.close()


def test_corrupt_fence_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "fence").write_text("banana\n")
    with pytest.raises(FenceFileCorrupt, match="does not hold a fencing token"):
        Fence(tmp_path, 1).claim()
    with pytest.raises(ValueError, match=">= 0"):
        Fence(tmp_path, -1)
