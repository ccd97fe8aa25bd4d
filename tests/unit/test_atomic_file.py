"""write_atomic: concurrent writers of one file never fail and never leave temp files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from atserver_runner.atomic_file import write_atomic


@pytest.mark.parametrize("durable", [True, False])
def test_concurrent_writers_of_one_file_all_succeed(tmp_path: Path, durable: bool) -> None:
    # The process runner's start and a concurrent list() (adopting a pending record) both
    # replace the same pid file; a shared temp name made one of them fail with ENOENT.
    path = tmp_path / "alice.json"
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(50):
            try:
                write_atomic(path, f"writer {n} round {i}\n", durable=durable)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert path.read_text().startswith("writer ")
    assert [p.name for p in tmp_path.iterdir()] == ["alice.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, b"not text")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["alice.json"]
