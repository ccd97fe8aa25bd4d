"""The data guard: never start an atSign from a data directory that is not its latest.

Two records of the same fact, kept by the supervisor for any atServer image:

* the **generation record** in the DCS (``<prefix>/generations/@alice``, no lease): the
  token, node and data directory of the atSign's latest start. The claim writes it in its
  own transaction, and only if it is still the record the node checked (see
  :class:`leases.base.GenerationStamp`), so the check and the claim are one atomic step;
* the **marker** in the data directory (``.atfailover-generation``, JSON): the token the
  directory was last started with, and the directory's own id (its history). The
  supervisor writes and fsyncs it (file and directory) after the claim, before the start.

:func:`verdict` compares them before a node claims. Its rule is strict: the marker must name
the recorded data directory and the recorded token. Anything else (no marker, an older
one, another copy, or a marker while the DCS has no record) is refused, and the node does
not claim, so a node whose copy is current can.

One exception, for a start that never began. A claim writes the record before the marker
is stamped, so a claim whose answer was lost (a timeout while the transaction committed),
or whose start stopped before the marker (the session went, the marker write failed),
leaves a record that no data directory holds. The process that made that claim remembers
it (:class:`UnstampedClaim`) and may build on the record's ``prev`` from the same data
directory: the record's start could only have run here, with this directory, and its
marker was never stamped, so nothing was written under its token. Any other node, or
this node after a restart (the memory is gone), still refuses; only a node that dies
between its claim and the marker's fsync (milliseconds) leaves the atSign refused
everywhere until an operator runs ``supervisor data accept``: safe, never silent, rare.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from atserver_runner.atomic_file import write_atomic
from leases.base import Generation, GenerationStamp

MARKER_NAME = ".atfailover-generation"


class MarkerUnreadable(Exception):
    """The marker exists but cannot be read or parsed (storage error, damage)."""


@dataclass(frozen=True)
class Marker:
    """What a data directory says about its history (see module docstring)."""

    token: int
    dir_id: str
    node: str = ""
    time: float = 0.0
    atsign: str = ""


def marker_path(data_dir: Path) -> Path:
    return data_dir / MARKER_NAME


def read_marker(data_dir: Path) -> Marker | None:
    """The data directory's marker; ``None`` if it has none. Raises MarkerUnreadable."""
    path = marker_path(data_dir)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MarkerUnreadable(f"{path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
        return Marker(
            token=int(data["token"]),
            dir_id=str(data["dir_id"]),
            node=str(data.get("node", "")),
            time=float(data.get("time", 0.0)),
            atsign=str(data.get("atsign", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise MarkerUnreadable(f"{path} is damaged: {exc!r}") from None


def write_marker(data_dir: Path, marker: Marker) -> None:
    """Atomically replace the marker; fsync the file and the directory (the rename)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(marker_path(data_dir), json.dumps(asdict(marker), sort_keys=True))
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(data_dir: Path) -> tuple[int, int, int, int] | None:
    """What changes when the marker changes (inode, size, mtime, ctime), or None if absent."""
    with contextlib.suppress(FileNotFoundError):
        st = marker_path(data_dir).stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return None


def new_dir_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Verdict:
    """May this node claim and start the atSign from its data directory?"""

    ok: bool
    reason: str
    stamp: GenerationStamp | None = None
    """For ``ok``: what the claim records as the new generation."""
    record: Generation | None = None
    """The generation record it judged (the last start: its node and storage client)."""


@dataclass(frozen=True)
class UnstampedClaim:
    """A claim this process made, or may have made (its answer was lost), whose start did
    not stamp the data directory's marker: the node, session and stamp of that claim."""

    node: str
    session: str
    dir_id: str
    prev: int


def _never_began(
    record: Generation, marker: Marker | None, unstamped: Collection[UnstampedClaim]
) -> bool:
    """The record is a claim of this process that never stamped this directory, and the
    directory still holds what that claim built on."""
    if record.accepted_by:
        return False
    if marker is None:
        holds_prev = record.prev == 0
    else:
        holds_prev = marker.dir_id == record.dir_id and marker.token == record.prev
    return holds_prev and any(
        u.node == record.node
        and u.dir_id == record.dir_id
        and u.prev == record.prev
        and (not record.session or u.session == record.session)
        for u in unstamped
    )


def _last(record: Generation) -> str:
    how = f"accepted by {record.accepted_by}" if record.accepted_by else f"on {record.node}"
    return f"the last start was {record.token} {how}"


def verdict(
    record: Generation | None,
    marker: Marker | None,
    cloud: str = "",
    client: str = "",
    unstamped: Collection[UnstampedClaim] = (),
) -> Verdict:
    """Compare the DCS's record with the data directory's marker (pure); ``client`` is this
    node's storage client, written into the new record of an ``ok``; ``unstamped`` the
    claims this process made without stamping this directory (see the module docstring)."""
    if record is not None and _never_began(record, marker, unstamped):
        stamp = GenerationStamp(record.token, record.dir_id, record.prev, cloud, client)
        return Verdict(
            True,
            f"data dir is current: start {record.token} on {record.node} never began",
            stamp,
            record,
        )
    if record is None:
        if marker is None:
            stamp = GenerationStamp(0, new_dir_id(), 0, cloud, client)
            return Verdict(True, "new atSign", stamp)
        return Verdict(
            False,
            f"data dir holds generation {marker.token} (from {marker.node or 'an unknown node'}) "
            "but the DCS has no generation record of this atSign",
        )
    if marker is None:
        return Verdict(False, f"data dir holds no generation, {_last(record)}", record=record)
    if marker.dir_id != record.dir_id:
        return Verdict(
            False,
            f"data dir holds generation {marker.token} of another copy "
            f"(dir {marker.dir_id[:8]}, not {record.dir_id[:8]}), {_last(record)}",
            record=record,
        )
    if marker.token != record.token:
        return Verdict(
            False, f"data dir holds generation {marker.token}, {_last(record)}", record=record
        )
    stamp = GenerationStamp(record.token, marker.dir_id, marker.token, cloud, client)
    return Verdict(True, "data dir is current", stamp, record)


def stamp_marker(data_dir: Path, token: int, dir_id: str, node: str, atsign: str) -> None:
    """Write the marker of a start with ``token`` (before the atServer starts)."""
    write_marker(
        data_dir, Marker(token=token, dir_id=dir_id, node=node, time=time.time(), atsign=atsign)
    )
