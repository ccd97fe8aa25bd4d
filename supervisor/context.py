"""The parts of one node's supervisor, in one place, for the modules that act on them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from atserver_runner.base import Runner
from leases.base import Backend, ClaimInfo, Clock, SessionState, Timing
from supervisor.claim_cache import ClaimCache
from supervisor.config import SupervisorConfig
from supervisor.handoffs import HandoffTracker
from supervisor.keeper import SessionKeeper, SessionProxy
from supervisor.metrics import SupervisorMetrics
from supervisor.placement import NodeRef
from supervisor.prober import Prober
from supervisor.registration import Registrar
from supervisor.specs import PortAllocator, SpecBuilder
from supervisor.state import State
from supervisor.storage import StorageGuard
from supervisor.takeover_fence import TakeoverFence
from supervisor.workloads import WorkloadCache


@dataclass
class NodeContext:
    """What the supervisor's modules share: config, clients, caches and memory."""

    cfg: SupervisorConfig
    timing: Timing
    me: NodeRef
    backend: Backend
    """The main loop's DCS client (watch, reads); claims go through the session."""
    runner: Runner
    registrar: Registrar
    keeper: SessionKeeper
    state: State
    claims: ClaimCache
    workloads: WorkloadCache
    prober: Prober
    handoffs: HandoffTracker
    ports: PortAllocator
    spec_builder: SpecBuilder
    mark: Callable[[Iterable[str] | None], None]
    """Look at these atSigns (``None``: all) in the next cycle, now."""
    retry: Callable[[str, float], None]
    """Look at this atSign again after so many seconds."""
    api_url: str
    storage: StorageGuard
    takeover_fence: TakeoverFence | None = None
    """Set for ``storage.kind: cephfs``: fences a lost owner's client before a takeover."""
    metrics: SupervisorMetrics | None = None
    clock: Clock = time.monotonic

    @property
    def session(self) -> SessionProxy | None:
        return self.keeper.proxy

    def session_usable(self) -> bool:
        s = self.session
        return (
            s is not None
            and s.state is SessionState.ALIVE
            and self.clock() < s.renew_deadline
            and not s.lost.is_set()
        )

    def info(self) -> ClaimInfo:
        return ClaimInfo(
            node=self.cfg.node.name,
            cloud=self.cfg.node.cloud,
            zone=self.cfg.node.zone,
            address=self.cfg.node.address,
            extra={"api": self.api_url, "since": f"{time.time():.3f}"},
        )
