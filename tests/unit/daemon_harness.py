"""In-memory fakes for driving :class:`supervisor.daemon.Supervisor` in unit tests.

The fakes keep the contracts of the real parts (``leases.base``, the ``Runner``
protocol, the registrar's methods) so a test can construct a real ``Supervisor``,
run its cycles or its main loop, and break one part at a time: a DCS outage, a
runner that raises, a slow start, a claim taken by another node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atserver_runner.base import ProbeResult, Workload, WorkloadSpec, WorkloadState
from atserver_runner.paths import atsign_dir
from leases.base import (
    Backend,
    Claim,
    ClaimEvent,
    ClaimEventKind,
    ClaimInfo,
    DCSUnavailable,
    Generation,
    GenerationStamp,
    Session,
    SessionLost,
    SessionState,
    Timing,
)
from leases.records import AtSignRecord, RecordEvent
from supervisor.config import SupervisorConfig
from supervisor.daemon import Supervisor
from supervisor.registration import Instance


class FakeDCS:
    """The shared claim store: atSign -> Claim, with strictly increasing tokens."""

    def __init__(self) -> None:
        self.claims: dict[str, Claim] = {}
        self.generations: dict[str, Generation] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.records: dict[str, AtSignRecord] = {}
        self.records_changed = asyncio.Event()
        self.revision = 100
        self.sessions: dict[str, FakeSession] = {}
        self.changed = asyncio.Event()

    def next_token(self) -> int:
        self.revision += 1
        return self.revision

    def put(self, atsign: str, session_id: str, node: str, cloud: str = "B", **extra: str) -> Claim:
        """Make ``session_id`` (another node, usually) hold the atSign."""
        c = Claim(
            atsign, self.next_token(), session_id, ClaimInfo(node=node, cloud=cloud, extra=extra)
        )
        self.claims[atsign] = c
        self.changed.set()
        return c

    def drop(self, atsign: str) -> None:
        self.claims.pop(atsign, None)
        self.changed.set()

    def stamp(
        self, atsign: str, token: int, node: str, g: GenerationStamp, session: str = ""
    ) -> bool:
        """Check and write the generation record as the real claim transaction does."""
        cur = self.generations.get(atsign)
        if (cur.token if cur else 0) != g.expected:
            return False
        self.generations[atsign] = Generation(
            atsign,
            token,
            node,
            g.cloud,
            g.dir_id,
            g.prev,
            time.time(),
            client=g.client,
            session=session,
        )
        return True


class FakeSession(Session):
    """A session that is ALIVE until :meth:`lose` (no renew loop; its deadline is far)."""

    def __init__(self, dcs: FakeDCS, node: str, timing: Timing, sid: str) -> None:
        self.dcs = dcs
        self.node = node
        self.timing = timing
        self._sid = sid
        self._lost = asyncio.Event()
        self._state = SessionState.ALIVE
        self.closed = False
        self.claim_delay = 0.0
        self.lost_answers = 0
        """Claims that commit and then time out for the caller (a lost answer)."""

    @property
    def session_id(self) -> str:
        return self._sid

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def renew_deadline(self) -> float:
        return 0.0 if self._state is SessionState.LOST else time.monotonic() + 3600

    @property
    def lost(self) -> asyncio.Event:
        return self._lost

    def lose(self) -> None:
        self._state = SessionState.LOST
        self._lost.set()
        self.dcs.nodes.pop(self.node, None)
        for a in [a for a, c in self.dcs.claims.items() if c.session_id == self._sid]:
            self.dcs.drop(a)

    async def claim(
        self, atsign: str, info: ClaimInfo, *, generation: GenerationStamp | None = None
    ) -> Claim | None:
        if self._state is SessionState.LOST:
            raise SessionLost(f"session {self._sid} lost")
        if self.claim_delay:
            await asyncio.sleep(self.claim_delay)
        cur = self.dcs.claims.get(atsign)
        if cur is not None:
            return cur if cur.session_id == self._sid else None
        token = self.dcs.revision + 1
        if generation is not None and not self.dcs.stamp(
            atsign, token, info.node, generation, self._sid
        ):
            return None
        c = Claim(atsign, self.dcs.next_token(), self._sid, info)
        self.dcs.claims[atsign] = c
        if self.lost_answers:
            self.lost_answers -= 1
            self.dcs.changed.set()  # the claims watch still sees it
            raise TimeoutError("the claim's answer was lost")
        return c

    async def publish_node(self, record: Mapping[str, Any]) -> None:
        self.dcs.nodes[self.node] = dict(record)

    async def release(self, claim: Claim) -> bool:
        cur = self.dcs.claims.get(claim.atsign)
        if cur is None or cur.session_id != self._sid or cur.token != claim.token:
            return False
        del self.dcs.claims[claim.atsign]
        return True

    async def close(self, *, revoke: bool = True) -> None:
        self.closed = True
        self.lose()


class FakeBackend(Backend):
    """A DCS that can be made unreachable (``down = True``)."""

    min_ttl = 2.0

    def __init__(self, dcs: FakeDCS | None = None) -> None:
        self.dcs = dcs or FakeDCS()
        self.down = False
        self.opened: list[FakeSession] = []

    def _check(self) -> None:
        if self.down:
            raise DCSUnavailable("fake DCS is down")

    async def open_session(self, node: str, timing: Timing) -> FakeSession:
        self._check()
        s = FakeSession(self.dcs, node, timing, f"s{len(self.opened) + 1}")
        self.opened.append(s)
        return s

    async def resume_session(self, node: str, timing: Timing, session_id: str) -> Session | None:
        self._check()
        return None

    async def owner(self, atsign: str) -> Claim | None:
        self._check()
        return self.dcs.claims.get(atsign)

    async def owners(self) -> dict[str, Claim]:
        self._check()
        return dict(self.dcs.claims)

    async def generation(self, atsign: str) -> Generation | None:
        self._check()
        return self.dcs.generations.get(atsign)

    async def generations(self) -> dict[str, Generation]:
        self._check()
        return dict(self.dcs.generations)

    async def accept_generation(
        self, atsign: str, expected: int, node: str, dir_id: str, prev: int
    ) -> Generation | None:
        self._check()
        if atsign in self.dcs.claims:
            return None
        token = self.dcs.next_token()
        if not self.dcs.stamp(atsign, token, node, GenerationStamp(expected, dir_id, prev)):
            return None
        return self.dcs.generations[atsign]

    async def nodes(self) -> dict[str, dict[str, Any]]:
        self._check()
        return dict(self.dcs.nodes)

    async def atsign_records(self) -> tuple[dict[str, AtSignRecord], dict[str, str]]:
        self._check()
        return dict(self.dcs.records), {}

    async def atsign_record(self, atsign: str) -> AtSignRecord | None:
        self._check()
        return self.dcs.records.get(atsign)

    async def write_atsign_records(
        self, put: Sequence[AtSignRecord], delete: Sequence[str] = ()
    ) -> None:
        self._check()
        for r in put:
            self.dcs.records[r.atsign] = r
        for a in delete:
            self.dcs.records.pop(a, None)
        self.dcs.records_changed.set()

    async def watch_atsign_records(self) -> AsyncIterator[RecordEvent]:
        while True:  # a RESYNC per change: the feed must diff it
            yield RecordEvent(ClaimEventKind.RESYNC, snapshot=dict(self.dcs.records))
            await self.dcs.records_changed.wait()
            self.dcs.records_changed.clear()

    async def watch(self) -> AsyncIterator[ClaimEvent]:
        yield ClaimEvent(ClaimEventKind.RESYNC, snapshot=dict(self.dcs.claims))
        while True:
            await self.dcs.changed.wait()
            self.dcs.changed.clear()
            yield ClaimEvent(ClaimEventKind.RESYNC, snapshot=dict(self.dcs.claims))

    async def close(self) -> None:
        return None


@dataclass
class FakeRunner:
    """Workloads in a dict; ``start_delay`` makes starts slow; ``broken`` makes every call
    raise (a Docker engine that errors)."""

    node: str = "a1"
    workloads: dict[str, Workload] = field(default_factory=dict)
    start_delay: float = 0.0
    broken: Exception | None = None
    in_flight: int = 0
    """Starts that began and have not returned (or been cancelled) yet."""
    started: list[tuple[str, int]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    exits: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def start(self, spec: WorkloadSpec) -> Workload:
        self.in_flight += 1
        try:
            if self.start_delay:
                await asyncio.sleep(self.start_delay)
            w = Workload(
                spec.atsign,
                self.node,
                spec.fencing_token,
                spec.host,
                spec.port,
                WorkloadState.RUNNING,
                f"fake:{spec.atsign}",
                started_at=time.time(),
            )
            self.workloads[spec.atsign] = w
            self.started.append((spec.atsign, spec.fencing_token))
            return w
        finally:
            self.in_flight -= 1

    async def stop(self, atsign: str, timeout: float = 10.0) -> bool:
        if self.broken is not None:
            raise self.broken
        w = self.workloads.pop(atsign, None)
        if w is not None:
            self.stopped.append(atsign)
        return w is not None and w.state is WorkloadState.RUNNING

    async def list(self) -> list[Workload]:
        if self.broken is not None:
            raise self.broken
        return list(self.workloads.values())

    async def inspect(self, atsign: str) -> Workload | None:
        if self.broken is not None:
            raise self.broken
        return self.workloads.get(atsign)

    async def probe(self, atsign: str, timeout: float = 2.0) -> ProbeResult:
        w = self.workloads.get(atsign)
        if w is None or w.state is not WorkloadState.RUNNING:
            return ProbeResult(False, f"{atsign}: not running")
        return ProbeResult(True, f"{atsign} answered info:brief token={w.fencing_token}")

    def crash(self, atsign: str, code: int = 1) -> None:
        w = self.workloads[atsign]
        self.workloads[atsign] = replace(w, state=WorkloadState.STOPPED, exit_code=code)
        self.exits.put_nowait(atsign)

    async def events(self) -> AsyncIterator[str]:
        while True:
            yield await self.exits.get()


class FakeRegistrar:
    """The registrar's surface, in memory; ``passing_elsewhere`` feeds :meth:`health`."""

    def __init__(self, node: str = "a1") -> None:
        self.node = node
        self.registered: dict[str, Instance] = {}
        self.passing_elsewhere_nodes: dict[str, str] = {}
        self.closed = False

    async def register(self, inst: Instance, timeout: float | None = None) -> None:
        self.registered[inst.atsign] = inst

    async def deregister(self, atsign: str, timeout: float | None = None) -> bool:
        return self.registered.pop(atsign, None) is not None

    async def report_probe(self, atsign: str, healthy: bool, detail: str) -> bool:
        return True

    async def deregister_all(self, atsigns: list[str], timeout: float | None = None) -> int:
        return sum([await self.deregister(a) for a in atsigns])

    async def passing_elsewhere(self, atsign: str) -> str | None:
        return self.passing_elsewhere_nodes.get(atsign)

    async def refresh(self) -> dict[str, Instance]:
        return dict(self.registered)

    async def health(self, passing_only: bool = False) -> list[dict[str, Any]]:
        return [
            {"Service": {"Meta": {"atsign": a, "node": n}}, "Checks": []}
            for a, n in self.passing_elsewhere_nodes.items()
        ]

    async def close(self) -> None:
        self.closed = True


