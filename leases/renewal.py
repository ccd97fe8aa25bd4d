"""The renew loop and deadline bookkeeping shared by every backend's node session.

:class:`RenewalTracker` is pure state driven by an injected clock: when the last
successful renewal was *sent*, whether the latest attempt failed, and whether
the session is lost. :class:`RenewingSession` runs the loop around a backend's
``_renew_once`` / ``_revoke`` and implements the :class:`Session` properties.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from leases.base import (
    Clock,
    DCSUnavailable,
    LeaseError,
    Session,
    SessionLost,
    SessionState,
    Timing,
)

log = logging.getLogger("leases.renewal")

Sleep = Callable[[float], Awaitable[None]]


RENEW_NOW_MIN_GAP = 0.05
"""Seconds between a renewal and one asked for by :meth:`RenewingSession.renew_now`."""


class RenewalTracker:
    """Deadline and state of one session, evaluated against ``clock``.

    ``granted_sent_at`` is when the request that created the session was sent:
    the DCS keeps the session for at least ``ttl`` after it received that
    request, so counting from the send time is conservative.
    """

    def __init__(self, timing: Timing, clock: Clock, granted_sent_at: float) -> None:
        self.timing = timing
        self.clock = clock
        self.last_ok_sent = granted_sent_at
        self.last_attempt_failed = False
        self.last_error = ""
        self.lost_reason: str | None = None
        self.lost_at: float | None = None

    @property
    def deadline(self) -> float:
        """Monotonic time by which the owner must have stopped acting."""
        natural = self.last_ok_sent + self.timing.renew_deadline
        if self.lost_at is not None:
            return min(natural, self.lost_at)
        return natural

    def state(self) -> SessionState:
        if self.lost_reason is not None:
            return SessionState.LOST
        now = self.clock()
        if now >= self.deadline:
            return SessionState.LOST
        if self.last_attempt_failed:
            return SessionState.SUSPENDED
        if now - self.last_ok_sent > self.timing.renew_interval + self.timing.request_timeout:
            return SessionState.SUSPENDED
        return SessionState.ALIVE

    def succeeded(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` was confirmed by the DCS."""
        if self.lost_reason is not None:
            return  # once lost, always lost: a late answer must not revive it
        if sent_at >= self.deadline:
            # Sent after the deadline: the owner has already stopped acting.
            self.mark_lost("renewal confirmed only after renew_deadline had passed")
            return
        self.last_ok_sent = max(self.last_ok_sent, sent_at)
        self.last_attempt_failed = False
        self.last_error = ""

    def failed(self, error: str) -> None:
        self.last_attempt_failed = True
        self.last_error = error

    def mark_lost(self, reason: str) -> bool:
        """Record the loss; True the first time only."""
        if self.lost_reason is not None:
            return False
        self.lost_reason = reason
        self.lost_at = self.clock()
        return True

    def check_deadline(self) -> bool:
        """Mark lost if the deadline has passed; True if the session is lost."""
        if self.lost_reason is None and self.clock() >= self.deadline:
            detail = f" (last error: {self.last_error})" if self.last_error else ""
            self.mark_lost(
                f"no renewal succeeded for renew_deadline={self.timing.renew_deadline:g}s{detail}"
            )
        return self.lost_reason is not None

    def retry_delay(self) -> float:
        """Pause before retrying a failed renewal: a few retries fit in one interval."""
        return min(self.timing.renew_interval, max(0.05, self.timing.renew_interval / 4))

    def next_attempt_at(self, now: float) -> float:
        if self.last_attempt_failed:
            return now + self.retry_delay()
        return self.last_ok_sent + self.timing.renew_interval


