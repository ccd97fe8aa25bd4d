"""The inventory and the node list from the DCS (``inventory.source: dcs``).

:class:`InventoryFeed` follows the atSign records' watch and keeps the supervisor's
inventory mapping (shared with the cycle, the claim view and the API) equal to the
enabled records: an added record is claimed at once, a removed or disabled one leaves the
inventory (its owner stops it cleanly and releases it; the data stays), a policy change
takes effect in the next cycle of that atSign. Only changed atSigns are marked.

:class:`MembershipFeed` keeps the node list equal to the live node records (each bound to
its node's session): a dead node drops out of every rank when its session ends, and a new
node joins by starting. Nodes are few, so it reads them all every ``interval``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from leases.base import Backend, ClaimEventKind, LeaseError
from leases.records import AtSignRecord, RecordEvent
from supervisor.claim_cache import follow
from supervisor.metrics import SupervisorMetrics
from supervisor.placement import AtSignPolicy, NodeRef

log = logging.getLogger("supervisor")


def policy_of(record: AtSignRecord) -> AtSignPolicy:
    return AtSignPolicy(record.atsign, record.prefer_nodes, record.prefer_clouds)


class InventoryFeed:
    """The enabled atSign records as the inventory; ``synced`` after the first list."""

    def __init__(
        self,
        backend: Backend,
        inventory: MutableMapping[str, AtSignPolicy],
        mark: Callable[[list[str]], None],
        *,
        retry_interval: float = 1.0,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.inventory = inventory
        self.mark = mark
        self.retry_interval = retry_interval
        self.metrics = metrics
        self.records: dict[str, AtSignRecord] = {}
        self.synced = False

    def _set(self, atsign: str, record: AtSignRecord | None) -> bool:
        """Apply one record (None: gone); True when the inventory changed."""
        if record is None:
            self.records.pop(atsign, None)
        else:
            self.records[atsign] = record
        old = self.inventory.get(atsign)
        new = policy_of(record) if record is not None and not record.disabled else None
        if old == new:
            return False
        if new is None:
            del self.inventory[atsign]
        else:
            self.inventory[atsign] = new
        return True

    def apply(self, event: RecordEvent) -> list[str]:
        """Apply one watch event; return the atSigns whose inventory entry changed."""
        changed: list[str] = []
        if event.kind is ClaimEventKind.RESYNC:
            fresh = dict(event.snapshot or {})
            for atsign in sorted(self.records.keys() | self.inventory.keys() | fresh.keys()):
                if self._set(atsign, fresh.get(atsign)):
                    changed.append(atsign)
            self.synced = True
        elif event.atsign is not None:
            record = event.record if event.kind is ClaimEventKind.PUT else None
            if event.kind is ClaimEventKind.PUT and record is None:
                log.warning(
                    "event=atsign-record-invalid atsign=%s problem=%r (treated as absent)",
                    event.atsign,
                    event.problem,
                )
            if self._set(event.atsign, record):
                changed.append(event.atsign)
        return changed

    def _handle(self, event: RecordEvent) -> None:
        changed = self.apply(event)
        if changed:
            log.info(
                "event=inventory-changed atsigns=%s total=%d",
                ",".join(changed[:10]) + ("..." if len(changed) > 10 else ""),
                len(self.inventory),
            )
            self.mark(changed)

    async def run(self) -> None:
        """Follow the records' watch forever (it resumes by itself; a failure is retried)."""
        await follow(
            self.backend.watch_atsign_records,
            self._handle,
            label="inventory_watch",
            retry_interval=self.retry_interval,
            metrics=self.metrics,
        )


class MembershipFeed:
    """The live members (node records) as the node list, this node always among them."""

    def __init__(
        self,
        read: Callable[[], Awaitable[dict[str, dict[str, Any]]]],
        nodes: list[NodeRef],
        me: NodeRef,
        on_change: Callable[[list[NodeRef]], None],
        *,
        interval: float,
        timeout: float,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.read = read
        self.nodes = nodes
        self.me = me
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        self.records: dict[str, dict[str, Any]] = {}
        self.listed = False
        """The node records were read once (before that, ranks would count this node alone)."""

    def apply(self, records: dict[str, dict[str, Any]]) -> bool:
        """Set the node list from the records; True when it changed."""
        self.records = records
        members = {self.me.name: self.me}
        for name, rec in records.items():
            cloud = rec.get("cloud")
            if name and isinstance(cloud, str) and cloud:
                members.setdefault(name, NodeRef(name, cloud))
        fresh = sorted(members.values(), key=lambda n: n.name)
        if fresh == self.nodes:
            return False
        self.nodes[:] = fresh
        return True

    async def refresh(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                records = await self.read()
        except (TimeoutError, LeaseError) as exc:
            if self.metrics is not None:
                self.metrics.dcs_errors.labels("members").inc()
            log.warning("event=members-read-failed error=%r", exc)
            return False
        before = [n.name for n in self.nodes]
        first = not self.listed
        self.listed = True
        if not self.apply(records) and not first:
            return False  # the first read must wake the cycles the gate held back
        log.info(
            "event=members-changed members=%s was=%s",
            ",".join(n.name for n in self.nodes),
            ",".join(before),
        )
        self.on_change(list(self.nodes))
        return True

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)