def node_config(
    tmp_path: Path, *, atsigns: list[dict[str, Any]], **sections: Any
) -> SupervisorConfig:
    """A valid node config for node a1 (cloud A) beside b1 (cloud B); sections override."""
    data: dict[str, Any] = {
        "node": {"name": "a1", "cloud": "A", "address": "127.0.0.1"},
        "dcs": {"backend": "etcd", "prefix": "t", "etcd": {"endpoints": ["127.0.0.1:1"]}},
        "timing": {"ttl": 6, "probe_interval": 1},
        "consul": {"url": "http://127.0.0.1:1"},
        "runner": {
            "kind": "process",
            "command": ["true"],
            "port_range": [30000, 30999],
            "data_root": str(tmp_path / "data"),
            "state_dir": str(tmp_path / "state"),
            "start_timeout": 2,
        },
        "placement": {"rank_delay": 0},
        "inventory": {
            "nodes": [{"name": "a1", "cloud": "A"}, {"name": "b1", "cloud": "B"}],
            "atsigns": atsigns,
        },
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return SupervisorConfig.model_validate(data)


@dataclass
class Harness:
    """A real Supervisor on fakes, plus handles on each fake."""

    sup: Supervisor
    backend: FakeBackend
    runner: FakeRunner
    registrar: FakeRegistrar

    @property
    def dcs(self) -> FakeDCS:
        return self.backend.dcs

    @property
    def session(self) -> FakeSession:
        proxy = self.sup.session
        assert proxy is not None
        s = proxy.inner
        assert isinstance(s, FakeSession)
        return s

    async def sync(self) -> None:
        """Feed the caches what the real watch and runner events would have delivered."""
        sup = self.sup
        event = ClaimEvent(ClaimEventKind.RESYNC, snapshot=dict(self.dcs.claims))
        cache = sup.ctx.claims
        changed = cache.apply(event)
        sup.view.changed(cache.claims, changed, cache.synced)
        sup.mark(await sup.ctx.workloads.refresh())
        sup.mark(sup.guard.changed())

    async def cycle(self) -> str:
        """One full cycle on what the fakes hold now (as a resync would see it)."""
        await self.sync()
        sentence, _ = await self.sup.run_cycle(None)
        await self.sup.ctx.handoffs.check()  # what the tracker's task would do meanwhile
        return sentence


async def make_harness(
    tmp_path: Path,
    atsigns: Sequence[str | dict[str, Any]],
    *,
    open_session: bool = True,
    configure: Callable[[FakeBackend, FakeRunner, FakeRegistrar], None] | None = None,
    **sections: Any,
) -> Harness:
    """A Supervisor for node a1 with an open session (unless ``open_session=False``)."""
    entries = [{"atsign": a} if isinstance(a, str) else a for a in atsigns]
    cfg = node_config(tmp_path, atsigns=entries, **sections)
    backend, runner, registrar = FakeBackend(), FakeRunner(), FakeRegistrar()
    if configure is not None:
        configure(backend, runner, registrar)
    sup = Supervisor(
        cfg,
        backend=backend,
        threaded_keeper=False,
        runner=runner,
        registrar=registrar,  # type: ignore[arg-type]
        spec_builder=lambda a, port, token: WorkloadSpec(
            atsign=a,
            node="a1",
            port=port,
            data_dir=atsign_dir(cfg.runner.data_root, a),
            fencing_token=token,
        ),
    )
    sup.ctx.prober.pool = None  # probe through the fake runner, not over the network
    await sup.ctx.storage.check()  # what run() does first
    if open_session:
        assert await sup.open_session()
    return Harness(sup, backend, runner, registrar)
