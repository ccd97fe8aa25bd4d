"""The data guard in the daemon: check before a claim, remember refusals, see them change.

The rule itself is :func:`supervisor.data_guard.verdict`; this module reads the record
and the marker, turns a refusal into the sentence, event, metric and node record an
operator sees, and lets a refusal go once the data dir's marker changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from atserver_runner.paths import atsign_dir
from leases.base import Generation, GenerationStamp, LeaseError
from supervisor import data_guard
from supervisor.context import NodeContext
from supervisor.deadline import within
from supervisor.state import Refusal

log = logging.getLogger("supervisor")

Fingerprint = tuple[int, int, int, int] | None
_Read = tuple[Fingerprint, data_guard.Marker | None]

FENCE_RETRY_S = 5.0
"""Seconds before a takeover is tried again after the lost owner could not be fenced."""


class DataGuard:
    """This node's side of the data guard."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._reads: dict[str, asyncio.Future[_Read]] = {}
        self._judged: dict[str, Fingerprint] = {}
        """The marker's fingerprint taken *before* the read a verdict rests on: a marker
        written after that read (the claim's winner stamping it on shared storage) then
        counts as a change, and the refusal is looked at again."""

    def data_dir(self, atsign: str) -> Path:
        return atsign_dir(self.ctx.cfg.runner.data_root, atsign)

    async def check(self, atsign: str) -> data_guard.Verdict | str:
        """The verdict for this node's data dir, or a sentence saying why it could not be
        checked (DCS or storage unreachable, the lost owner not fenced yet: nothing is
        refused, it is tried again soon).

        On shared storage the last owner, if it was lost, is fenced first: until then its
        client holds the data dir's capabilities, and even reading the marker waits for it
        (the MDS's session timeout, a minute)."""
        ctx = self.ctx
        record = await self._record(atsign)
        if isinstance(record, str):
            return record
        unfenced = await self.fence_lost_owner(record)
        if unfenced is not None:
            ctx.retry(atsign, FENCE_RETRY_S)
            return f"not claiming {atsign}: {unfenced}"
        try:
            self._judged[atsign], marker = await self._read_marker(atsign)
        except data_guard.MarkerUnreadable as exc:
            ctx.retry(atsign, 0.25)
            return f"could not read {atsign}'s data dir marker: {exc}"
        except TimeoutError:
            ctx.retry(atsign, FENCE_RETRY_S)
            return (
                f"could not read {atsign}'s data dir marker: no answer from the storage "
                f"within {ctx.cfg.storage.probe_timeout:g}s"
            )
        if marker is not None and (record is None or marker.token > record.token):
            # A marker newer than the record we read: the record moved on while the lost
            # owner was fenced or the marker read (another node claimed and started it), so
            # judge against the current record, not refuse a copy for being current.
            record = await self._record(atsign)
            if isinstance(record, str):
                return record
        return data_guard.verdict(
            record,
            marker,
            cloud=ctx.me.cloud,
            client=ctx.storage.client_ref(),
            unstamped=ctx.state.unstamped.get(atsign, ()),
        )

    def claiming(self, atsign: str, session_id: str, stamp: GenerationStamp) -> None:
        """Remember a claim about to be sent with ``stamp``, until its marker is stamped:
        if its answer is lost or its start stops first, the record it wrote names a start
        that never began, and this process may build on it (see :mod:`data_guard`)."""
        u = data_guard.UnstampedClaim(self.ctx.me.name, session_id, stamp.dir_id, stamp.prev)
        self.ctx.state.unstamped.setdefault(atsign, set()).add(u)

    def stamped(self, atsign: str) -> None:
        """The marker now holds the claim's token: nothing of it is left unstamped."""
        self.ctx.state.unstamped.pop(atsign, None)

    async def _record(self, atsign: str) -> Generation | str | None:
        """The atSign's generation record, or why it could not be read (retried soon)."""
        ctx = self.ctx
        try:
            return await within(ctx.backend.generation(atsign), ctx.timing.request_timeout)
        except (TimeoutError, LeaseError) as exc:
            if ctx.metrics is not None:
                ctx.metrics.dcs_errors.labels("generation").inc()
            ctx.retry(atsign, 0.25)
            return f"could not read {atsign}'s generation record: {exc!r}"

    async def _read_marker(self, atsign: str) -> _Read:
        """(the marker's fingerprint, then the marker), read in a thread, bounded by
        ``storage.probe_timeout``; while an earlier read of it is still blocked (a hung
        mount), no second one is started."""
        data_dir = self.data_dir(atsign)

        def read() -> _Read:
            return data_guard.fingerprint(data_dir), data_guard.read_marker(data_dir)

        pending = self._reads.get(atsign)
        if pending is None or pending.done():
            pending = asyncio.ensure_future(asyncio.to_thread(read))
            self._reads[atsign] = pending
        try:
            return await asyncio.wait_for(
                asyncio.shield(pending), self.ctx.cfg.storage.probe_timeout
            )
        finally:
            if pending.done():
                self._reads.pop(atsign, None)

    async def fence_lost_owner(self, record: Generation | None) -> str | None:
        """Fence the storage client of the atSign's last start if its node was lost (no
        live session of that node at all); ``None`` when done or not needed, else why not.

        A node with a live session (the same, or a new one after a restart) is not fenced:
        it hands off before it releases, and it opens a new session only after it stopped
        everything the old one ran; its one mount serves all its other atSigns too."""
        ctx = self.ctx
        if ctx.takeover_fence is None or record is None or record.node in ("", ctx.me.name):
            return None
        try:
            nodes = await within(ctx.backend.nodes(), ctx.timing.request_timeout)
        except (TimeoutError, LeaseError) as exc:
            return f"cannot tell whether {record.node} is alive to fence it: {exc!r}"
        if record.node in nodes:
            return None
        ok, text = await ctx.takeover_fence.fence(record.client, f"client.{record.node}")
        return None if ok else f"could not fence the lost owner {record.node}'s storage ({text})"

    def refuse(self, atsign: str, v: data_guard.Verdict) -> str:
        """Remember a refusal (no new claim until the data dir changes or an operator acts)."""
        ctx = self.ctx
        # The fingerprint before the read (None: there was no marker then), else now.
        if atsign in self._judged:
            fp = self._judged.pop(atsign)
        else:
            fp = data_guard.fingerprint(self.data_dir(atsign))
        previous = ctx.state.refused.get(atsign)
        ctx.state.refused[atsign] = Refusal(v.reason, fp, time.time())
        if previous is None or previous.reason != v.reason:
            if ctx.metrics is not None:
                ctx.metrics.stale_data_refusals.inc()
            log.error(
                "event=stale-data-refused atsign=%s node=%s data_dir=%s reason=%r",
                atsign,
                ctx.me.name,
                self.data_dir(atsign),
                v.reason,
            )
            ctx.state.node_record_dirty = True
        return f"refused {atsign}: {v.reason}"

    def changed(self) -> set[str]:
        """Refusals whose data dir's marker changed: dropped, to be checked again (blocking:
        stats the markers, call it in a thread)."""
        state = self.ctx.state
        gone = {
            a
            for a, r in list(state.refused.items())
            if data_guard.fingerprint(self.data_dir(a)) != r.fingerprint
        }
        for atsign in gone:
            state.refused.pop(atsign, None)
            state.node_record_dirty = True
            log.info("event=stale-data-recheck atsign=%s reason='its data dir changed'", atsign)
        return gone
