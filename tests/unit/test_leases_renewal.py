"""The renew loop's deadline bookkeeping, driven by a fake clock and a scripted DCS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from leases import DCSUnavailable, SessionState, Timing
from leases.base import Claim, ClaimInfo, GenerationStamp
from leases.renewal import RenewalTracker, RenewingSession

TIMING = Timing(ttl=6, renew_interval=1, renew_deadline=3, stop_budget=1, request_timeout=0.5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tracker_states_follow_the_clock() -> None:
    clock = FakeClock()
    t = RenewalTracker(TIMING, clock, granted_sent_at=clock.now)
    assert t.state() is SessionState.ALIVE and t.deadline == 103.0
    clock.now = 101.4  # renewal due at 101, its timeout not yet over
    assert t.state() is SessionState.ALIVE
    clock.now = 101.6  # overdue by more than the request timeout
    assert t.state() is SessionState.SUSPENDED
    t.succeeded(sent_at=101.0)
    assert t.state() is SessionState.ALIVE and t.deadline == 104.0
    t.failed("boom")
    assert t.state() is SessionState.SUSPENDED
    clock.now = 104.0
    assert t.state() is SessionState.LOST
    assert t.check_deadline() and "renew_deadline=3s" in (t.lost_reason or "")
    assert "boom" in (t.lost_reason or "")


def test_a_late_confirmation_never_revives_or_extends() -> None:
    clock = FakeClock()
    t = RenewalTracker(TIMING, clock, granted_sent_at=100.0)
    clock.now = 103.5
    t.succeeded(sent_at=103.2)  # sent after the deadline: the owner has stopped already
    assert t.state() is SessionState.LOST
    t.succeeded(sent_at=103.4)
    assert t.state() is SessionState.LOST and t.deadline <= 103.5


def test_deadline_counts_from_the_send_time_not_the_answer() -> None:
    clock = FakeClock()
    t = RenewalTracker(TIMING, clock, granted_sent_at=100.0)
    clock.now = 101.45
    t.succeeded(sent_at=101.0)  # answer took 0.45 s
    assert t.deadline == 104.0


class ScriptedSession(RenewingSession):
    """Renewals answer from a script: True (renewed), False (gone), or an exception."""

    def __init__(self, script: list[bool | Exception], clock: Callable[[], float]) -> None:
        self.script = script
        self.revoked = 0
        super().__init__("n", TIMING, clock=clock, granted_sent_at=clock())

    @property
    def session_id(self) -> str:
        return "s1"

    async def _renew_once(self, timeout: float) -> bool:
        answer = self.script.pop(0) if self.script else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _revoke(self, timeout: float) -> None:
        self.revoked += 1

    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        self.ensure_usable()
        return None

    async def release(self, claim: Claim) -> bool:
        return False

    async def publish_node(self, record: Mapping[str, Any]) -> None:
        self.ensure_usable()


def _self_advancing(session: ScriptedSession, clock: FakeClock) -> list[tuple[float, SessionState]]:
    """Make the loop's sleeps advance the fake clock in 10 ms steps; record the states seen."""
    seen: list[tuple[float, SessionState]] = []

    async def sleep(seconds: float) -> None:
        end = clock.now + seconds
        while clock.now < end:
            clock.now = min(end, clock.now + 0.01)
            seen.append((clock.now, session.state))
        await asyncio.sleep(0)

    session._sleep = sleep
    return seen


async def test_dcs_says_gone_means_lost_at_once_and_callbacks_run() -> None:
    clock = FakeClock()
    session = ScriptedSession([True, False], clock)
    _self_advancing(session, clock)
    reasons: list[str] = []
    session.on_lost(reasons.append)
    session.start()
    await asyncio.wait_for(session.lost.wait(), 5)
    assert session.state is SessionState.LOST
    assert reasons and "expired or revoked" in reasons[0]
    assert clock.now == pytest.approx(100 + 2 * TIMING.renew_interval, abs=0.02)
    for _ in range(5):
        await asyncio.sleep(0)
    assert session.revoked == 1  # ended on the DCS too, in case it still existed
    await session.close(revoke=False)


async def test_failing_renewals_suspend_then_lose_exactly_at_the_deadline() -> None:
    clock = FakeClock()
    session = ScriptedSession([DCSUnavailable("down")] * 1000, clock)
    seen = _self_advancing(session, clock)
    session.start()
    await asyncio.wait_for(session.lost.wait(), 5)
    first_suspended = next(t for t, s in seen if s is SessionState.SUSPENDED)
    assert 101.0 <= first_suspended < 100 + TIMING.renew_deadline
    assert all(s is not SessionState.LOST for t, s in seen if t < 100 + TIMING.renew_deadline)
    assert clock.now == pytest.approx(100 + TIMING.renew_deadline, abs=0.011)
    assert len(session.script) < 1000 - 3, "several retries before the deadline"
    with pytest.raises(Exception, match="renew_deadline"):
        await session.claim("@alice", ClaimInfo(node="n"))
    await session.close(revoke=False)


async def test_renew_now_renews_before_the_scheduled_time() -> None:
    """A scheduled renewal is a second away (the fake sleep never ends by itself);
    ``renew_now`` makes the loop renew at once, and the DCS saying 'gone' loses it."""
    clock = FakeClock()
    session = ScriptedSession([False], clock)
    calls: list[float] = []

    async def sleep_forever(seconds: float) -> None:
        calls.append(seconds)
        await asyncio.Event().wait()

    session._sleep = sleep_forever
    session.start()
    await asyncio.sleep(0.05)
    assert not session.lost.is_set() and calls, "the loop should be waiting for its schedule"
    clock.now += 0.1  # past the 50 ms minimum gap after the grant
    session.renew_now()
    assert session.renew_pending
    await asyncio.wait_for(session.lost.wait(), 2)
    assert "expired or revoked" in (session.lost_reason or "")
    assert not session.renew_pending
    await session.close(revoke=False)
