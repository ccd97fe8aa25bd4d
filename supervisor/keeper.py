"""The session keeper: the node's DCS session on a thread and event loop of its own.

What keeps a node's claims alive must never wait behind other work: the renew loop, the
fence's heartbeat file and the node's Consul node check (which every atServer on the
node's agent counts) all run on the keeper's loop, in a thread that asks for a better
scheduling priority (nice -10, as root). The reconcile work (probes, starts, the claims
watch) runs on the main loop and reaches the session through :class:`SessionProxy`, whose
calls are carried over to the keeper's loop. ``threaded=False`` keeps everything on the
caller's loop (unit tests with in-memory fakes).

After every renewal the heartbeat file gets the session's renew deadline; when the session
is lost, it gets the moment of the loss, so the fence may stop everything at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from leases.base import (
    Backend,
    Claim,
    ClaimInfo,
    Clock,
    GenerationStamp,
    LeaseError,
    Session,
    SessionState,
    Timing,
)
from supervisor.deadline import within
from supervisor.fence import Heartbeat, write_heartbeat
from supervisor.metrics import SupervisorMetrics
from supervisor.registration import NodeHealth
from supervisor.resume import SessionRecord, forget_record, load_record, save_record

log = logging.getLogger("supervisor")

T = TypeVar("T")

KEEPER_NICE = -10
"""Scheduling priority the keeper thread asks for (works as root or with CAP_SYS_NICE)."""


class SessionProxy(Session):
    """The keeper's session as the main loop sees it: reads are direct, calls are carried
    over to the keeper's loop, and ``lost`` is an event of the main loop."""

    def __init__(self, keeper: SessionKeeper, inner: Session) -> None:
        self._keeper = keeper
        self.inner = inner
        self.node = inner.node
        self.timing = inner.timing
        self._lost = asyncio.Event()

    @property
    def session_id(self) -> str:
        return self.inner.session_id

    @property
    def state(self) -> SessionState:
        return SessionState.LOST if self._lost.is_set() else self.inner.state

    @property
    def renew_deadline(self) -> float:
        return self.inner.renew_deadline

    @property
    def lost(self) -> asyncio.Event:
        return self._lost

    @property
    def lost_reason(self) -> str | None:
        return getattr(self.inner, "lost_reason", None)

    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        return await self._keeper.call(self.inner.claim(atsign, info, generation=generation))

    async def release(self, claim: Claim) -> bool:
        return await self._keeper.call(self.inner.release(claim))

    async def publish_node(self, record: Mapping[str, Any]) -> None:
        await self._keeper.call(self.inner.publish_node(record))

    async def close(self, *, revoke: bool = True) -> None:
        await self._keeper.close_session(revoke=revoke)


