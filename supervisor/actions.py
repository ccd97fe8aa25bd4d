"""What a plan's actions do: fence, hand off, release, claim and start, restart, (de)register.

Every start carries a fencing token strictly greater than every earlier one of its atSign
(a restart under a held claim releases and claims again), is checked by the data guard
before the claim, writes the guard's marker before the atServer runs, and is registered in
Consul only while the session still holds the claim. Every action updates the caches it
changed itself (the workloads, the registrations), so nothing needs a full list afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiohttp

from atserver_runner.base import Workload, WorkloadState
from atserver_runner.devserver.server import EXIT_FENCED_AT_START
from leases.base import Claim, DCSUnavailable, LeaseError, SessionLost
from supervisor import cycle, data_guard
from supervisor.api_client import bearer, client_tls
from supervisor.context import NodeContext
from supervisor.deadline import within
from supervisor.guard import DataGuard
from supervisor.handoffs import HandoffReport
from supervisor.registration import Instance, RegistrationError

log = logging.getLogger("supervisor")

START_POLL_INTERVAL = 0.1
"""Seconds between probes of a new atServer until it answers (bounded by start_timeout)."""


class Actions:
    """Carries out cycle actions for one node (see module docstring)."""

    def __init__(self, ctx: NodeContext, guard: DataGuard) -> None:
        self.ctx = ctx
        self.guard = guard

    async def execute(self, plan: cycle.Plan, snap: cycle.Snapshot) -> list[str]:
        """Run the plan's actions: fences and deregistrations first, then the rest at most
        ``placement.start_concurrency`` at a time.

        Structured: every action runs in a task group this call waits for, so no action
        outlives its cycle (a cancelled cycle cancels its actions); a failing action is
        contained, counted and named in the outcome, and never stops its siblings.
        """
        first = [a for a in plan.actions if isinstance(a, cycle.Fence | cycle.Deregister)]
        then = [a for a in plan.actions if a not in first]
        state = self.ctx.state
        state.last_failures = 0
        outcomes = await self._run_all(first, snap, None)
        outcomes += await self._run_all(then, snap, self.ctx.cfg.placement.start_concurrency)
        if state.last_failures:
            outcomes.append(f"{state.last_failures} action(s) failed")
        return [o for o in outcomes if o]

    async def _run_all(
        self, actions: Sequence[cycle.Action], snap: cycle.Snapshot, limit: int | None
    ) -> list[str]:
        results = [""] * len(actions)
        sem = asyncio.Semaphore(limit) if limit else None

        async def one(i: int, a: cycle.Action) -> None:
            async with sem if sem is not None else contextlib.nullcontext():
                results[i] = await self.contained(a, snap)

        async with asyncio.TaskGroup() as group:
            for i, a in enumerate(actions):
                group.create_task(one(i, a), name=f"{type(a).__name__} {a.atsign}")
        return results

    async def contained(self, a: cycle.Action, snap: cycle.Snapshot) -> str:
        """An action, with any failure (but cancellation) turned into an outcome."""
        try:
            return await self.act(a, snap)
        except Exception as exc:
            kind = type(a).__name__
            self.ctx.state.last_failures += 1
            if self.ctx.metrics is not None:
                self.ctx.metrics.action_failures.labels(kind).inc()
            log.warning("event=action-failed action=%s atsign=%s error=%r", kind, a.atsign, exc)
            return f"{kind} {a.atsign} failed: {type(exc).__name__}: {exc}"

    async def act(self, a: cycle.Action, snap: cycle.Snapshot) -> str:
        match a:
            case cycle.Fence():
                return await self.fence(a.atsign, a.reason, snap)
            case cycle.HandOff() if a.retire:
                return await self.retire(a.atsign, a.claim, a.reason)
            case cycle.HandOff():
                return await self.handoff(a.atsign, a.claim, a.reason)
            case cycle.Release():
                ok = await self.release(a.claim)
                self.ctx.state.handoffs.discard(a.atsign)
                return f"released {a.atsign}" if ok else f"{a.atsign} was no longer ours"
            case cycle.ClaimAndStart():
                return await self.claim_and_start(a.atsign, a.rank, snap)
            case cycle.Start():
                return await self.restart_fresh_token(a.atsign, a.claim, snap)
            case cycle.Register():
                await self.register(a.atsign, a.claim, a.workload)
                return f"registered {a.atsign}"
            case cycle.Deregister():
                self.ctx.prober.untrack(a.atsign)
                await self.deregister(a.atsign, self.ctx.cfg.consul.request_timeout)
                return f"deregistered {a.atsign}"
            case cycle.RequestFailback():
                return await self.ask_failback(a)
        return ""

    # --- stopping ----------------------------------------------------------------------------

    def _stop_timeout(self, urgent: bool) -> float:
        if urgent:
            return max(0.1, self.ctx.timing.stop_budget / 2)
        return self.ctx.cfg.runner.stop_timeout

    async def stop(self, atsign: str, timeout: float) -> bool:
        """Stop the atServer and forget it (caches, probes); a failed stop forgets nothing,
        so the next cycle tries again."""
        ctx = self.ctx
        ctx.prober.untrack(atsign)
        stopped = await ctx.runner.stop(atsign, timeout=timeout)
        ctx.workloads.drop(atsign)
        ctx.state.since.pop(atsign, None)
        # The cache changed: decide again (a fenced leftover of a crash may be claimable now;
        # no event will say so, the claim was vacant all along).
        ctx.mark([atsign])
        return stopped

    async def deregister(self, atsign: str, timeout: float) -> None:
        ctx = self.ctx
        try:
            await ctx.registrar.deregister(atsign, timeout=timeout)
        except RegistrationError as exc:
            if ctx.metrics is not None:
                ctx.metrics.consul_errors.labels("deregister").inc()
            log.warning("event=deregister-failed atsign=%s error=%s", atsign, exc)

    async def fence(self, atsign: str, reason: str, snap: cycle.Snapshot) -> str:
        ctx = self.ctx
        urgent = snap.session_id is None or snap.now >= snap.renew_deadline
        dereg_timeout = (
            min(ctx.cfg.consul.request_timeout, ctx.timing.stop_budget / 3)
            if urgent
            else ctx.cfg.consul.request_timeout
        )
        await self.deregister(atsign, dereg_timeout)
        stopped = await self.stop(atsign, self._stop_timeout(urgent))
        if stopped and ctx.metrics is not None:
            ctx.metrics.self_fencings.labels("session" if urgent else "claim").inc()
        log.warning("event=fenced atsign=%s reason=%r stopped=%s", atsign, reason, stopped)
        return f"fenced {atsign}"

    async def release(self, claim: Claim) -> bool:
        s = self.ctx.session
        if s is None:
            return False
        releasing = self.ctx.state.releasing
        releasing.add(claim.atsign)  # the claim view drops it when it sees the deletion
        try:
            released = await within(s.release(claim), self.ctx.timing.request_timeout * 2)
        except BaseException:
            releasing.discard(claim.atsign)
            raise
        if not released:
            releasing.discard(claim.atsign)
        return released

    async def handoff(self, atsign: str, claim: Claim, reason: str) -> str:
        ctx = self.ctx
        report = HandoffReport(atsign=atsign, reason=reason, started=ctx.clock())
        await self.deregister(atsign, ctx.cfg.consul.request_timeout)
        await self.stop(atsign, ctx.cfg.runner.stop_timeout)
        released = await self.release(claim)
        ctx.state.handoffs.discard(atsign)
        exclusion = 2 * ctx.timing.ttl + 5
        ctx.state.excluded[atsign] = ctx.clock() + exclusion
        ctx.retry(atsign, exclusion)
        if ctx.metrics is not None:
            ctx.metrics.handoffs.inc()
        if released:
            ctx.handoffs.start(report)
        else:
            ctx.handoffs.finish(report, "claim was no longer ours")
        log.info("event=handed-off atsign=%s reason=%r released=%s", atsign, reason, released)
        return f"handed off {atsign} ({reason})"

    async def retire(self, atsign: str, claim: Claim, reason: str) -> str:
        """The atSign left the inventory: deregister, stop, release; its data stays."""
        ctx = self.ctx
        await self.deregister(atsign, ctx.cfg.consul.request_timeout)
        await self.stop(atsign, ctx.cfg.runner.stop_timeout)
        released = await self.release(claim)
        ctx.state.handoffs.discard(atsign)
        log.info("event=retired atsign=%s reason=%r released=%s", atsign, reason, released)
        return f"stopped and released {atsign} ({reason}, data kept)"

    # --- starting ----------------------------------------------------------------------------

    async def restart_fresh_token(self, atsign: str, claim: Claim, snap: cycle.Snapshot) -> str:
        """Start again under a claim we hold (the atServer exited, or the fence stopped it
        before a resume): release and claim again first, so every start carries a token
        strictly greater than every earlier one. A standby may win the claim meanwhile.
        The data guard checks this node's data dir first; on a refusal the claim is
        released, so a node whose copy is current can take it."""
        ctx = self.ctx
        if atsign in snap.workloads:
            await self.deregister(atsign, ctx.cfg.consul.request_timeout)
            await self.stop(atsign, ctx.cfg.runner.stop_timeout)
        if not ctx.session_usable():
            return f"not restarting {atsign}: session not alive"
        s = ctx.session
        assert s is not None
        checked = await self.guard.check(atsign)
        if not await self.release(claim):
            return f"{atsign} was no longer ours (token {claim.token})"
        if isinstance(checked, str):
            return f"released {atsign} (token {claim.token}): {checked}"
        if not checked.ok or checked.stamp is None:
            return f"released {atsign} (token {claim.token}); " + self.guard.refuse(atsign, checked)
        self.guard.claiming(atsign, s.session_id, checked.stamp)
        try:
            fresh = await within(
                s.claim(atsign, ctx.info(), generation=checked.stamp),
                ctx.timing.request_timeout * 2,
            )
        except (TimeoutError, LeaseError) as exc:
            return f"released {atsign} (token {claim.token}) but could not claim it again: {exc!r}"
        if fresh is None:
            return (
                f"released {atsign} (token {claim.token}); another node claimed it first "
                "or its generation changed"
            )
        result = await self.start(atsign, fresh, snap, takeover=False, dir_id=checked.stamp.dir_id)
        return f"re-claimed {atsign} (token {claim.token} -> {fresh.token}); {result}"

    async def claim_and_start(self, atsign: str, rank: int, snap: cycle.Snapshot) -> str:
        ctx = self.ctx
        if not ctx.session_usable():
            return f"not claiming {atsign}: session not alive"
        s = ctx.session
        assert s is not None
        checked = await self.guard.check(atsign)
        if isinstance(checked, str):
            return checked
        if not checked.ok or checked.stamp is None:
            return self.guard.refuse(atsign, checked)
        self.guard.claiming(atsign, s.session_id, checked.stamp)
        try:
            claim = await within(
                s.claim(atsign, ctx.info(), generation=checked.stamp),
                ctx.timing.request_timeout * 2,
            )
        except SessionLost:
            return f"not claiming {atsign}: session lost"
        except (TimeoutError, DCSUnavailable) as exc:
            if ctx.metrics is not None:
                ctx.metrics.dcs_errors.labels("claim").inc()
            ctx.retry(atsign, 0.25)
            return f"claim of {atsign} failed: {exc!r}"
        if claim is None:
            # Someone else holds it, its generation changed since the check, or (Consul)
            # the lock-delay of the dead owner's session still blocks the key: look again
            # soon rather than at the next resync.
            ctx.retry(atsign, 0.25)
            return f"lost the race for {atsign}"
        vac = snap.vacancies.get(atsign)
        takeover = vac is not None and vac.last_node not in (None, ctx.me.name)
        result = await self.start(
            atsign, claim, snap, takeover=takeover, dir_id=checked.stamp.dir_id
        )
        return f"claimed {atsign} (token {claim.token}, rank {rank}); {result}"

    async def start(
        self, atsign: str, claim: Claim, snap: cycle.Snapshot, takeover: bool, dir_id: str
    ) -> str:
        ctx = self.ctx
        if atsign in ctx.workloads.items:
            await self.stop(atsign, ctx.cfg.runner.stop_timeout)
        # The fence must know the current deadline before anything runs.
        ctx.keeper.write_heartbeat()
        if not ctx.session_usable():
            return f"not starting {atsign}: session not alive"
        # The data guard's marker, durable before the atServer can write anything.
        try:
            await asyncio.to_thread(
                data_guard.stamp_marker,
                self.guard.data_dir(atsign),
                claim.token,
                dir_id,
                ctx.me.name,
                atsign,
            )
        except OSError as exc:
            with contextlib.suppress(LeaseError, TimeoutError):
                await self.release(claim)
            return f"not starting {atsign}: cannot write its data dir marker ({exc}); released"
        self.guard.stamped(atsign)
        port = ctx.ports.allocate({w.port for w in ctx.workloads.items.values()})
        try:
            spec = ctx.spec_builder(atsign, port, claim.token)
            w = await within(ctx.runner.start(spec), ctx.cfg.runner.start_timeout)
        finally:
            ctx.ports.release(port)
        ctx.workloads.put(w)
        ctx.state.since[atsign] = time.time()
        if ctx.metrics is not None:
            ctx.metrics.starts.inc()
            if takeover:
                ctx.metrics.takeovers.inc()
        if not ctx.session_usable():
            await self.stop(atsign, self._stop_timeout(True))
            return f"stopped {atsign} again: session lost while starting"
        try:
            await self.register(atsign, claim, w)
        except RegistrationError as exc:
            log.warning("event=register-failed atsign=%s error=%s", atsign, exc)
        healthy, exit_code = await self.first_probe(atsign)
        if exit_code == EXIT_FENCED_AT_START:
            return await self.stale_token(atsign, claim)
        if exit_code is not None:
            return (
                f"{atsign} exited with code {exit_code} right after its start (token {claim.token})"
            )
        vac = snap.vacancies.get(atsign)
        if healthy and vac is not None and ctx.metrics is not None:
            ctx.metrics.failover_seconds.observe(ctx.clock() - vac.since)
        return f"started {atsign} on port {w.port} with token {claim.token}" + (
            "" if healthy else " (not healthy yet)"
        )

    async def register(self, atsign: str, claim: Claim, w: Workload) -> None:
        ctx = self.ctx
        await ctx.registrar.register(
            Instance(
                atsign=atsign,
                node=ctx.me.name,
                cloud=ctx.me.cloud,
                address=ctx.cfg.node.address,
                port=w.port,
                fencing_token=claim.token,
            )
        )
        ctx.prober.track(atsign)

    async def first_probe(self, atsign: str) -> tuple[bool, int | None]:
        """Probe until the new atServer answers (bounded), passing its check at once.

        Returns (healthy, exit code if the workload already exited): an atServer that exits
        at once does not hold its action for the whole ``runner.start_timeout``.
        """
        ctx = self.ctx
        deadline = ctx.clock() + ctx.cfg.runner.start_timeout
        while ctx.clock() < deadline:
            if (await ctx.prober.probe(atsign)).healthy:
                return True, None
            found = await ctx.runner.inspect(atsign)
            if found is None or found.state is not WorkloadState.RUNNING:
                if found is not None:
                    ctx.workloads.put(found)
                code = found.exit_code if found else None
                return False, code if code is not None else -1
            await asyncio.sleep(START_POLL_INTERVAL)
        return False, None

    async def stale_token(self, atsign: str, claim: Claim) -> str:
        """The data directory holds a higher token than our claim (the DCS lost its history,
        e.g. a Consul restart in dev mode): release, and claim again after a pause, which
        yields a fresh (higher) token; never retry the same token."""
        ctx = self.ctx
        await self.deregister(atsign, ctx.cfg.consul.request_timeout)
        await self.stop(atsign, ctx.cfg.runner.stop_timeout)
        released = False
        with contextlib.suppress(LeaseError, TimeoutError):
            released = await self.release(claim)
        pause = max(1.0, ctx.timing.renew_interval)
        ctx.state.excluded[atsign] = ctx.clock() + pause
        ctx.retry(atsign, pause)
        ctx.state.stale_tokens[atsign] = claim.token
        log.error(
            "event=stale-fencing-token atsign=%s token=%d released=%s "
            "detail='the data directory holds a higher token; re-claiming in %.1fs'",
            atsign,
            claim.token,
            released,
            pause,
        )
        return (
            f"{atsign} refused token {claim.token} (its data directory holds a higher one): "
            f"released the claim, re-claiming in {pause:g}s for a fresh token"
        )

    async def ask_failback(self, a: cycle.RequestFailback) -> str:
        ctx = self.ctx
        ctx.state.failback_asked[a.atsign] = ctx.clock()
        ctx.retry(a.atsign, ctx.cfg.placement.failback_check_interval)
        if not a.owner_api:
            return f"cannot ask {a.owner_node} for {a.atsign}: no API address in its claim"
        url = f"{a.owner_api}/handoff"
        timeout = aiohttp.ClientTimeout(total=ctx.cfg.consul.request_timeout)
        body_json = {
            "atsign": a.atsign,
            "for_node": ctx.me.name,
            "reason": f"failback to {ctx.me.name}",
        }
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(
                url,
                json=body_json,
                headers=bearer(ctx.cfg.http.auth.peer_token if ctx.cfg.http.auth else None),
                ssl=client_tls(ctx.cfg.http) or True,
            ) as resp,
        ):
            body = await resp.text()
        return f"asked {a.owner_node} to hand back {a.atsign}: {resp.status} {body[:80]}"
