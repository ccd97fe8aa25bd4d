"""The fence file in an atServer's data directory: the highest fencing token that ever started.

Protocol (all under ``flock`` on the fence file, so it also holds across containers sharing
the directory through a bind mount):

* start: take the lock exclusively; refuse if the file holds a higher token; otherwise write
  ours and fsync. Only then load the data, so every write a lower-token server acknowledged
  (see below) is already on disk.
* each write: take the lock shared, check the file still holds our token, append the write
  and fsync it, release, then acknowledge. A server that sees a higher token writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

FENCE_FILE_NAME = "fence"


class FenceError(Exception):
    """Our token is lower than the one in the fence file: this server must not serve."""

    def __init__(self, path: Path, ours: int, current: int) -> None:
        super().__init__(
            f"fencing token {ours} is lower than token {current} in {path}: "
            "a newer atServer owns this data directory"
        )
        self.path = path
        self.ours = ours
        self.current = current


class FenceFileCorrupt(Exception):
    """The fence file exists but does not hold a token."""


def _read_token(fd: int, path: Path) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 64).strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise FenceFileCorrupt(f"{path} does not hold a fencing token: {raw[:40]!r}") from None


class Fence:
    """Our token and the fence file of one data directory."""

    def __init__(self, data_dir: Path, token: int) -> None:
        if token < 0:
            raise ValueError(f"fencing token must be >= 0, got {token}")
        self.path = data_dir / FENCE_FILE_NAME
        self.token = token
        self._fd: int | None = None

    def claim(self) -> int:
        """Write our token unless a higher one is there (FenceError). Returns the previous one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                previous = _read_token(fd, self.path)
                if previous > self.token:
                    raise FenceError(self.path, self.token, previous)
                if previous != self.token:
                    data = f"{self.token}\n".encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
                    os.fsync(fd)
                    _fsync_dir(self.path.parent)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return previous

    def current(self) -> int:
        """The token in the fence file now."""
        return read_fence(self.path.parent)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the fence shared while a write is made durable; FenceError if overtaken."""
        if self._fd is None:
            raise RuntimeError("Fence.held() before claim()")
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            current = _read_token(self._fd, self.path)
            if current != self.token:
                raise FenceError(self.path, self.token, current)
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def check(self) -> None:
        """FenceError if the fence file no longer holds our token."""
        with self.held():
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_fence(data_dir: Path) -> int:
    """The token in ``data_dir``'s fence file (0 when there is none)."""
    path = data_dir / FENCE_FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _read_token(fd, path)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
