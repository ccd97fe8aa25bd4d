"""Keep the node's DCS session across a supervisor restart, so running atServers are adopted.

After opening a session the supervisor records its id in ``<state_dir>/session.json``.
A supervisor that starts again (after a crash, an upgrade, ``kill -9``) first tries to
*resume* that session: one renewal of the recorded etcd lease / Consul session. If the
DCS confirms it, the claims the session holds are still this node's, and the first cycle
adopts the workloads that run with those claims' tokens instead of restarting them. If
the session is gone (expired, revoked at a clean shutdown), a new one is opened and
whatever still runs is fenced.

The fence stops the node's workloads at the recorded renew deadline at the latest, so a
resume after that point adopts the claims but restarts the atServers (same token).

"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from atserver_runner.atomic_file import write_atomic
from leases.base import Backend, Session, Timing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionRecord:
    """What identifies a node's session on its DCS."""

    backend: str
    prefix: str
    node: str
    session_id: str


def save_record(path: Path, rec: SessionRecord) -> None:
    """Atomically write the record (temp file + rename)."""
    write_atomic(path, json.dumps(rec.__dict__))


def load_record(path: Path) -> SessionRecord | None:
    """The record, or ``None`` when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return SessionRecord(
            backend=str(data["backend"]),
            prefix=str(data["prefix"]),
            node=str(data["node"]),
            session_id=str(data["session_id"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def resume_session(
    backend: Backend, node: str, timing: Timing, session_id: str
) -> Session | None:
    """Re-attach to a live session by id (:meth:`leases.base.Backend.resume_session`).

    ``None`` if the DCS says it is gone (or it has another TTL); raises
    :class:`leases.base.DCSUnavailable` when the DCS cannot be reached.
    """
    session = await backend.resume_session(node, timing, session_id)
    if session is not None:
        log.info("event=session-resumed id=%s", session_id)
    return session