class RenewingSession(Session):
    """A :class:`Session` kept alive by a renew loop; backends add the DCS calls.

    Subclasses implement ``_renew_once`` (True: renewed; False: the DCS says the
    session is gone; raise :class:`DCSUnavailable` when it cannot be reached)
    and ``_revoke`` (end the session on the DCS).
    """

    def __init__(
        self,
        node: str,
        timing: Timing,
        *,
        clock: Clock,
        granted_sent_at: float,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.node = node
        self.timing = timing
        self.clock = clock
        self.tracker = RenewalTracker(timing, clock, granted_sent_at)
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cleanup: asyncio.Task[None] | None = None
        self._loss_callbacks: list[Callable[[str], None]] = []
        self._closed = False
        self.renewals = 0
        """Successful renewals so far (for metrics and benchmarks)."""

    # --- Session properties -------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self.tracker.state()

    @property
    def renew_deadline(self) -> float:
        return self.tracker.deadline

    @property
    def lost(self) -> asyncio.Event:
        return self._lost

    @property
    def lost_reason(self) -> str | None:
        """Why the session was lost, or None while it is not."""
        return self.tracker.lost_reason

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once when the session is lost (at once if it already is)."""
        if self.tracker.lost_reason is not None:
            callback(self.tracker.lost_reason)
        else:
            self._loss_callbacks.append(callback)

    def ensure_usable(self) -> None:
        """Raise :class:`SessionLost` if the session is lost (by the DCS or the deadline)."""
        if self.tracker.check_deadline():
            self._declare_lost(self.tracker.lost_reason or "lost")
            raise SessionLost(f"session {self.session_id} of {self.node}: {self.lost_reason}")

    # --- backend hooks ------------------------------------------------------------------

    @abc.abstractmethod
    async def _renew_once(self, timeout: float) -> bool:
        """One renewal within ``timeout`` seconds; see the class docstring."""

    @abc.abstractmethod
    async def _revoke(self, timeout: float) -> None:
        """End the session on the DCS within ``timeout`` seconds (absent counts as done)."""

    # --- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the renew loop (the backend calls this right after creating the session)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"renew {self.session_id}")

    async def _run(self) -> None:
        t = self.tracker
        while not t.check_deadline():
            now = self.clock()
            wake = min(t.next_attempt_at(now), t.deadline)
            if wake > now:
                await self._nap(wake - now)
            if t.check_deadline():
                break
            sent = self.clock()
            budget = min(self.timing.request_timeout, t.deadline - sent)
            try:
                async with asyncio.timeout(budget):
                    alive = await self._renew_once(budget)
            except TimeoutError:
                t.failed(f"renewal got no answer within {budget:.3g}s")
                log.warning(
                    "event=renew_timeout node=%s session=%s timeout=%.3g",
                    self.node,
                    self.session_id,
                    budget,
                )
                continue
            except DCSUnavailable as exc:
                t.failed(str(exc))
                log.warning(
                    "event=renew_failed node=%s session=%s error=%r",
                    self.node,
                    self.session_id,
                    exc,
                )
                continue
            except SessionLost as exc:
                t.mark_lost(str(exc))
                break
            if not alive:
                t.mark_lost("the DCS reports the session expired or revoked")
                break
            t.succeeded(sent)
            self.renewals += 1
        self._declare_lost(t.lost_reason or "lost")

    def renew_now(self) -> None:
        """Renew at once instead of at the next scheduled time: the caller saw a sign that
        the session may be gone (its own claim deleted while the keepalives succeed, which
        an old etcd leader's lessor does after it stepped down: etcd#12528, #15247). A
        revoked lease then answers TTL 0, so the loss is known within one round trip."""
        self._wake.set()

    @property
    def renew_pending(self) -> bool:
        """A :meth:`renew_now` has not been acted on yet."""
        return self._wake.is_set()

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds`` or until :meth:`renew_now`; never closer than 50 ms to the last
        renewal sent (a burst of wake-ups, e.g. a drain's releases, renews a few times)."""
        if not self._wake.is_set():
            sleeper = asyncio.ensure_future(self._sleep(seconds))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, waker):
                    task.cancel()
        if self._wake.is_set():
            self._wake.clear()
            gap = self.tracker.last_ok_sent + RENEW_NOW_MIN_GAP - self.clock()
            if gap > 0:
                await self._sleep(gap)

    def _declare_lost(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        log.log(
            logging.INFO if self._closed else logging.ERROR,
            "event=session_lost node=%s session=%s reason=%r",
            self.node,
            self.session_id,
            reason,
        )
        for callback in self._loss_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("event=loss_callback_failed node=%s", self.node)
        self._loss_callbacks.clear()
        # The DCS may still hold the session (we merely stopped hearing from it): end it
        # there too, so its claims go as soon as the DCS is reachable, not after the TTL.
        if self._cleanup is None and self._task is not None and not self._closed:
            self._cleanup = asyncio.create_task(
                self._revoke_after_loss(), name=f"revoke {self.session_id}"
            )

    @property
    def revoke_timeout(self) -> float:
        """Deadline of a revocation: longer than other calls, because revoking a session
        deletes all its keys in one step (10,000 claims took over 0.2 s on etcd), and
        nothing waits on it for safety (the owner has stopped acting already)."""
        return max(self.timing.request_timeout, min(2.0, self.timing.ttl / 2))

    async def _revoke_after_loss(self) -> None:
        # Bounded: a few tries spread over one TTL; after that the DCS has expired it anyway.
        for _ in range(max(1, int(self.timing.ttl / self.timing.renew_interval))):
            try:
                async with asyncio.timeout(self.revoke_timeout):
                    await self._revoke(self.revoke_timeout)
                return
            except (TimeoutError, LeaseError) as exc:
                log.info("event=revoke_after_loss_failed session=%s error=%r", self.session_id, exc)
            await self._sleep(self.timing.renew_interval)

    async def close(self, *, revoke: bool = True) -> None:
        """Stop renewing; with ``revoke`` end the session on the DCS so its claims go now.

        Afterwards the session is LOST (``lost`` is set). Revocation is bounded by
        :attr:`revoke_timeout`; if it fails the claims expire with the TTL.
        """
        self._closed = True
        self.tracker.mark_lost("closed by its owner")
        for task in (self._task, self._cleanup):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if revoke:
            try:
                async with asyncio.timeout(self.revoke_timeout):
                    await self._revoke(self.revoke_timeout)
            except (TimeoutError, LeaseError) as exc:
                log.warning(
                    "event=revoke_failed session=%s error=%r (claims expire with the ttl)",
                    self.session_id,
                    exc,
                )
        self._declare_lost("closed by its owner")
