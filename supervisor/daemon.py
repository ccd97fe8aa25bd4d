"""The supervisor daemon: work that grows with what changed, not with how many atSigns exist.

The controller pattern of Kubernetes (client-go's informers and work queues):

* the session keeper (:mod:`supervisor.keeper`) holds the DCS session on its own thread
  and loop, with the fence's heartbeat and the node's Consul check;
* caches fed by events: the claims from the DCS watch (:mod:`supervisor.claim_cache`), the
  workloads from the runner's events (:mod:`supervisor.workloads`), the registrations from
  what this node did (with anti-entropy every ``resync_interval``);
* every change marks its atSigns *dirty*; a cycle takes the dirty ones, asks the pure
  :func:`supervisor.cycle.decide` and runs the plan's actions (:mod:`supervisor.actions`),
  then logs one sentence; cycles run side by side, an atSign busy in one is left to wait;
* timers (rank delays, exclusions, retries) mark their atSign when due; a full resync
  every ``resync_interval`` catches anything missed;
* the prober (:mod:`supervisor.prober`) and the handoff tracker run on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from atserver_runner.base import Runner, WorkloadState
from atserver_runner.probe import ProbePool, probe_ssl_context
from leases.base import Backend, Clock, LeaseError, SessionState
from supervisor import cycle
from supervisor.actions import Actions
from supervisor.api_client import advertised_api_url
from supervisor.claim_cache import ClaimCache
from supervisor.claim_view import ClaimView
from supervisor.config import SupervisorConfig
from supervisor.context import NodeContext
from supervisor.control import Control
from supervisor.deadline import within
from supervisor.guard import DataGuard
from supervisor.handoffs import REPORTS_KEPT, STATUS_REPORTS, HandoffTracker
from supervisor.inventory_feed import InventoryFeed, MembershipFeed
from supervisor.keeper import SessionKeeper, SessionProxy
from supervisor.metrics import SupervisorMetrics
from supervisor.peer_fence import DepartedNodes, Departure
from supervisor.placement import AtSignPolicy, NodeRef
from supervisor.prober import Prober
from supervisor.reconciler import Reconciler
from supervisor.registration import NodeHealth, Registrar, RegistrationError
from supervisor.specs import PortAllocator, SpecBuilder, default_spec_builder
from supervisor.state import State
from supervisor.storage import StorageGuard
from supervisor.takeover_fence import TakeoverFence
from supervisor.timing import build_timing
from supervisor.workloads import WorkloadCache
from supervisor.workqueue import WorkQueue

__all__ = ["REPORTS_KEPT", "STATUS_REPORTS", "Supervisor"]

log = logging.getLogger("supervisor")


class Supervisor:
    """One node's supervisor (see module docstring). Use :meth:`run` with a stop event.

    ``backend`` is the main loop's DCS client; ``session_backend`` makes the keeper's own
    (default: the same object, for ``threaded_keeper=False``).
    """

    def __init__(
        self,
        cfg: SupervisorConfig,
        *,
        backend: Backend,
        runner: Runner,
        registrar: Registrar,
        metrics: SupervisorMetrics | None = None,
        spec_builder: SpecBuilder | None = None,
        clock: Clock = time.monotonic,
        heartbeat_path: Path | None = None,
        pid: int | None = None,
        session_backend: Any = None,
        threaded_keeper: bool = True,
        node_health: NodeHealth | None = None,
    ) -> None:
        import os

        self.cfg = cfg
        self.timing = build_timing(cfg)
        self.backend = backend
        self.runner = runner
        self.registrar = registrar
        self.metrics = metrics
        self.clock = clock
        self.me = NodeRef(cfg.node.name, cfg.node.cloud)
        self.nodes = [NodeRef(n.name, n.cloud) for n in cfg.inventory.nodes] or [self.me]
        self.inventory = {
            a.atsign: AtSignPolicy(a.atsign, tuple(a.prefer_nodes), tuple(a.prefer_clouds))
            for a in cfg.inventory.atsigns
        }
        p = cfg.placement
        self.settings = cycle.PlacementSettings(
            capacity=p.capacity,
            rank_delay=p.rank_delay,
            prefer_other_cloud=p.prefer_other_cloud,
            failback=p.failback,
            failback_interval=p.failback_check_interval,
            drain_concurrency=p.drain_concurrency,
        )
        self.api_url = advertised_api_url(cfg.http, cfg.node)
        self.heartbeat_path = heartbeat_path or cfg.heartbeat_path
        self.keeper = SessionKeeper(
            node=cfg.node.name,
            timing=self.timing,
            make_backend=session_backend or (lambda: backend),
            record=(cfg.dcs.backend, cfg.dcs.prefix),
            state_dir=cfg.runner.state_dir,
            heartbeat_path=self.heartbeat_path,
            pid=pid or os.getpid(),
            node_health=node_health,
            metrics=metrics,
            clock=clock,
            threaded=threaded_keeper,
            # The node check passes once a cycle has reconciled the agent's registrations.
            confirmed=lambda: self.reconciler.ready,
        )
        self.state = State()
        self.queue = WorkQueue(clock)
        self.view = ClaimView(
            inventory=self.inventory,
            nodes=self.nodes,
            state=self.state,
            session_id=lambda: self.session.session_id if self.session is not None else None,
            clock=clock,
            mark=self.queue.mark,
            own_claim_gone=lambda atsign: self.keeper.renew_now(
                f"own claim of {atsign} deleted, not released by this node"
            ),
        )
        self._held = self.view.held
        claims = ClaimCache(
            backend,
            lambda changed: self.view.changed(claims.claims, changed, claims.synced),
            retry_interval=self.timing.renew_interval,
            metrics=metrics,
        )
        workloads = WorkloadCache(runner, self.queue.mark, metrics=metrics)
        self.ctx = NodeContext(
            cfg=cfg,
            timing=self.timing,
            me=self.me,
            backend=backend,
            runner=runner,
            registrar=registrar,
            keeper=self.keeper,
            state=self.state,
            claims=claims,
            workloads=workloads,
            prober=Prober(
                runner,
                registrar,
                interval=cfg.timing.probe_interval,
                timeout=min(2.0, max(0.5, cfg.timing.probe_interval)),
                usable=lambda: self.ctx.session_usable(),
                on_gone=lambda a: self.queue.mark([a]),
                endpoint=self._endpoint,
                pool=ProbePool(probe_ssl_context(cfg.runner.tls.ca if cfg.runner.tls else None)),
                clock=clock,
                metrics=metrics,
            ),
            handoffs=HandoffTracker(
                registrar,
                limit=2 * self.timing.ttl + cfg.runner.start_timeout,
                clock=clock,
                on_done=lambda a: self.queue.mark([a]),
            ),
            ports=PortAllocator(cfg.node.address, *cfg.runner.port_range),
            spec_builder=spec_builder or default_spec_builder(cfg),
            storage=StorageGuard(
                cfg,
                on_change=self._storage_changed,
                nothing_runs=lambda: (
                    not any(
                        w.state is WorkloadState.RUNNING for w in self.ctx.workloads.items.values()
                    )
                ),
                evict=self._evict_own_client,
                metrics=metrics,
                clock=clock,
            ),
            takeover_fence=(
                TakeoverFence(cfg.storage.cephfs, metrics)
                if cfg.storage.kind == "cephfs" and cfg.storage.cephfs is not None
                else None
            ),
            mark=self.queue.mark,
            retry=self.queue.retry,
            api_url=self.api_url,
            metrics=metrics,
            clock=clock,
        )
        self.guard = DataGuard(self.ctx)
        self.actions = Actions(self.ctx, self.guard)
        self.control = Control(
            self.ctx,
            self._held,
            lambda: self.ready,
            lambda: self.state.last_sentence,
            inventory=self.inventory,
            nodes=self.nodes,
        )
        self.inventory_feed: InventoryFeed | None = None
        self.members: MembershipFeed | None = None
        if cfg.inventory.source == "dcs":
            self.inventory_feed = InventoryFeed(
                backend,
                self.inventory,
                self._inventory_changed,
                retry_interval=self.timing.renew_interval,
                metrics=metrics,
            )
            self.members = MembershipFeed(
                backend.nodes,
                self.nodes,
                self.me,
                lambda _nodes: self.queue.mark(None),
                interval=self.timing.renew_interval,
                timeout=self.timing.request_timeout,
                metrics=metrics,
            )
        feed, members = self.inventory_feed, self.members
        self.reconciler = Reconciler(
            self.ctx,
            self.actions,
            self.queue,
            inventory=self.inventory,
            nodes=self.nodes,
            settings=self.settings,
            held=self._held,
            node_record=self.control.node_record,
            inventory_synced=(
                (lambda: feed.synced and members.listed)
                if feed is not None and members is not None
                else (lambda: True)
            ),
        )

    # --- what the API, the CLI and the tests use -----------------------------------------------

    @property
    def session(self) -> SessionProxy | None:
        return self.keeper.proxy

    @property
    def ready(self) -> bool:
        """A cycle ran, the session is alive and the storage passes its probe."""
        return self.reconciler.ready and self.ctx.session_usable() and self.ctx.storage.ready

    def not_ready_because(self) -> str:
        """Why :attr:`ready` is False (empty when it is True)."""
        if not self.ctx.storage.ready:
            return f"storage not ready: {self.ctx.storage.reason}"
        if not self.ctx.session_usable():
            return "no live DCS session"
        if not self.reconciler.ready:
            return "no cycle has run with the claims listed yet"
        return ""

    def held(self) -> list[str]:
        return self.control.held()

    def status(self, reports: int = STATUS_REPORTS) -> dict[str, Any]:
        return self.control.status(reports)

    def request_drain(self) -> str:
        return self.control.request_drain()

    def request_resume(self) -> str:
        return self.control.request_resume()

    def request_handoff(self, atsign: str) -> str:
        return self.control.request_handoff(atsign)

    def request_failback(self, atsign: str, for_node: str) -> str:
        return self.control.request_failback(atsign, for_node)

    def node_record(self) -> dict[str, Any]:
        return self.control.node_record()

    # --- change tracking ------------------------------------------------------------------------

    async def _evict_own_client(self, client_ref: str) -> tuple[bool, str]:
        """Evict this node's own dead CephFS client instance (its ceph-fuse died): until
        then it holds its files' capabilities, and the node that takes its atSigns over
        (and its own next mount) wait for them."""
        fence = self.ctx.takeover_fence
        if fence is None:
            return False, "no fencer configured"
        return await fence.fence(
            client_ref, self.cfg.storage.cephfs.entity if self.cfg.storage.cephfs else ""
        )

    def _inventory_changed(self, changed: list[str]) -> None:
        """AtSign records changed: a new vacant atSign is vacant since now (its rank delay
        counts from here); a removed one is no vacancy of ours."""
        now = self.clock()
        claims = self.ctx.claims.claims
        vacancies = self.state.vacancies
        for atsign in changed:
            if atsign not in self.inventory:
                vacancies.pop(atsign, None)
            elif atsign not in claims and atsign not in vacancies:
                vacancies[atsign] = cycle.Vacancy(since=now)
        self.queue.mark(changed)

    def _storage_changed(self) -> None:
        self.state.node_record_dirty = True
        self.queue.mark(None)

    async def _watch_storage_peers(self) -> None:
        """While this node's storage fails, move its atSigns if other nodes' storage works
        (a fault of this node); if none does (the whole storage is down), keep them: there
        is nowhere better to go, and a restart storm helps nobody."""
        storage = self.ctx.storage
        departed = (
            DepartedNodes(self.me.name, min_absence=self.timing.ttl)
            if self.ctx.takeover_fence is not None
            else None
        )
        while True:
            await asyncio.sleep(self.cfg.storage.probe_interval)
            records: dict[str, dict[str, Any]] | None = None
            if self.ctx.session_usable() and (departed is not None or not storage.ready):
                try:
                    records = await within(self.backend.nodes(), self.timing.request_timeout)
                except (TimeoutError, LeaseError):
                    records = None
            if departed is not None and records is not None:
                holders = {c.info.node for c in self.ctx.claims.claims.values()}
                for d in departed.observe(records, self.clock(), holders):
                    await self._fence_departed(departed, d)
            leave = False
            if not storage.ready and self.ctx.session_usable():
                leave = any(
                    (rec.get("storage") or {}).get("ready")
                    for name, rec in (records or {}).items()
                    if name != self.me.name
                )
            if leave != self.state.storage_leave:
                self.state.storage_leave = leave
                log.warning(
                    "event=storage-leave move=%s reason=%r", leave, storage.reason or "ready"
                )
                self.queue.mark(None)

    async def _fence_departed(self, departed: DepartedNodes, d: Departure) -> None:
        """Evict the client instance of a node whose record left (see :mod:`peer_fence`),
        unless the MDS no longer lists it (it unmounted cleanly)."""
        fence = self.ctx.takeover_fence
        assert fence is not None
        if await fence.holds_session(d.client_ref) is False:
            departed.done(d)
            log.info(
                "event=storage-departed-node node=%s client=%s detail='no MDS session left'",
                d.node,
                d.client_ref,
            )
            return
        ok, text = await fence.fence(d.client_ref, "")
        log.log(
            logging.WARNING if ok else logging.ERROR,
            "event=storage-departed-node-fenced node=%s client=%s ok=%s detail=%r",
            d.node,
            d.client_ref,
            ok,
            text,
        )
        if ok:
            departed.done(d)

    def _endpoint(self, atsign: str) -> tuple[str, int] | None:
        """Where the atSign's running atServer listens (from the workload cache)."""
        w = self.ctx.workloads.items.get(atsign)
        if w is None or w.state is not WorkloadState.RUNNING or not w.port:
            return None
        return (w.host or self.cfg.node.address, w.port)

    def mark(self, atsigns: Iterable[str] | None) -> None:
        """Look at these atSigns (``None``: all) in a cycle, now."""
        self.queue.mark(atsigns)

    async def run_cycle(self, dirty: set[str] | None = None) -> tuple[str, cycle.Plan]:
        """One cycle over ``dirty`` (``None``: everything): decide, act, say what it did."""
        return await self.reconciler.run_cycle(dirty)

    # --- the main loop --------------------------------------------------------------------------

    async def open_session(self) -> bool:
        """Resume the recorded session or open a new one; True on success."""
        if not self.keeper.started:
            self.keeper.start()
        proxy = await self.keeper.open()
        if proxy is None:
            return False
        self.state.handoffs.clear()  # requests made under an earlier session
        self.state.node_record_dirty = True
        self.view.rebuild(self.ctx.claims.claims)
        self.mark(None)
        return True

    async def _wait(self, stop: asyncio.Event, timeout: float) -> None:
        due = self.queue.next_timer()
        if due is not None:
            timeout = min(timeout, max(0.0, due - self.clock()))
        s = self.session
        if s is not None and s.state is SessionState.SUSPENDED:
            timeout = min(timeout, self.timing.renew_interval)
        wake = self.queue.wake
        waits = [wake.wait(), stop.wait()] + ([s.lost.wait()] if s is not None else [])
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
        wake.clear()
        await asyncio.sleep(0.02)  # let a burst of events arrive together

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Sleep ``seconds`` or until ``stop`` is set (the waiter is never left pending)."""
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([waiter], timeout=seconds)
        finally:
            waiter.cancel()

    async def _fence_lost_session(self) -> bool:
        """The session is lost: tell the fence, fence everything, then end the session.

        True when every workload was fenced; False when the cycle could not run or an
        action failed (the runner is broken, say): the fence process stops them anyway,
        since the heartbeat now holds the lost session's deadline.
        """
        self.keeper.write_heartbeat()
        await self.reconciler.cancel_all()
        with contextlib.suppress(Exception):
            await self.ctx.workloads.refresh()
        plan = await self.reconciler.cycle_logged(None)
        await self.keeper.close_session(revoke=True)
        self._held.clear()
        return plan is not None and self.state.last_failures == 0

    async def _resync(self) -> None:
        """The rare full look: workloads, registrations (anti-entropy), refusals."""
        try:
            changed = await self.ctx.workloads.refresh()
        except Exception as exc:
            log.warning("event=workload-list-failed error=%r", exc)
        else:
            self.queue.mark(changed)
        try:
            before = set(self.registrar.registered)
            await within(self.registrar.refresh(), self.cfg.consul.request_timeout * 2)
            self.queue.mark(before ^ set(self.registrar.registered))
            for atsign in self.registrar.registered:  # adopted after a restart, say
                self.ctx.prober.track(atsign)
        except (TimeoutError, RegistrationError) as exc:
            if self.metrics is not None:
                self.metrics.consul_errors.labels("refresh").inc()
            log.warning("event=registration-refresh-failed error=%s", exc)
        self.mark(None)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: keep a session, run cycles. Then shut down cleanly.

        After a lost session, no new session is opened until a cycle without one has
        fenced everything: a new session's heartbeat would keep the fence from stopping
        what the lost one left running.
        """
        if not self.keeper.started:
            self.keeper.start()
        ctx = self.ctx
        with contextlib.suppress(Exception):  # a failing mount is reported by its checks
            await ctx.storage.ensure_mounted()
        await ctx.storage.check()
        side = [
            asyncio.create_task(ctx.claims.run(), name="claims watch"),
            asyncio.create_task(ctx.workloads.run(), name="runner events"),
            asyncio.create_task(ctx.prober.run(), name="prober"),
            asyncio.create_task(ctx.handoffs.run(), name="handoffs"),
            asyncio.create_task(self._recheck_refusals(), name="refusals"),
            asyncio.create_task(ctx.storage.run(), name="storage"),
            asyncio.create_task(self._watch_storage_peers(), name="storage peers"),
        ]
        if self.inventory_feed is not None and self.members is not None:
            side.append(asyncio.create_task(self.inventory_feed.run(), name="atSign records"))
            side.append(asyncio.create_task(self.members.run(), name="members"))
        unfenced = False
        resync_at = 0.0
        try:
            while not stop.is_set():
                s = self.session
                if s is not None and (s.lost.is_set() or s.state is SessionState.LOST):
                    unfenced = not await self._fence_lost_session()
                if self.session is None and (unfenced or not await self.open_session()):
                    # No session: hold nothing (fence whatever still runs).
                    with contextlib.suppress(Exception):
                        self.mark(await ctx.workloads.refresh())
                    done = await self.reconciler.cycle_logged(None)
                    unfenced = unfenced and (done is None or self.state.last_failures > 0)
                    await self._pause(stop, self.timing.renew_interval)
                    continue
                if self.clock() >= resync_at:
                    resync_at = self.clock() + self.cfg.timing.resync_interval
                    await self._resync()
                dirty = self.queue.take()
                if dirty is None or dirty:
                    self.reconciler.spawn(dirty)
                await self._wait(stop, max(0.0, resync_at - self.clock()))
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            await self.reconciler.cancel_all()
            await self.shutdown()

    async def _recheck_refusals(self) -> None:
        """Refusals whose data dir's marker changed are looked at again (cheap stats)."""
        while True:
            await asyncio.sleep(max(1.0, self.timing.renew_interval))
            if self.state.refused:
                changed = await asyncio.to_thread(self.guard.changed)
                if changed:
                    self.mark(changed)

    async def shutdown(self) -> None:
        """Deregister and stop everything, release the claims, tell the fence we are done.

        Never stops half-way: a runner or agent that fails here is logged, the session is
        still closed and the fence still told (it then stops whatever runs by itself).
        """
        try:
            workloads = await self.runner.list()
        except Exception as exc:
            log.error("event=shutdown-list-failed error=%r (the fence stops what runs)", exc)
            workloads = []
        atsigns = sorted({w.atsign for w in workloads} | set(self.registrar.registered))
        await self.registrar.deregister_all(atsigns, self.cfg.consul.request_timeout)
        await asyncio.gather(
            *(self.runner.stop(w.atsign, timeout=self.cfg.runner.stop_timeout) for w in workloads),
            return_exceptions=True,
        )
        if self.ctx.prober.pool is not None:
            self.ctx.prober.pool.close()
        if self.ctx.takeover_fence is not None:
            with contextlib.suppress(Exception):
                await self.ctx.takeover_fence.close()
        with contextlib.suppress(Exception):
            await self.ctx.storage.stop()  # a managed mount: nothing runs on it any more
        await self.keeper.close_session(revoke=True)
        self.keeper.write_heartbeat(state="stopped")
        with contextlib.suppress(Exception):
            await self.keeper.stop()
        with contextlib.suppress(Exception):
            await self.registrar.close()
        log.info("event=shutdown stopped=%d", len(workloads))
