"""The supervisor daemon: keeps the session, takes snapshots, runs the cycle, acts.

One loop: wait for a claim change (watch), a timer (rank delay, renew
deadline, resync) or a command, take one snapshot, :func:`supervisor.cycle.decide`,
execute the plan, log the sentence. Side tasks: the heartbeat for the fence,
the probe loop that passes the Consul checks, the claim watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from atserver_runner.base import Runner, RunnerError, Workload, WorkloadSpec, WorkloadState
from atserver_runner.devserver.server import EXIT_FENCED_AT_START
from leases.base import (
    Backend,
    Claim,
    ClaimInfo,
    Clock,
    DCSUnavailable,
    LeaseError,
    Session,
    SessionLost,
    SessionState,
    Timing,
)
from supervisor import cycle
from supervisor.config import SupervisorConfig
from supervisor.deadline import within
from supervisor.fence import Heartbeat, write_heartbeat
from supervisor.metrics import SupervisorMetrics
from supervisor.placement import AtSignPolicy, NodeRef
from supervisor.registration import Instance, Registrar, RegistrationError, bare
from supervisor.resume import SessionRecord, forget_record, load_record, resume_session, save_record
from supervisor.timing import build_timing

log = logging.getLogger("supervisor")

HANDOFF_POLL_INTERVAL = 0.1
"""Seconds between Consul health reads while a handoff of this node is in flight."""

CLAIM_RETRY_INTERVAL = 0.25
"""Seconds before retrying a claim that failed while the atSign still looked vacant."""

SpecBuilder = Callable[[str, int, int], WorkloadSpec]
"""(atsign, port, fencing_token) -> the spec to start."""


@dataclass
class HandoffReport:
    """How one planned handoff went, as seen from the node that let go."""

    atsign: str
    reason: str
    started: float
    to_node: str | None = None
    unavailable_s: float | None = None
    done: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "atsign": self.atsign,
            "reason": self.reason,
            "to_node": self.to_node,
            "unavailable_s": None if self.unavailable_s is None else round(self.unavailable_s, 3),
            "done": self.done,
            "note": self.note,
        }


@dataclass
class Health:
    healthy: bool
    detail: str
    at: float


@dataclass
class State:
    """What the daemon remembers between cycles (the cycle itself stays pure)."""

    claims: dict[str, Claim] | None = None
    vacancies: dict[str, cycle.Vacancy] = field(default_factory=dict)
    draining: bool = False
    handoffs: set[str] = field(default_factory=set)
    excluded: dict[str, float] = field(default_factory=dict)
    stale_tokens: dict[str, int] = field(default_factory=dict)
    """atSign -> the last token its data directory refused (shown in /status)."""
    failback_asked: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, HandoffReport] = field(default_factory=dict)
    reports: list[HandoffReport] = field(default_factory=list)
    workloads: dict[str, Workload] = field(default_factory=dict)
    health: dict[str, Health] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    last_sentence: str = ""
    cycles: int = 0


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _registration_gone(exc: RegistrationError) -> bool:
    """The agent no longer knows the check (500 "does not have associated TTL", 404)."""
    text = str(exc)
    return "does not have associated TTL" in text or "404" in text or "Unknown check" in text


class Supervisor:
    """One node's supervisor (see module docstring). Use :meth:`run` with a stop event."""

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
    ) -> None:
        self.cfg = cfg
        self.timing: Timing = build_timing(cfg)
        self.backend = backend
        self.runner = runner
        self.registrar = registrar
        self.metrics = metrics
        self.clock = clock
        self.heartbeat_path = heartbeat_path or cfg.heartbeat_path
        self.session_record_path = cfg.runner.state_dir / "session.json"
        self.pid = pid or os.getpid()
        self.spec_builder = spec_builder or self._default_spec
        self.me = NodeRef(cfg.node.name, cfg.node.cloud)
        self.nodes = [NodeRef(n.name, n.cloud) for n in cfg.inventory.nodes] or [self.me]
        self.inventory = {
            a.atsign: AtSignPolicy(a.atsign, tuple(a.prefer_nodes), tuple(a.prefer_clouds))
            for a in cfg.inventory.atsigns
        }
        self.settings = cycle.PlacementSettings(
            capacity=cfg.placement.capacity,
            rank_delay=cfg.placement.rank_delay,
            prefer_other_cloud=cfg.placement.prefer_other_cloud,
            failback=cfg.placement.failback,
            failback_interval=cfg.placement.failback_check_interval,
        )
        self.session: Session | None = None
        self.state = State()
        self.wake = asyncio.Event()
        self._last_deadline: float | None = None
        self._last_hb_write: float | None = None
        self._reserved_ports: set[int] = set()
        self._last_refresh = float("-inf")
        self._retry_soon = False
        self._ready = False
        self._lock = asyncio.Lock()
        host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::") else cfg.node.address
        self.api_url = f"http://{host}:{cfg.http.port}"

    # --- small helpers -------------------------------------------------------------------

    def _info(self) -> ClaimInfo:
        return ClaimInfo(
            node=self.cfg.node.name,
            cloud=self.cfg.node.cloud,
            zone=self.cfg.node.zone,
            address=self.cfg.node.address,
            extra={"api": self.api_url, "since": f"{time.time():.3f}"},
        )

    def _default_spec(self, atsign: str, port: int, token: int) -> WorkloadSpec:
        r = self.cfg.runner
        data_dir = r.data_root / bare(atsign)
        subst = {
            "atsign": atsign,
            "name": bare(atsign),
            "host": self.cfg.node.address,
            "port": str(port),
            "data_dir": str(data_dir),
            "token": str(token),
            "cert": str(r.tls.cert) if r.tls and r.tls.cert else "",
            "key": str(r.tls.key) if r.tls and r.tls.key else "",
        }
        if r.command:
            command = [part.format(**subst) for part in r.command]
        elif r.kind == "process":
            from atserver_runner import devserver

            if r.tls is None or r.tls.cert is None or r.tls.key is None:
                raise RuntimeError("runner.tls.cert/key are needed to run the dev atServer")
            command = devserver.argv(
                python=sys.executable,
                atsign=atsign,
                host=self.cfg.node.address,
                port=port,
                data_dir=data_dir,
                fencing_token=token,
                cert=r.tls.cert,
                key=r.tls.key,
            )
        else:
            command = []
        return WorkloadSpec(
            atsign=atsign,
            node=self.cfg.node.name,
            port=port,
            data_dir=data_dir,
            fencing_token=token,
            host=self.cfg.node.address,
            image=r.image,
            command=tuple(command),
            env=dict(r.env),
        )

    def _session_usable(self) -> bool:
        s = self.session
        return (
            s is not None
            and s.state is SessionState.ALIVE
            and self.clock() < s.renew_deadline
            and not s.lost.is_set()
        )

    def write_heartbeat(self, state: str = "running") -> None:
        """Write the session's renew deadline for the fence (before anything starts)."""
        s = self.session
        if s is not None and not s.lost.is_set():
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

    def _alloc_port(self) -> int:
        low, high = self.cfg.runner.port_range
        used = {w.port for w in self.state.workloads.values()} | self._reserved_ports
        for port in range(low, high + 1):
            if port in used:
                continue
            if _port_free(self.cfg.node.address, port):
                self._reserved_ports.add(port)
                return port
        raise RuntimeError(f"no free port in runner.port_range {low}-{high}")

    # --- session -------------------------------------------------------------------------

    async def _resume_recorded(self) -> Session | None:
        """The session recorded by an earlier supervisor of this node, if it is still alive."""
        rec = load_record(self.session_record_path)
        if rec is None:
            return None
        if (rec.backend, rec.prefix, rec.node) != (
            self.cfg.dcs.backend,
            self.cfg.dcs.prefix,
            self.cfg.node.name,
        ):
            forget_record(self.session_record_path)
            return None
        session = await within(
            resume_session(self.backend, self.cfg.node.name, self.timing, rec.session_id),
            self.timing.request_timeout * 2,
        )
        if session is None:
            log.info("event=session-not-resumed id=%s reason='gone on the DCS'", rec.session_id)
            forget_record(self.session_record_path)
        return session

    async def open_session(self) -> bool:
        """Resume the recorded session or open a new one (once); True on success."""
        resumed = False
        try:
            session = await self._resume_recorded()
            resumed = session is not None
            if session is None:
                session = await within(
                    self.backend.open_session(self.cfg.node.name, self.timing),
                    self.timing.request_timeout * 3,
                )
        except (TimeoutError, LeaseError) as exc:
            if self.metrics is not None:
                self.metrics.dcs_errors.labels("open_session").inc()
            log.warning("event=session-open-failed error=%r", exc)
            return False
        self.session = session
        self.state.vacancies = {}
        self.write_heartbeat()
        save_record(
            self.session_record_path,
            SessionRecord(
                self.cfg.dcs.backend, self.cfg.dcs.prefix, self.cfg.node.name, session.session_id
            ),
        )
        log.info("event=session-%s id=%s", "resumed" if resumed else "opened", session.session_id)
        return True

    async def _drop_session(self) -> None:
        s = self.session
        self.session = None
        forget_record(self.session_record_path)
        if s is None:
            return
        try:
            await within(s.close(revoke=True), self.timing.request_timeout * 2)
        except Exception as exc:
            log.info("event=session-close-failed error=%r", exc)

    # --- the cycle -----------------------------------------------------------------------

    async def snapshot(self) -> cycle.Snapshot:
        """Read claims (once), workloads and registrations into an immutable snapshot."""
        s = self.session
        claims: dict[str, Claim] | None = None
        if self._session_usable():
            try:
                claims = await within(self.backend.owners(), self.timing.request_timeout * 1.5)
            except (TimeoutError, LeaseError) as exc:
                if self.metrics is not None:
                    self.metrics.dcs_errors.labels("owners").inc()
                log.warning("event=dcs-read-failed error=%r", exc)
        workloads = {w.atsign: w for w in await self.runner.list()}
        await self._refresh_registrations()
        self.state.workloads = workloads
        now = self.clock()
        if claims is not None:
            cloud_of = {n.name: n.cloud for n in self.nodes}
            self.state.vacancies = cycle.track_vacancies(
                self.state.vacancies,
                self.state.claims,
                claims,
                set(self.inventory),
                now,
                cloud_of,
            )
            self.state.claims = claims
        return cycle.Snapshot(
            now=now,
            me=self.me,
            session_state=s.state if s is not None else SessionState.LOST,
            session_id=s.session_id if s is not None and not s.lost.is_set() else None,
            renew_deadline=s.renew_deadline if s is not None else 0.0,
            claims=claims,
            workloads=workloads,
            registered=frozenset(self.registrar.registered),
            inventory=self.inventory,
            nodes=self.nodes,
            vacancies=dict(self.state.vacancies),
            draining=self.state.draining,
            handoffs=frozenset(self.state.handoffs),
            handoff_in_flight=next(iter(self.state.in_flight), None),
            excluded=dict(self.state.excluded),
            failback_asked=dict(self.state.failback_asked),
            settings=self.settings,
        )

    async def run_cycle(self) -> tuple[str, cycle.Plan]:
        """One cycle: snapshot, decide, act. Returns the sentence saying what it did."""
        async with self._lock:
            snap = await self.snapshot()
            plan = cycle.decide(snap)
            outcomes = await self.execute(plan, snap)
            await self._track_handoffs(snap)
            self.state.cycles += 1
            if self.metrics is not None:
                self.metrics.cycles.inc()
            sentence = plan.sentence
            if outcomes:
                sentence += " => " + "; ".join(outcomes)
            self.state.last_sentence = sentence
            return sentence, plan

    async def execute(self, plan: cycle.Plan, snap: cycle.Snapshot) -> list[str]:
        """Run the plan's actions: fences and handoffs first, then starts (concurrently)."""
        first = [a for a in plan.actions if isinstance(a, cycle.Fence | cycle.Deregister)]
        then = [a for a in plan.actions if a not in first]
        outcomes: list[str] = []
        if first:
            outcomes += await asyncio.gather(*(self._act(a, snap) for a in first))
        if then:
            sem = asyncio.Semaphore(8)

            async def bounded(a: cycle.Action) -> str:
                async with sem:
                    return await self._act(a, snap)

            outcomes += await asyncio.gather(*(bounded(a) for a in then))
        return [o for o in outcomes if o]

    async def _act(self, a: cycle.Action, snap: cycle.Snapshot) -> str:
        try:
            match a:
                case cycle.Fence():
                    return await self._fence(a.atsign, a.reason, snap)
                case cycle.HandOff():
                    return await self._handoff(a.atsign, a.claim, a.reason)
                case cycle.Release():
                    ok = await self._release(a.claim)
                    self.state.handoffs.discard(a.atsign)
                    return f"released {a.atsign}" if ok else f"{a.atsign} was no longer ours"
                case cycle.ClaimAndStart():
                    return await self._claim_and_start(a.atsign, a.rank, snap)
                case cycle.Start():
                    return await self._restart_fresh_token(a.atsign, a.claim, snap)
                case cycle.Register():
                    await self._register(a.atsign, a.claim, a.workload)
                    return f"registered {a.atsign}"
                case cycle.Deregister():
                    await self._deregister(a.atsign, self.cfg.consul.request_timeout)
                    return f"deregistered {a.atsign}"
                case cycle.RequestFailback():
                    return await self._ask_failback(a)
        except (
            LeaseError,
            RegistrationError,
            RunnerError,
            TimeoutError,
            OSError,
            RuntimeError,
        ) as exc:
            log.warning("event=action-failed action=%r error=%r", a, exc)
            return f"{type(a).__name__} {a.atsign} failed: {exc}"
        return ""

    async def _refresh_registrations(self) -> None:
        """Re-read what the agent holds for this node (at most every probe_interval), so a
        registration the agent lost (restart, manual removal) is registered again."""
        now = self.clock()
        if now - self._last_refresh < self.cfg.timing.probe_interval:
            return
        self._last_refresh = now
        try:
            await self.registrar.refresh()
        except RegistrationError as exc:
            if self.metrics is not None:
                self.metrics.consul_errors.labels("refresh").inc()
            log.warning("event=registration-refresh-failed error=%s", exc)

    async def _deregister(self, atsign: str, timeout: float) -> None:
        try:
            await self.registrar.deregister(atsign, timeout=timeout)
        except RegistrationError as exc:
            if self.metrics is not None:
                self.metrics.consul_errors.labels("deregister").inc()
            log.warning("event=deregister-failed atsign=%s error=%s", atsign, exc)

    def _stop_timeout(self, urgent: bool) -> float:
        if urgent:
            return max(0.1, self.timing.stop_budget / 2)
        return self.cfg.runner.stop_timeout

    async def _fence(self, atsign: str, reason: str, snap: cycle.Snapshot) -> str:
        urgent = snap.session_id is None or snap.now >= snap.renew_deadline
        dereg_timeout = (
            min(self.cfg.consul.request_timeout, self.timing.stop_budget / 3)
            if urgent
            else self.cfg.consul.request_timeout
        )
        await self._deregister(atsign, dereg_timeout)
        stopped = await self.runner.stop(atsign, timeout=self._stop_timeout(urgent))
        self.state.health.pop(atsign, None)
        self.state.since.pop(atsign, None)
        if stopped and self.metrics is not None:
            label = "session" if urgent else "claim"
            self.metrics.self_fencings.labels(label).inc()
        log.warning("event=fenced atsign=%s reason=%r stopped=%s", atsign, reason, stopped)
        return f"fenced {atsign}"

    async def _release(self, claim: Claim) -> bool:
        s = self.session
        if s is None:
            return False
        return await within(s.release(claim), self.timing.request_timeout * 2)

    async def _handoff(self, atsign: str, claim: Claim, reason: str) -> str:
        report = HandoffReport(atsign=atsign, reason=reason, started=self.clock())
        await self._deregister(atsign, self.cfg.consul.request_timeout)
        await self.runner.stop(atsign, timeout=self.cfg.runner.stop_timeout)
        self.state.health.pop(atsign, None)
        self.state.since.pop(atsign, None)
        released = await self._release(claim)
        self.state.handoffs.discard(atsign)
        self.state.excluded[atsign] = self.clock() + 2 * self.timing.ttl + 5
        if self.metrics is not None:
            self.metrics.handoffs.inc()
        if released:
            self.state.in_flight[atsign] = report
        else:
            report.note = "claim was no longer ours"
            report.done = True
            self.state.reports.append(report)
        log.info("event=handed-off atsign=%s reason=%r released=%s", atsign, reason, released)
        return f"handed off {atsign} ({reason})"

    async def _track_handoffs(self, snap: cycle.Snapshot) -> None:
        """Finish handoff reports once the atSign passes on another node (or time runs out)."""
        if not self.state.in_flight:
            return
        try:
            entries = await self.registrar.health(passing_only=True)
        except RegistrationError:
            return
        passing: dict[str, str] = {}
        for e in entries:
            meta = (e.get("Service") or {}).get("Meta") or {}
            if meta.get("node") and meta.get("node") != self.me.name:
                passing[meta.get("atsign", "")] = meta["node"]
        now = self.clock()
        limit = 2 * self.timing.ttl + self.cfg.runner.start_timeout
        for atsign, report in list(self.state.in_flight.items()):
            if atsign in passing:
                report.to_node = passing[atsign]
                report.unavailable_s = now - report.started
                report.done = True
            elif now - report.started > limit:
                report.note = f"not passing elsewhere after {limit:g}s"
                report.done = True
            if report.done:
                del self.state.in_flight[atsign]
                self.state.reports.append(report)
                log.info(
                    "event=handoff-done atsign=%s to=%s unavailable_s=%s note=%r",
                    atsign,
                    report.to_node,
                    report.unavailable_s,
                    report.note,
                )

    async def _restart_fresh_token(self, atsign: str, claim: Claim, snap: cycle.Snapshot) -> str:
        """Start again under a claim we hold (the atServer exited, or the fence stopped it
        before a resume): release and claim again first, so every start carries a token
        strictly greater than every earlier one. A standby may win the claim meanwhile."""
        existing = snap.workloads.get(atsign)
        if existing is not None:
            await self._deregister(atsign, self.cfg.consul.request_timeout)
            await self.runner.stop(atsign, timeout=self.cfg.runner.stop_timeout)
        if not self._session_usable():
            return f"not restarting {atsign}: session not alive"
        s = self.session
        assert s is not None
        if not await self._release(claim):
            return f"{atsign} was no longer ours (token {claim.token})"
        try:
            fresh = await within(s.claim(atsign, self._info()), self.timing.request_timeout * 2)
        except (TimeoutError, LeaseError) as exc:
            return f"released {atsign} (token {claim.token}) but could not claim it again: {exc!r}"
        if fresh is None:
            return f"released {atsign} (token {claim.token}); another node claimed it first"
        result = await self._start(atsign, fresh, snap, takeover=False)
        return f"re-claimed {atsign} (token {claim.token} -> {fresh.token}); {result}"

    async def _claim_and_start(self, atsign: str, rank: int, snap: cycle.Snapshot) -> str:
        if not self._session_usable():
            return f"not claiming {atsign}: session not alive"
        s = self.session
        assert s is not None
        try:
            claim = await within(s.claim(atsign, self._info()), self.timing.request_timeout * 2)
        except SessionLost:
            return f"not claiming {atsign}: session lost"
        except (TimeoutError, DCSUnavailable) as exc:
            if self.metrics is not None:
                self.metrics.dcs_errors.labels("claim").inc()
            return f"claim of {atsign} failed: {exc!r}"
        if claim is None:
            # Someone else holds it, or (Consul) the lock-delay of the dead owner's session
            # still blocks the key: look again soon rather than at the next resync.
            self._retry_soon = True
            return f"lost the race for {atsign}"
        vac = snap.vacancies.get(atsign)
        takeover = vac is not None and vac.last_node not in (None, self.me.name)
        result = await self._start(atsign, claim, snap, takeover=takeover)
        return f"claimed {atsign} (token {claim.token}, rank {rank}); {result}"

    async def _start(self, atsign: str, claim: Claim, snap: cycle.Snapshot, takeover: bool) -> str:
        existing = snap.workloads.get(atsign)
        if existing is not None:
            await self.runner.stop(atsign, timeout=self.cfg.runner.stop_timeout)
        # The fence must know the current deadline before anything runs.
        self.write_heartbeat()
        if not self._session_usable():
            return f"not starting {atsign}: session not alive"
        port = self._alloc_port()
        try:
            spec = self.spec_builder(atsign, port, claim.token)
            w = await within(self.runner.start(spec), self.cfg.runner.start_timeout)
        finally:
            self._reserved_ports.discard(port)
        self.state.workloads[atsign] = w
        self.state.since[atsign] = time.time()
        if self.metrics is not None:
            self.metrics.starts.inc()
            if takeover:
                self.metrics.takeovers.inc()
        if not self._session_usable():
            await self.runner.stop(atsign, timeout=self._stop_timeout(True))
            return f"stopped {atsign} again: session lost while starting"
        try:
            await self._register(atsign, claim, w)
        except RegistrationError as exc:
            log.warning("event=register-failed atsign=%s error=%s", atsign, exc)
        healthy, exit_code = await self._first_probe(atsign)
        if exit_code == EXIT_FENCED_AT_START:
            return await self._stale_token(atsign, claim)
        if exit_code is not None:
            return (
                f"{atsign} exited with code {exit_code} right after its start (token {claim.token})"
            )
        vac = snap.vacancies.get(atsign)
        if healthy and vac is not None and self.metrics is not None:
            self.metrics.failover_seconds.observe(self.clock() - vac.since)
        return f"started {atsign} on port {w.port} with token {claim.token}" + (
            "" if healthy else " (not healthy yet)"
        )

    async def _register(self, atsign: str, claim: Claim, w: Workload) -> None:
        await self.registrar.register(
            Instance(
                atsign=atsign,
                node=self.me.name,
                cloud=self.me.cloud,
                address=self.cfg.node.address,
                port=w.port,
                fencing_token=claim.token,
            )
        )

    async def _first_probe(self, atsign: str) -> tuple[bool, int | None]:
        """Probe until the new atServer answers (bounded), then pass its checks at once.

        Returns (healthy, exit code if the workload already exited): an atServer that exits
        at once does not hold the cycle for the whole ``runner.start_timeout``.
        """
        deadline = self.clock() + self.cfg.runner.start_timeout
        while self.clock() < deadline:
            if await self._probe_one(atsign):
                return True, None
            found = [w for w in await self.runner.list() if w.atsign == atsign]
            if not found or found[0].state is not WorkloadState.RUNNING:
                code = found[0].exit_code if found else None
                return False, code if code is not None else -1
            await asyncio.sleep(0.1)
        return False, None

    async def _stale_token(self, atsign: str, claim: Claim) -> str:
        """The data directory holds a higher token than our claim (the DCS lost its history,
        e.g. a Consul restart in dev mode): release, and claim again after a pause, which
        yields a fresh (higher) token; never retry the same token."""
        await self._deregister(atsign, self.cfg.consul.request_timeout)
        await self.runner.stop(atsign, timeout=self.cfg.runner.stop_timeout)
        self.state.workloads.pop(atsign, None)
        released = False
        with contextlib.suppress(LeaseError, TimeoutError):
            released = await self._release(claim)
        pause = max(1.0, self.timing.renew_interval)
        self.state.excluded[atsign] = self.clock() + pause
        self.state.stale_tokens[atsign] = claim.token
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

    async def _probe_one(self, atsign: str) -> bool:
        try:
            result = await self.runner.probe(
                atsign, timeout=min(2.0, self.cfg.timing.probe_interval * 2)
            )
            healthy, detail = result.healthy, result.detail
        except Exception as exc:
            healthy, detail = False, f"probe error: {exc!r}"
        self.state.health[atsign] = Health(healthy, detail, time.time())
        if atsign not in self.registrar.registered:
            return healthy
        try:
            if healthy:
                await self.registrar.pass_probe(atsign, detail)
            else:
                await self.registrar.fail_probe(atsign, detail)
            if self._session_usable():
                await self.registrar.pass_alive(atsign)
        except RegistrationError as exc:
            if self.metrics is not None:
                self.metrics.consul_errors.labels("check").inc()
            log.warning("event=check-update-failed atsign=%s error=%s", atsign, exc)
            if _registration_gone(exc):
                # The agent lost the service (e.g. it restarted): register again next cycle.
                self.registrar.registered.pop(atsign, None)
                self.wake.set()
        return healthy

    async def _ask_failback(self, a: cycle.RequestFailback) -> str:
        self.state.failback_asked[a.atsign] = self.clock()
        if not a.owner_api:
            return f"cannot ask {a.owner_node} for {a.atsign}: no API address in its claim"
        url = f"{a.owner_api}/handoff"
        timeout = aiohttp.ClientTimeout(total=self.cfg.consul.request_timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(
                url, json={"atsign": a.atsign, "reason": f"failback to {self.me.name}"}
            ) as resp,
        ):
            body = await resp.text()
        return f"asked {a.owner_node} to hand back {a.atsign}: {resp.status} {body[:80]}"

    # --- side tasks ----------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Write the heartbeat whenever the session's deadline moves (i.e. after a renewal)."""
        interval = min(0.05, self.timing.renew_interval / 4)
        while True:
            s = self.session
            if s is not None and not s.lost.is_set():
                if s.renew_deadline != self._last_deadline:
                    self.write_heartbeat()
                if self.clock() >= s.renew_deadline:
                    self.wake.set()
            await asyncio.sleep(interval)

    async def probe_loop(self) -> None:
        """Probe every registered atServer each ``probe_interval`` and update its checks."""
        sem = asyncio.Semaphore(32)

        async def one(atsign: str) -> None:
            async with sem:
                await self._probe_one(atsign)

        while True:
            await asyncio.sleep(self.cfg.timing.probe_interval)
            targets = [
                a
                for a, w in self.state.workloads.items()
                if w.state is WorkloadState.RUNNING and a in self.registrar.registered
            ]
            if targets and self._session_usable():
                await asyncio.gather(*(one(a) for a in targets))

    async def watch_loop(self) -> None:
        """Wake the cycle on every claim change."""
        while True:
            try:
                async for _event in self.backend.watch():
                    self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.metrics is not None:
                    self.metrics.dcs_errors.labels("watch").inc()
                log.warning("event=watch-failed error=%r", exc)
            await asyncio.sleep(self.timing.renew_interval)

    # --- control (HTTP API and CLI) ------------------------------------------------------

    def request_drain(self) -> str:
        self.state.draining = True
        self.wake.set()
        return "draining: handing off every atSign one by one"

    def request_resume(self) -> str:
        self.state.draining = False
        self.state.excluded.clear()
        self.wake.set()
        return "resumed: claiming again"

    def request_handoff(self, atsign: str) -> str:
        claims = self.state.claims or {}
        c = claims.get(atsign)
        s = self.session
        if c is None or s is None or c.session_id != s.session_id:
            raise LookupError(f"{atsign} is not held by this node ({self.me.name})")
        self.state.handoffs.add(atsign)
        self.wake.set()
        return f"handing off {atsign}"

    @property
    def ready(self) -> bool:
        return self._ready and self._session_usable()

    def held(self) -> list[str]:
        s = self.session
        if s is None or self.state.claims is None:
            return []
        return sorted(a for a, c in self.state.claims.items() if c.session_id == s.session_id)

    def status(self) -> dict[str, Any]:
        """This node's view: session, claims, workloads, health, handoffs, last sentence."""
        s = self.session
        now = self.clock()
        claims = self.state.claims or {}
        workloads = []
        for atsign, w in sorted(self.state.workloads.items()):
            h = self.state.health.get(atsign)
            c = claims.get(atsign)
            workloads.append(
                {
                    "atsign": atsign,
                    "fencing_token": w.fencing_token,
                    "claim_token": c.token if c else None,
                    "owner": c.info.node if c else None,
                    "port": w.port,
                    "state": w.state.value,
                    "registered": atsign in self.registrar.registered,
                    "healthy": h.healthy if h else None,
                    "detail": h.detail if h else "",
                    "since": self.state.since.get(atsign, w.started_at),
                }
            )
        return {
            "node": self.me.name,
            "cloud": self.me.cloud,
            "ready": self.ready,
            "session": {
                "id": s.session_id if s else None,
                "state": s.state.value if s else "none",
                "deadline_in_s": round(s.renew_deadline - now, 3) if s else None,
            },
            "draining": self.state.draining,
            "drained": self.state.draining and not self.held() and not self.state.in_flight,
            "claims_held": self.held(),
            "workloads": workloads,
            "handoffs_in_flight": [r.to_json() for r in self.state.in_flight.values()],
            "handoff_reports": [r.to_json() for r in self.state.reports],
            "stale_tokens_refused": dict(self.state.stale_tokens),
            "last_cycle": self.state.last_sentence,
            "cycles": self.state.cycles,
        }

    # --- main loop -----------------------------------------------------------------------

    async def _wait(self, plan: cycle.Plan | None, stop: asyncio.Event) -> None:
        now = self.clock()
        timeout = self.timing.renew_interval
        if self._retry_soon:
            self._retry_soon = False
            timeout = min(timeout, CLAIM_RETRY_INTERVAL)
        if self.state.in_flight:
            # A handoff is done when the atSign passes elsewhere: look often, so the reported
            # unavailability is accurate and a drain moves on at once.
            timeout = min(timeout, HANDOFF_POLL_INTERVAL)
        if plan is not None and plan.wake_at is not None:
            timeout = min(timeout, max(0.0, plan.wake_at - now))
        s = self.session
        if s is not None and not s.lost.is_set() and self.state.workloads:
            timeout = min(timeout, max(0.0, s.renew_deadline - now))
        waits: list[Awaitable[Any]] = [self.wake.wait(), stop.wait()]
        if s is not None:
            waits.append(s.lost.wait())
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
        self.wake.clear()
        await asyncio.sleep(0.02)  # let a burst of watch events arrive together

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: keep a session, run cycles. Then shut down cleanly."""
        tasks = [
            asyncio.create_task(self.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.probe_loop(), name="probe"),
            asyncio.create_task(self.watch_loop(), name="watch"),
        ]
        try:
            with contextlib.suppress(RegistrationError):
                await self.registrar.refresh()
            plan: cycle.Plan | None = None
            while not stop.is_set():
                if self.session is not None and (
                    self.session.lost.is_set() or self.session.state is SessionState.LOST
                ):
                    sentence, _ = await self.run_cycle()  # fences everything
                    log.info("event=cycle sentence=%r", sentence)
                    await self._drop_session()
                if self.session is None and not await self.open_session():
                    try:
                        sentence, _ = await self.run_cycle()  # no session: hold nothing
                        log.info("event=cycle sentence=%r", sentence)
                    except Exception as exc:
                        log.exception("event=cycle-failed error=%r", exc)
                    await asyncio.wait(
                        [asyncio.ensure_future(stop.wait())], timeout=self.timing.renew_interval
                    )
                    continue
                try:
                    sentence, plan = await self.run_cycle()
                except Exception as exc:  # log and go on: the next snapshot starts over
                    log.exception("event=cycle-failed error=%r", exc)
                    plan = None
                else:
                    log.info("event=cycle sentence=%r", sentence)
                    self._ready = True
                await self._wait(plan, stop)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Deregister and stop everything, release the claims, tell the fence we are done."""
        workloads = await self.runner.list()
        for w in workloads:
            await self._deregister(w.atsign, self.cfg.consul.request_timeout)
        await asyncio.gather(
            *(self.runner.stop(w.atsign, timeout=self.cfg.runner.stop_timeout) for w in workloads),
            return_exceptions=True,
        )
        s = self.session
        if s is not None:
            try:
                await within(s.close(revoke=True), self.timing.request_timeout * 2)
            except Exception as exc:
                log.info("event=session-close-failed error=%r", exc)
        self.session = None
        forget_record(self.session_record_path)
        self.write_heartbeat(state="stopped")
        with contextlib.suppress(Exception):
            await self.registrar.close()
        log.info("event=shutdown stopped=%d", len(workloads))
