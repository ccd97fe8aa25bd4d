"""Prometheus metrics of one supervisor, on an injected registry (never the global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FAILOVER_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 120)


class SupervisorMetrics:
    """Counters and histograms updated by the daemon; gauges computed at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        claims_held: Callable[[], float],
        workloads_running: Callable[[], float],
        session_alive: Callable[[], float],
        draining: Callable[[], float],
    ) -> None:
        self.registry = registry
        g = Gauge(
            "atfailover_claims_held", "atSign claims this node's session holds", registry=registry
        )
        g.set_function(claims_held)
        g = Gauge(
            "atfailover_workloads_running",
            "atServers running on this node",
            registry=registry,
        )
        g.set_function(workloads_running)
        g = Gauge("atfailover_session_alive", "1 while the DCS session is alive", registry=registry)
        g.set_function(session_alive)
        g = Gauge("atfailover_draining", "1 while the node is drained", registry=registry)
        g.set_function(draining)
        self.takeovers = Counter(
            "atfailover_takeovers",
            "atSigns this node claimed and started after another owner lost them",
            registry=registry,
        )
        self.starts = Counter(
            "atfailover_workload_starts", "atServer starts on this node", registry=registry
        )
        self.self_fencings = Counter(
            "atfailover_self_fencings",
            "workloads stopped because this node's claim or session was lost",
            ["reason"],
            registry=registry,
        )
        self.handoffs = Counter(
            "atfailover_handoffs", "planned handoffs away from this node", registry=registry
        )
        self.failover_seconds = Histogram(
            "atfailover_failover_seconds",
            "seconds from first seeing an atSign vacant to its atServer passing here",
            buckets=FAILOVER_BUCKETS,
            registry=registry,
        )
        self.renewal_latency = Histogram(
            "atfailover_renewal_gap_seconds",
            "seconds between successive successful session renewals seen by the supervisor",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=registry,
        )
        self.dcs_errors = Counter(
            "atfailover_dcs_errors", "DCS calls that failed or timed out", ["op"], registry=registry
        )
        self.consul_errors = Counter(
            "atfailover_consul_errors", "Consul agent calls that failed", ["op"], registry=registry
        )
        self.cycles = Counter("atfailover_cycles", "decision cycles run", registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
