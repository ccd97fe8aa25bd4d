"""Fixtures for the CephFS tests: the supervisor's fencer, and file operations that may hang.

The cluster itself is the session-wide ``ceph_cluster`` of ``testbed/pytest_plugin.py``; each
test mounts its nodes through ``ceph_space``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

import pytest

from storage import CephFencer
from testbed.ceph import CephCluster


@pytest.fixture
async def fencer(ceph_cluster: CephCluster) -> AsyncIterator[CephFencer]:
    """A supervisor's fencer: its own key with only the fencer caps (``fencer_caps``)."""
    keyring = ceph_cluster.fencer_keyring("fence")
    async with CephFencer(
        conffile=ceph_cluster.conf_path,
        entity="client.fence",
        keyring=keyring,
        fs_name=ceph_cluster.fs_name,
        timeout=20.0,
    ) as f:
        yield f


class Background:
    """A blocking call in a daemon thread: a file operation on a frozen mount blocks until
    the thaw (or the kill at teardown), and must not block the test itself."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.began = time.monotonic()
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self._done.set()
            with contextlib.suppress(RuntimeError):  # the test's loop is gone
                self._loop.call_soon_threadsafe(self._event.set)

    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, timeout: float) -> bool:
        """Whether it finished within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self._done.is_set()

    def get(self) -> Any:
        assert self._done.is_set(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


async def call(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Run ``fn`` in a daemon thread; its result or exception, or TimeoutError if it hangs."""
    job = Background(fn)
    if not await job.wait(timeout):
        raise TimeoutError(f"{fn!r} still blocked after {timeout}s")
    return job.get()


def append_fsync(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and fsync it (what an atServer does per acknowledged write)."""
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def open_append(path: Path) -> TextIO:
    """``path`` opened for appending (as an atServer keeps its log open)."""
    return open(path, "a")


def close_quietly(f: TextIO) -> None:
    """Close ``f``; a fenced mount fails the final flush, which is expected."""
    with contextlib.suppress(OSError):
        f.close()


def errno_of(fn: Callable[[], Any]) -> int | None:
    """The errno ``fn`` failed with, or None if it succeeded."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None
