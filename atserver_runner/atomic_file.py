"""Replace a small file atomically, safe against concurrent writers of the same file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to a fresh temp file beside ``path``, then rename it over ``path``.

    Every call gets its own temp name, so two threads or processes replacing the same
    file never rename each other's half-written temp file away (the last rename wins).
    ``durable`` fsyncs the data before the rename (survives power loss, not only a crash).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
