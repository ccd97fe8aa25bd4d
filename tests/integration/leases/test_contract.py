"""The claim contract, run unchanged against real etcd and real Consul."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from leases import (
    Claim,
    ClaimEventKind,
    ClaimInfo,
    DCSUnavailable,
    Session,
    SessionLost,
    SessionState,
    Timing,
    TimingError,
    open_backend,
)
from leases.base import Backend
from testbed.ports import free_port
from testbed.process import ManagedProcess

from .conftest import DCS, EventLog

Spawn = Callable[[DCS, str], tuple[ManagedProcess, dict[str, object]]]


async def _claim_until(session: Session, atsign: str, info: ClaimInfo, timeout: float) -> Claim:
    """Retry a claim that loses (None) or cannot reach the DCS, until ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            claim = await session.claim(atsign, info)
        except DCSUnavailable as exc:
            last = exc
            claim = None
        if claim is not None:
            return claim
        await asyncio.sleep(0.02)
    raise AssertionError(f"could not claim {atsign} within {timeout}s (last error {last!r})")


async def _open_session_retrying(dcs: DCS, node: str, timeout: float = 15.0) -> Session:
    backend = dcs.make()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await backend.open_session(node, dcs.timing)
        except DCSUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class StateRecorder:
    """Samples a session's state every 10 ms: (monotonic time, state) pairs."""

    def __init__(self, session: Session) -> None:
        self.samples: list[tuple[float, SessionState]] = []
        self._task = asyncio.create_task(self._run(session))

    async def _run(self, session: Session) -> None:
        while True:
            self.samples.append((time.monotonic(), session.state))
            await asyncio.sleep(0.01)

    def first(self, state: SessionState) -> float | None:
        return next((t for t, s in self.samples if s is state), None)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_concurrent_claims_have_exactly_one_winner(dcs: DCS) -> None:
    contenders = []
    for i in range(3):
        backend = dcs.make()
        contenders.append(await backend.open_session(f"node{i}", dcs.timing))
    rounds = 30 if dcs.kind == "etcd" else 15
    wins = [0, 0, 0]
    for r in range(rounds):
        atsign = f"@race{r}"
        results = await asyncio.gather(
            *(s.claim(atsign, ClaimInfo(node=s.node)) for s in contenders)
        )
        winners = [(i, c) for i, c in enumerate(results) if c is not None]
        assert len(winners) == 1, f"round {r}: {results}"
        i, claim = winners[0]
        wins[i] += 1
        current = await dcs.backends[0].owner(atsign)
        assert current == claim
        assert current.info.node == f"node{i}"
        # The winner claiming again gets its own claim back; the losers still lose.
        assert await contenders[i].claim(atsign, ClaimInfo(node=f"node{i}")) == claim
        for j, s in enumerate(contenders):
            if j != i:
                assert await s.claim(atsign, ClaimInfo(node=s.node)) is None
    assert sum(wins) == rounds
    for s in contenders:
        await s.close()


