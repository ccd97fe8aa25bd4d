"""Paths built from atSigns, provably inside their root.

An atSign's data directory is ``<data_root>/<atSign without @>``. The name is checked to
be exactly one path component (not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL),
so the result is a direct child of the root whatever the atSign; the runners check again,
lexically, that the directory they are handed lies under their root before they create,
chown or mount it.
"""

from __future__ import annotations

import os
from pathlib import Path


class PathEscape(ValueError):
    """A path built from an atSign would leave its root."""


def atsign_component(atsign: str) -> str:
    """The atSign as one path component (``@alice`` -> ``alice``); PathEscape otherwise."""
    name = atsign[1:] if atsign.startswith("@") else atsign
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise PathEscape(f"{atsign!r} cannot name a directory (it is not one path component)")
    return name


def atsign_dir(root: Path, atsign: str) -> Path:
    """``root/<atSign without @>``, a direct child of ``root``."""
    return root / atsign_component(atsign)


def ensure_within(root: Path, path: Path, what: str) -> Path:
    """Return ``path`` if it is lexically below ``root`` (not ``root`` itself); else raise.

    Lexical (``normpath``, no symlinks followed), so ``root/alice/..`` is refused even
    before anything exists on disk.
    """
    base = Path(os.path.normpath(os.path.abspath(root)))
    target = Path(os.path.normpath(os.path.abspath(path)))
    if target == base or not target.is_relative_to(base):
        raise PathEscape(f"{what} {path} is not inside {root}")
    return path
