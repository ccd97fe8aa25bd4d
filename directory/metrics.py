"""Prometheus metrics of one atDirectory replica, on an injected registry."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, Summary
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


class DirectoryMetrics:
    """Counters and gauges of the directory; register on ``registry`` (never the global one).

    ``map_age_seconds``, ``map_atsigns`` and ``connections_open`` are computed at scrape
    time from the callables given to :meth:`bind_map` / :meth:`bind_connections`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lookups = Counter(
            "atdirectory_lookups", "Lookup lines answered (hits + misses)", registry=registry
        )
        self.hits = Counter(
            "atdirectory_hits", "Lookups answered with host:port", registry=registry
        )
        self.misses = Counter("atdirectory_misses", "Lookups answered with null", registry=registry)
        self.invalid_lines = Counter(
            "atdirectory_invalid_lines",
            "Lines that named no atSign (answered with an error)",
            ["reason"],
            registry=registry,
        )
        self.connections = Counter(
            "atdirectory_connections", "Connections accepted after the TLS handshake",
            registry=registry,
        )  # fmt: skip
        self.connections_rejected = Counter(
            "atdirectory_connections_rejected",
            "Connections refused because max_connections were open",
            registry=registry,
        )
        self.disconnects = Counter(
            "atdirectory_disconnects",
            "Connections closed, by cause",
            ["cause"],
            registry=registry,
        )
        self.consul_errors = Counter(
            "atdirectory_consul_errors",
            "Failed Consul health queries (the last map stays in use)",
            registry=registry,
        )
        self.consul_syncs = Counter(
            "atdirectory_consul_syncs",
            "Service lists from Consul applied to the map (one per change of a service)",
            registry=registry,
        )
        self.consul_up = Gauge(
            "atdirectory_consul_up",
            "1 when the last Consul health query succeeded, else 0",
            registry=registry,
        )
        self.instances_rejected = Gauge(
            "atdirectory_instances_rejected",
            "Passing instances ignored in the current map because of invalid meta",
            ["reason"],
            registry=registry,
        )
        self.instances_shadowed = Gauge(
            "atdirectory_instances_shadowed",
            "Passing instances not answered because another one has a higher fencing token",
            registry=registry,
        )
        self.instances_masked = Gauge(
            "atdirectory_instances_masked",
            "atSigns answered null (or by a lower token) because a check failed after their "
            "service's last list",
            registry=registry,
        )
        self.instances_duplicate = Gauge(
            "atdirectory_instances_duplicate",
            "Passing instances with the same atSign and token as the answered one (the same "
            "claim registered in several layouts, as during a migration)",
            registry=registry,
        )
        self.services_followed = Gauge(
            "atdirectory_services_followed",
            "Consul services whose passing instances are followed (legacy and shards)",
            registry=registry,
        )
        self.services_unsynced = Gauge(
            "atdirectory_services_unsynced",
            "Followed services that have not delivered a first list yet",
            registry=registry,
        )
        self.instance_changes = Counter(
            "atdirectory_instance_changes",
            "Instances added, changed or removed by the lists applied",
            registry=registry,
        )
        self.list_apply_seconds = Summary(
            "atdirectory_list_apply_seconds",
            "Time to parse and apply one service list (the directory's cost of a change)",
            registry=registry,
        )
        self._map_age = Gauge(
            "atdirectory_map_age_seconds",
            "Seconds since the map was last confirmed by Consul (-1 before the first sync)",
            registry=registry,
        )
        self._map_atsigns = Gauge(
            "atdirectory_map_atsigns", "atSigns answered with host:port now", registry=registry
        )
        self._connections_open = Gauge(
            "atdirectory_connections_open", "Connections open now", registry=registry
        )
        self.connections_limit = Gauge(
            "atdirectory_connections_limit",
            "max_connections: more open connections are refused",
            registry=registry,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, ... of this replica.
        ProcessCollector(registry=registry)

    def bind_map(self, age: Callable[[], float], size: Callable[[], int]) -> None:
        """Compute map age and size at scrape time from these callables."""
        self._map_age.set_function(age)
        self._map_atsigns.set_function(lambda: float(size()))

    def bind_connections(self, open_now: Callable[[], int]) -> None:
        """Compute the open-connection gauge at scrape time."""
        self._connections_open.set_function(lambda: float(open_now()))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` on a separate port."""

    def __init__(
        self,
        metrics: DirectoryMetrics,
        host: str,
        port: int,
        ready: Callable[[], bool],
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._runner is None:
            raise RuntimeError("metrics server is not started")
        for site in self._runner.sites:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                return int(server.sockets[0].getsockname()[1])
        return self._port

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _health_handler(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="no map from Consul yet\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._health_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