async def test_release_hands_over_at_once_with_rising_tokens(dcs: DCS) -> None:
    a = await dcs.make().open_session("a", dcs.timing)
    b = await dcs.make().open_session("b", dcs.timing)
    holder, standby = a, b
    claim = await holder.claim("@handoff", ClaimInfo(node=holder.node))
    assert claim is not None
    tokens = [claim.token]
    durations = []
    for i in range(100):
        started = time.monotonic()
        assert await holder.release(claim), f"handoff {i}: release refused"
        # No retry: the very first claim after a release must win (no lock-delay).
        next_claim = await standby.claim("@handoff", ClaimInfo(node=standby.node))
        durations.append(time.monotonic() - started)
        assert next_claim is not None, f"handoff {i}: standby could not claim after release"
        assert next_claim.token > tokens[-1], f"handoff {i}: token did not rise"
        tokens.append(next_claim.token)
        claim = next_claim
        holder, standby = standby, holder
    durations.sort()
    # "Well under a second": generous for a shared machine, still far from any TTL.
    assert durations[len(durations) // 2] < 0.5, f"median handoff {durations[50]:.3f}s"
    assert (await dcs.backends[0].owner("@handoff")) == claim
    await a.close()
    await b.close()


async def test_stale_release_never_deletes_a_newer_owner(dcs: DCS) -> None:
    a = await dcs.make().open_session("a", dcs.timing)
    b = await dcs.make().open_session("b", dcs.timing)
    old = await a.claim("@stale", ClaimInfo(node="a"))
    assert old is not None
    assert await a.release(old)
    assert not await a.release(old), "a second release of the same claim must be refused"
    newer = await b.claim("@stale", ClaimInfo(node="b"))
    assert newer is not None and newer.token > old.token
    # The old owner retries its release (e.g. after a timeout): the newer claim survives.
    assert not await a.release(old)
    # Same atSign, a token that is not the current one, even with the owner's session id.
    forged = Claim("@stale", old.token, newer.session_id, newer.info)
    assert not await b.release(forged)
    assert (await dcs.backends[0].owner("@stale")) == newer
    # After the old owner's session ended, its stale claim still deletes nothing.
    await a.close()
    assert not await a.release(old)
    assert (await dcs.backends[0].owner("@stale")) == newer
    await b.close()


@pytest.mark.slow
async def test_killed_holder_claim_expires_and_standby_takes_over(
    dcs: DCS, spawn_holder: Spawn, watch_log: Callable[[Backend], EventLog]
) -> None:
    watcher = dcs.make()
    log = watch_log(watcher)
    await log.first_resync()
    standby = await dcs.make().open_session("standby", dcs.timing)
    proc, held = spawn_holder(dcs, "@victim")
    current = await watcher.owner("@victim")
    assert current is not None and current.token == held["token"]
    assert await standby.claim("@victim", ClaimInfo(node="standby")) is None

    mark = len(log.events)
    killed_at = time.monotonic()
    proc.kill()
    gone_at, _ = await log.wait_for(
        lambda e: e.kind is ClaimEventKind.DELETE and e.atsign == "@victim",
        timeout=dcs.kill_bound + 5,
        start=mark,
    )
    assert gone_at - killed_at <= dcs.kill_bound, f"claim lived {gone_at - killed_at:.2f}s"
    claim = await _claim_until(standby, "@victim", ClaimInfo(node="standby"), dcs.takeover_wait)
    assert isinstance(held["token"], int) and claim.token > held["token"]
    assert standby.state is SessionState.ALIVE
    print(
        f"{dcs.kind}: SIGKILL -> claim gone {gone_at - killed_at:.2f}s, "
        f"-> standby holds {time.monotonic() - killed_at:.2f}s"
    )
    await standby.close()


async def test_frozen_dcs_suspends_then_loses_the_session_without_hanging(dcs: DCS) -> None:
    holder = await dcs.make().open_session("holder", dcs.timing)
    old = await holder.claim("@frozen", ClaimInfo(node="holder"))
    assert old is not None
    recorder = StateRecorder(holder)
    await asyncio.sleep(0.05)
    dcs.freeze()
    try:
        # A call to a frozen server ends within its deadline: DCSUnavailable, or
        # SessionLost if the renew deadline passed first.
        started = time.monotonic()
        with pytest.raises((DCSUnavailable, SessionLost)):
            await holder.claim("@other", ClaimInfo(node="holder"))
        assert time.monotonic() - started < dcs.timing.request_timeout + 1.5
        # No renewal can succeed any more, so the deadline is fixed now.
        deadline = holder.renew_deadline
        await asyncio.wait_for(holder.lost.wait(), max(0.0, deadline - time.monotonic()) + 2.0)
        await asyncio.sleep(0.05)
        await recorder.stop()
        suspended = recorder.first(SessionState.SUSPENDED)
        lost = recorder.first(SessionState.LOST)
        assert suspended is not None, f"never SUSPENDED: {recorder.samples[:3]}..."
        assert lost is not None and suspended < lost
        late = [(t - deadline, s) for t, s in recorder.samples if t >= deadline]
        assert all(s is SessionState.LOST for _, s in late), f"not LOST after deadline: {late[:3]}"
        assert holder.renew_deadline == deadline
    finally:
        dcs.thaw()

    # After the thaw: the lost holder holds nothing and cannot claim; a standby takes over.
    with pytest.raises(SessionLost):
        await holder.claim("@frozen", ClaimInfo(node="holder"))
    assert holder.state is SessionState.LOST
    standby = await _open_session_retrying(dcs, "standby")
    bound = dcs.timing.ttl * (2 if dcs.kind == "consul" else 1) + dcs.takeover_wait + 2
    claim = await _claim_until(standby, "@frozen", ClaimInfo(node="standby"), bound)
    assert claim.token > old.token
    assert not await holder.release(old)
    owners = await dcs.backends[-1].owners()
    assert set(owners) == {"@frozen"} and owners["@frozen"].session_id == standby.session_id
    await standby.close()
    await holder.close()


async def test_watch_starts_with_resync_and_reports_puts_and_deletes(
    dcs: DCS, watch_log: Callable[[Backend], EventLog]
) -> None:
    session = await dcs.make().open_session("n", dcs.timing)
    pre = await session.claim("@before", ClaimInfo(node="n", address="10.0.0.1", port=6464))
    assert pre is not None
    log = watch_log(dcs.make())
    resync = await log.first_resync()
    assert resync.snapshot == {"@before": pre}
    after = await session.claim("@after", ClaimInfo(node="n"))
    assert after is not None
    _, put = await log.wait_for(lambda e: e.kind is ClaimEventKind.PUT, 10)
    assert put.atsign == "@after" and put.claim == after
    assert await session.release(pre)
    _, gone = await log.wait_for(lambda e: e.kind is ClaimEventKind.DELETE, 10)
    assert gone.atsign == "@before"
    assert await dcs.backends[0].owners() == {"@after": after}
    await session.close()


@pytest.mark.slow
async def test_watch_survives_a_server_restart(
    dcs: DCS, watch_log: Callable[[Backend], EventLog]
) -> None:
    log = watch_log(dcs.make())
    await log.first_resync()
    mark = len(log.events)
    if dcs.kind == "etcd":
        holder = await dcs.make().open_session("holder", dcs.timing)
        kept = await holder.claim("@kept", ClaimInfo(node="holder"))
        assert kept is not None
        await log.wait_for(lambda e: e.atsign == "@kept", 10, start=mark)
        etcd = dcs.server
        member = etcd.members[0]  # type: ignore[attr-defined]
        await asyncio.to_thread(etcd.kill_member, member)  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(etcd.restart_member, member)  # type: ignore[attr-defined]
        # etcd keeps its data (and refreshes lease TTLs on restart): the claim survives
        # if the holder renews again before its deadline; either way nothing hangs.
        mark = len(log.events)
    else:
        holder = await dcs.make().open_session("holder", dcs.timing)
        assert await holder.claim("@doomed", ClaimInfo(node="holder")) is not None
        await log.wait_for(lambda e: e.atsign == "@doomed", 10, start=mark)
        mark = len(log.events)
        await asyncio.to_thread(dcs.server.restart)  # type: ignore[attr-defined]
        # The dev agent lost all state: the watch says so with a RESYNC, and the holder
        # learns its session is gone (renew answers 404) well before its deadline.
        _, resync = await log.wait_for(lambda e: e.kind is ClaimEventKind.RESYNC, 15, start=mark)
        assert resync.snapshot == {}
        await asyncio.wait_for(holder.lost.wait(), dcs.timing.renew_deadline + 2)
        assert "expired" in (getattr(holder, "lost_reason", "") or "")
    session = await _open_session_retrying(dcs, "after")
    claim = await _claim_until(session, "@after-restart", ClaimInfo(node="after"), 10)
    _, event = await log.wait_for(
        lambda e: (
            e.atsign == "@after-restart"
            or (e.snapshot is not None and "@after-restart" in e.snapshot)
        ),
        15,
        start=mark,
    )
    assert event.claim == claim or (event.snapshot or {}).get("@after-restart") == claim
    await session.close()
    await holder.close()


async def test_resume_session_by_id(dcs: DCS) -> None:
    first = await dcs.make().open_session("n", dcs.timing)
    claim = await first.claim("@resumed", ClaimInfo(node="n"))
    assert claim is not None
    # Another process (a restarted supervisor) re-attaches to the same session.
    other = dcs.make()
    resumed = await other.resume_session("n", dcs.timing, first.session_id)
    assert resumed is not None and resumed.session_id == first.session_id
    assert resumed.state is SessionState.ALIVE
    assert await resumed.claim("@resumed", ClaimInfo(node="n")) == claim
    # A session with another TTL than the caller's timing is refused: its deadline
    # arithmetic would be wrong.
    other_ttl = Timing.for_ttl(dcs.timing.ttl + 6)
    assert await other.resume_session("n", other_ttl, first.session_id) is None
    await first.close(revoke=False)
    assert await other.resume_session("n", dcs.timing, "not-a-session") is None
    await resumed.close()  # revokes: the session is gone now
    assert await other.resume_session("n", dcs.timing, first.session_id) is None
    assert await other.owner("@resumed") is None


async def test_revoke_session_by_id_frees_its_claims_at_once(dcs: DCS) -> None:
    """What the fence does for a dead supervisor: another client ends the session by id."""
    holder = await dcs.make().open_session("n", dcs.timing)
    assert await holder.claim("@revoked", ClaimInfo(node="n")) is not None
    fence = dcs.make()
    await fence.revoke_session(holder.session_id, dcs.timing.request_timeout * 3)
    assert await fence.owner("@revoked") is None
    await asyncio.wait_for(holder.lost.wait(), dcs.timing.ttl)  # it hears of it, too
    await fence.revoke_session(holder.session_id, dcs.timing.request_timeout * 3)  # gone: ok
    with pytest.raises(ValueError, match=r"is not an? (etcd lease|Consul session) id"):
        await fence.revoke_session("not a session!", 1.0)
    await holder.close()


async def test_bad_input_gives_clear_errors(dcs: DCS) -> None:
    backend = dcs.make()
    with pytest.raises(TimingError, match="minimum"):
        await backend.open_session("n", Timing.for_ttl(1.0 if dcs.kind == "etcd" else 6.0))
    session = await backend.open_session("n", dcs.timing)
    for bad in ("", "@", "@a/b", "@has space", "@" + "x" * 80):
        with pytest.raises(ValueError, match="atSign"):
            await session.claim(bad, ClaimInfo(node="n"))
    await session.close()


async def test_unreachable_dcs_raises_dcs_unavailable_in_time(dcs: DCS) -> None:
    port = free_port()
    timeout = 0.5
    nowhere: Backend
    if dcs.kind == "etcd":
        nowhere = open_backend(
            "etcd", endpoints=[f"127.0.0.1:{port}"], prefix="p", request_timeout=timeout
        )
    else:
        nowhere = open_backend(
            "consul", url=f"http://127.0.0.1:{port}", prefix="p", request_timeout=timeout
        )
    try:
        started = time.monotonic()
        with pytest.raises(DCSUnavailable, match=f"127.0.0.1:{port}"):
            await nowhere.open_session("n", dcs.timing)
        assert time.monotonic() - started < dcs.timing.request_timeout + 1.0
        for call in (nowhere.owners(), nowhere.owner("@alice")):
            started = time.monotonic()
            with pytest.raises(DCSUnavailable, match=f"127.0.0.1:{port}"):
                await call
            assert time.monotonic() - started < timeout + 1.0
    finally:
        await nowhere.close()


async def test_cancelling_a_watch_consumer_always_ends_it(dcs: DCS) -> None:
    """Cancel while events keep arriving: every cancelled consumer must end promptly."""
    backend = dcs.make()
    session = await backend.open_session("n", dcs.timing)

    async def churn() -> None:  # a steady stream of claim changes
        for i in range(100_000):
            claim = await session.claim("@churn", ClaimInfo(node="n"))
            if claim is not None:
                await session.release(claim)
            await asyncio.sleep(0.001 * (i % 3))

    async def consume() -> None:
        async for _ in backend.watch():
            pass

    churner = asyncio.create_task(churn())
    try:
        for i in range(40):
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1 + 0.003 * (i % 17))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2.0)
            assert done, f"round {i}: the cancelled watch consumer is still running"
    finally:
        churner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await churner
    await session.close()
