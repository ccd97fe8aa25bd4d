"""The reconciler: one cycle is a snapshot of the caches, a pure decision, and its actions.

Cycles run side by side (a start of a thousand atSigns does not hold up a fence
elsewhere): each marks the atSigns it acts on busy in the work queue, so the next
cycle leaves them alone, and logs one sentence when its actions are done. Idle cycles
("nothing to do: ...") are logged only when their sentence changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from leases.base import Claim, LeaseError, SessionState
from supervisor import cycle
from supervisor.actions import Actions
from supervisor.context import NodeContext
from supervisor.cycle import shorten
from supervisor.deadline import within
from supervisor.placement import AtSignPolicy, NodeRef
from supervisor.workqueue import WorkQueue

log = logging.getLogger("supervisor")


class Reconciler:
    """Runs cycles for one node (see module docstring)."""

    def __init__(
        self,
        ctx: NodeContext,
        actions: Actions,
        queue: WorkQueue,
        *,
        inventory: Mapping[str, AtSignPolicy],
        nodes: Sequence[NodeRef],
        settings: cycle.PlacementSettings,
        held: Mapping[str, Claim],
        node_record: Callable[[], dict[str, Any]],
        inventory_synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.ctx = ctx
        self.actions = actions
        self.queue = queue
        self.inventory = inventory
        self.nodes = nodes
        self.settings = settings
        self.held = held
        self.node_record = node_record
        self.inventory_synced = inventory_synced
        self.claiming = 0
        """Claims being made by running cycles (they count against capacity)."""
        self.ready = False
        """A cycle ran with the claims listed and the session alive."""
        self._cycles: set[asyncio.Task[Any]] = set()
        self._last_idle = ""
        if ctx.metrics is not None:
            ctx.metrics.inventory_atsigns.set_function(lambda: float(len(self.inventory)))

    def snapshot(self, dirty: set[str] | None) -> cycle.Snapshot:
        """The cycle's view: read-only views of the caches, taken without I/O."""
        ctx = self.ctx
        s = ctx.session
        st = ctx.state
        cache = ctx.claims
        return cycle.Snapshot(
            now=ctx.clock(),
            me=ctx.me,
            session_state=s.state if s is not None else SessionState.LOST,
            session_id=s.session_id if s is not None and not s.lost.is_set() else None,
            renew_deadline=s.renew_deadline if s is not None else 0.0,
            claims=cache.claims if cache.synced else None,
            workloads=ctx.workloads.items,
            registered=ctx.registrar.registered.keys(),
            inventory=self.inventory,
            nodes=self.nodes,
            vacancies=st.vacancies,
            draining=st.draining,
            handoffs=frozenset(st.handoffs),
            in_flight=ctx.handoffs.in_flight.keys(),
            excluded=st.excluded,
            refused=st.refused.keys(),
            failback_asked=st.failback_asked,
            settings=self.settings,
            held=self.held,
            dirty=dirty,
            busy=self.queue.busy,
            claiming=self.claiming,
            storage_ready=ctx.storage.ready,
            storage_leave=st.storage_leave,
            inventory_synced=self.inventory_synced(),
        )

    async def run_cycle(self, dirty: set[str] | None = None) -> tuple[str, cycle.Plan]:
        """One cycle over ``dirty`` (``None``: everything): decide, act, say what it did."""
        ctx = self.ctx
        snap = self.snapshot(dirty)
        plan = cycle.decide(snap)
        for at, atsign in plan.waiting:
            self.queue.later(atsign, at)
        touched = [a.atsign for a in plan.actions]
        claims = sum(1 for a in plan.actions if isinstance(a, cycle.ClaimAndStart))
        self.queue.enter(touched)
        self.claiming += claims
        try:
            outcomes = await self.actions.execute(plan, snap)
        finally:
            self.claiming -= claims
            self.queue.leave(touched)
        await self.publish_node_record()
        ctx.state.cycles += 1
        if ctx.metrics is not None:
            ctx.metrics.cycles.inc()
        sentence = plan.sentence + (" => " + "; ".join(shorten(outcomes)) if outcomes else "")
        ctx.state.last_sentence = sentence
        return sentence, plan

    async def publish_node_record(self) -> None:
        ctx = self.ctx
        if not ctx.state.node_record_dirty or not ctx.session_usable():
            return
        s = ctx.session
        assert s is not None
        try:
            await within(s.publish_node(self.node_record()), ctx.timing.request_timeout)
        except (TimeoutError, LeaseError) as exc:
            if ctx.metrics is not None:
                ctx.metrics.dcs_errors.labels("node_record").inc()
            log.warning("event=node-record-failed error=%r", exc)
            return
        ctx.state.node_record_dirty = False

    async def cycle_logged(self, dirty: set[str] | None = None) -> cycle.Plan | None:
        """:meth:`run_cycle`, logged; ``None`` (and the error logged) when it could not run."""
        ctx = self.ctx
        try:
            sentence, plan = await self.run_cycle(dirty)
        except Exception as exc:  # log and go on: the next cycle starts over
            if ctx.metrics is not None:
                ctx.metrics.cycle_failures.inc()
            log.exception("event=cycle-failed error=%r", exc)
            self.queue.mark(dirty)
            return None
        if plan.actions or sentence != self._last_idle:
            log.info("event=cycle sentence=%r", sentence)
        self._last_idle = "" if plan.actions else sentence
        if ctx.claims.synced and ctx.session_usable() and self.inventory_synced():
            self.ready = True
        return plan

    def spawn(self, dirty: set[str] | None) -> None:
        """Start a cycle beside the running ones."""
        task = asyncio.create_task(self.cycle_logged(dirty), name="cycle")
        self._cycles.add(task)
        task.add_done_callback(self._cycles.discard)

    async def cancel_all(self) -> None:
        """Cancel every running cycle (and so its actions) and wait for them."""
        tasks = list(self._cycles)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