class SessionKeeper:
    """Opens, renews and closes the node's session; writes the fence's heartbeat."""

    def __init__(
        self,
        *,
        node: str,
        timing: Timing,
        make_backend: Callable[[], Backend],
        record: tuple[str, str],
        state_dir: Path,
        heartbeat_path: Path,
        pid: int,
        node_health: NodeHealth | None = None,
        metrics: SupervisorMetrics | None = None,
        clock: Clock = time.monotonic,
        threaded: bool = True,
        confirmed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.node = node
        self.timing = timing
        self.make_backend = make_backend
        self.backend_kind, self.prefix = record
        self.record_path = state_dir / "session.json"  # SupervisorConfig.session_record_path
        self.heartbeat_path = heartbeat_path
        self.pid = pid
        self.node_health = node_health
        self.metrics = metrics
        if metrics is not None:
            metrics.renew_deadline.set(timing.renew_deadline)
        self.clock = clock
        self.threaded = threaded
        self.confirmed = confirmed
        """Whether the node check may pass: the main loop has reconciled its registrations
        with this session (read on the keeper's thread; a bool the main loop sets)."""
        self.session: Session | None = None
        self.proxy: SessionProxy | None = None
        self._backend: Backend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._hb_lock = threading.Lock()
        self._last_deadline: float | None = None

    # --- the thread and the loop -----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        """Start the keeper's loop (a thread), or adopt the caller's (``threaded=False``)."""
        self._main = asyncio.get_running_loop()
        if not self.threaded:
            self._loop = self._main
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), KEEPER_NICE)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"session-keeper-{self.node}")
        self._thread.daemon = True
        self._thread.start()
        ready.wait(5.0)
        self._loop = loop

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the keeper's loop; cancelling the caller cancels it there."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise LeaseError("the session keeper is not running")
        if loop is asyncio.get_running_loop():
            return await coro
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return await asyncio.wrap_future(future)

    async def stop(self) -> None:
        """Close the session (revoking it), the node's health service and the loop."""
        await self.close_session(revoke=True)
        await self.call(self._close_parts())
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10.0)
        self._loop = None

    async def _close_parts(self) -> None:
        if self.node_health is not None:
            await self.node_health.close(deregister=True)
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.close()
            self._backend = None

    # --- the session -----------------------------------------------------------------------

    async def open(self) -> SessionProxy | None:
        """Resume the recorded session or open a new one; ``None`` (logged) if that failed."""
        try:
            session, resumed = await self.call(self._open())
        except (TimeoutError, LeaseError) as exc:
            if self.metrics is not None:
                self.metrics.dcs_errors.labels("open_session").inc()
            log.warning("event=session-open-failed error=%r", exc)
            return None
        self.proxy = SessionProxy(self, session)
        self.write_heartbeat()
        log.info("event=session-%s id=%s", "resumed" if resumed else "opened", session.session_id)
        return self.proxy

    async def _open(self) -> tuple[Session, bool]:
        if self._backend is None:
            self._backend = self.make_backend()
        t = self.timing.request_timeout
        session = await within(self._resume(self._backend), t * 2)
        resumed = session is not None
        if session is None:
            # A new session: whatever the agent still lists for this node (restored after a
            # crash, with the checks it had) belongs to a dead session until a cycle has
            # reconciled it, so the node check is critical first.
            await self._node_check(False, "opening a new DCS session")
            session = await within(self._backend.open_session(self.node, self.timing), t * 3)
        save_record(
            self.record_path,
            SessionRecord(self.backend_kind, self.prefix, self.node, session.session_id),
        )
        self.session = session
        self._watcher = asyncio.create_task(self._watch(session), name="session watcher")
        return session, resumed

    async def _resume(self, backend: Backend) -> Session | None:
        rec = load_record(self.record_path)
        if rec is None:
            return None
        if (rec.backend, rec.prefix, rec.node) != (self.backend_kind, self.prefix, self.node):
            forget_record(self.record_path)
            return None
        session = await backend.resume_session(self.node, self.timing, rec.session_id)
        if session is None:
            log.info("event=session-not-resumed id=%s reason='gone on the DCS'", rec.session_id)
            forget_record(self.record_path)
        return session

    async def close_session(self, revoke: bool = True) -> None:
        """End the session (on the keeper's loop); the heartbeat keeps its last deadline."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.lost.set()
        if self._loop is not None and self.session is not None:
            await self.call(self._close(revoke))
        forget_record(self.record_path)

    async def _close(self, revoke: bool) -> None:
        s, self.session = self.session, None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if s is not None:
            try:
                await within(s.close(revoke=revoke), self.timing.request_timeout * 2 + 2)
            except Exception as exc:
                log.info("event=session-close-failed error=%r", exc)

    async def _watch(self, session: Session) -> None:
        """Heartbeat after every renewal; the node's health check; the loss, at once."""
        interval = min(0.05, self.timing.renew_interval / 4)
        last_pass = float("-inf")
        while True:
            if session.lost.is_set() or session.state is SessionState.LOST:
                self.write_heartbeat()
                self._tell_main_lost()
                await self._node_check(False, f"session {session.session_id} lost")
                return
            if session.renew_deadline != self._last_deadline:
                self.write_heartbeat()
                due = self.clock() - last_pass >= self.timing.renew_interval / 2
                # Passed at a renewal only, so the check's TTL ends with the renew deadline.
                if (
                    due
                    and self.confirmed()
                    and await self._node_check(True, f"session {session.session_id} renewed")
                ):
                    last_pass = self.clock()
            await asyncio.sleep(interval)

    async def _node_check(self, passing: bool, note: str) -> bool:
        if self.node_health is None:
            return True
        try:
            if passing:
                await within(self.node_health.passing(note), self.timing.request_timeout)
            else:
                await within(self.node_health.failing(note), self.timing.request_timeout)
        except Exception as exc:  # TimeoutError, RegistrationError, Consul's own
            if self.metrics is not None:
                self.metrics.consul_errors.labels("node_check").inc()
            log.warning("event=node-check-failed passing=%s error=%r", passing, exc)
            return False
        return True

    def renew_now(self, why: str) -> None:
        """Renew the session at once (thread-safe), because ``why`` suggests it may be gone:
        a revoked lease is then known within one round trip, not at the next renewal."""
        s, loop = self.session, self._loop
        renew = getattr(s, "renew_now", None)
        if renew is None or loop is None or s is None or s.state is SessionState.LOST:
            return
        if getattr(s, "renew_pending", False):
            return  # one recheck at a time (a closing or lost session deletes many claims)
        if self.metrics is not None:
            self.metrics.session_rechecks.inc()
        log.info("event=session-recheck session=%s why=%r", s.session_id if s else None, why)
        with contextlib.suppress(RuntimeError):  # the keeper's loop is closing
            loop.call_soon_threadsafe(renew)

    def _tell_main_lost(self) -> None:
        proxy = self.proxy
        if proxy is None or self._main is None:
            return
        if self._main is self._loop:
            proxy.lost.set()
        else:
            with contextlib.suppress(RuntimeError):  # the main loop is closing
                self._main.call_soon_threadsafe(proxy.lost.set)

    # --- the fence's heartbeat ----------------------------------------------------------

    def write_heartbeat(self, state: str = "running") -> None:
        """Write the session's renew deadline for the fence (thread-safe; the file always
        gets the current deadline, never an older one)."""
        with self._hb_lock:
            s = self.session
            if s is not None:
                # A lost session's deadline is the moment it was lost: the fence may act now.
                deadline = s.renew_deadline
            else:
                deadline = self._last_deadline if self._last_deadline is not None else 0.0
            write_heartbeat(
                self.heartbeat_path,
                Heartbeat(pid=self.pid, deadline=deadline, written=self.clock(), state=state),
            )
            if self.metrics is not None and self._last_deadline is not None:
                gap = deadline - self._last_deadline
                if gap > 0:
                    self.metrics.renewal_latency.observe(gap)
            self._last_deadline = deadline
