"""Prometheus metrics of one supervisor, on an injected registry (never the global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

FAILOVER_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 120)

# Label values exported at 0 from the start: a counter that first appears at 1 has no
# increase() in Prometheus, so an alert on the first error or fencing would never fire.
DCS_ERROR_OPS = (
    "claim",
    "open_session",
    "generation",
    "watch",
    "node_record",
    "inventory_watch",
    "members",
)
CONSUL_ERROR_OPS = ("check", "deregister", "node_check", "refresh")
SELF_FENCING_REASONS = ("claim", "session")
STORAGE_FENCE_RESULTS = ("fenced", "failed")
PROBE_RESULTS = ("passing", "failing")


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
        consul_requests: Callable[[], float] = lambda: 0.0,
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
        g = Gauge(
            "atfailover_consul_agent_requests",
            "requests this node's supervisor made to its Consul agent (a running count)",
            registry=registry,
        )
        g.set_function(consul_requests)
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
        self.session_rechecks = Counter(
            "atfailover_session_rechecks",
            "immediate renewals asked for because this node's own claim was deleted without a "
            "release of its own (a revoked etcd lease shows this way first)",
            registry=registry,
        )
        self.api_refusals = Counter(
            "atfailover_api_refusals",
            "node API calls refused: status 401 (no or unknown credential), 403 (not this role's)",
            ["path", "status"],
            registry=registry,
        )
        self.cycles = Counter("atfailover_cycles", "decision cycles run", registry=registry)
        self.stale_data_refusals = Counter(
            "atfailover_stale_data_refusals",
            "atSigns this node refused to start because its data dir is not their latest",
            registry=registry,
        )
        self.storage_ready = Gauge(
            "atfailover_storage_ready",
            "1 while runner.data_root passes its readiness probe",
            registry=registry,
        )
        self.storage_fences = Counter(
            "atfailover_storage_fences",
            "storage-layer fences of a lost owner's CephFS client before a takeover",
            ["result"],
            registry=registry,
        )
        self.storage_fence_seconds = Histogram(
            "atfailover_storage_fence_seconds",
            "seconds an eviction and blocklisting of a lost owner's client took",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.action_failures = Counter(
            "atfailover_action_failures",
            "cycle actions that failed (each is named in its cycle's sentence)",
            ["action"],
            registry=registry,
        )
        self.cycle_failures = Counter(
            "atfailover_cycle_failures",
            "cycles that could not run to the end (the error is logged)",
            registry=registry,
        )

        # For the dashboard and the alerts (docs/observability.md).
        self.probes = Counter(
            "atfailover_probes",
            "at-protocol probes of this node's atServers, by result",
            ["result"],
            registry=registry,
        )
        self.inventory_atsigns = Gauge(
            "atfailover_inventory_atsigns",
            "atSigns in the inventory this node serves from (served + unserved)",
            registry=registry,
        )
        self.renew_deadline = Gauge(
            "atfailover_renew_deadline_seconds",
            "timing.renew_deadline: no renewal for this long and the node fences itself",
            registry=registry,
        )
        for counter, values in (
            (self.dcs_errors, DCS_ERROR_OPS),
            (self.consul_errors, CONSUL_ERROR_OPS),
            (self.self_fencings, SELF_FENCING_REASONS),
            (self.storage_fences, STORAGE_FENCE_RESULTS),
            (self.probes, PROBE_RESULTS),
        ):
            for value in values:
                counter.labels(value)
        # process_cpu_seconds_total, process_resident_memory_bytes, ... of this process.
        ProcessCollector(registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
