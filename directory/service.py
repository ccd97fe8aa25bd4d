"""One atDirectory replica: Consul watcher + TLS server + metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

from prometheus_client import CollectorRegistry

from directory.catalog import CHECK_STATES, CatalogWatcher, ConsulHealthClient, layout_filter
from directory.config import DirectoryConfig
from directory.logs import log_event
from directory.metrics import DirectoryMetrics, MetricsServer
from directory.server import DirectoryServer, ServerLimits, server_ssl_context
from directory.shards import shard_width

log = logging.getLogger("atdirectory.service")

SPARE_CONNECTIONS = 2
"""Connections to the agent beyond one per query (agent/self at start, a retry's overlap)."""


class ConsulConnectionLimitError(ValueError):
    """The agent would reset some of the directory's long polls (too many connections)."""


def connections_needed(services: int) -> int:
    """HTTP connections one replica holds to its agent: one per list, the two check
    queries, and spares."""
    return services + len(CHECK_STATES) + SPARE_CONNECTIONS


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class DirectoryService:
    """Starts and stops the parts of one replica; replicas share nothing (stateless)."""

    def __init__(self, config: DirectoryConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = DirectoryMetrics(registry or CollectorRegistry())
        services = config.services
        self.connections = connections_needed(len(services))
        self.consul = ConsulHealthClient(
            config.consul,
            token=config.consul_token,
            connect_timeout=config.consul_connect_timeout,
            stale=config.consul_stale,
            connections=self.connections,
            checks_filter=layout_filter(config.service, [shard_width(n) for n in config.shards]),
        )
        self.watcher = CatalogWatcher(
            self.consul,
            self.metrics,
            services=services,
            wait=config.consul_wait,
            list_wait=config.consul_list_wait,
            backoff_initial=config.consul_backoff_initial,
            backoff_max=config.consul_backoff_max,
        )
        self.server = DirectoryServer(
            self.watcher.lookup,
            server_ssl_context(config.cert, config.key),
            self.metrics,
            host=config.host,
            port=config.port,
            limits=ServerLimits(
                max_line_bytes=config.max_line_bytes,
                idle_timeout=config.idle_timeout,
                max_connections=config.max_connections,
                handshake_timeout=config.handshake_timeout,
                write_timeout=config.write_timeout,
            ),
        )
        self.metrics_server = MetricsServer(
            self.metrics, config.metrics_host, config.metrics_port, lambda: self.watcher.synced
        )
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self, first_sync_timeout: float = 5.0) -> None:
        """Start following Consul, then serve (after the first map, or after the timeout:
        answering ``null`` for a while beats refusing connections)."""
        raise_fd_limit(self.config.max_connections + self.connections + 256)
        await self.check_connection_limit()
        self._watch_task = asyncio.create_task(self.watcher.run(), name="consul-watch")
        if not await self.watcher.wait_synced(first_sync_timeout):
            log_event(
                log, logging.WARNING, "serving_without_map", waited=first_sync_timeout,
                consul=self.config.consul,
            )  # fmt: skip
        await self.metrics_server.start()
        await self.server.start()
        log_event(
            log, logging.INFO, "started", port=self.server.port,
            metrics_port=self.metrics_server.port, atsigns=len(self.watcher.index),
            services=len(self.watcher.services),
        )  # fmt: skip

    async def check_connection_limit(self) -> None:
        """Refuse to start when the agent would reset some long polls: Consul allows
        ``limits.http_max_conns_per_client`` (200 by default) connections per address."""
        limit = await self.consul.http_connection_limit()
        if limit is None:
            log_event(
                log, logging.WARNING, "consul_limit_unknown", consul=self.config.consul,
                connections=self.connections,
            )  # fmt: skip
            return
        if self.connections > limit:
            await self.consul.close()
            shards = ",".join(str(n) for n in self.config.shards)
            raise ConsulConnectionLimitError(
                f"shards {shards}: following {len(self.watcher.services)} Consul services "
                f"needs {self.connections} HTTP connections to the agent at "
                f"{self.config.consul}, which allows {limit} per client address "
                f"(limits.http_max_conns_per_client): raise that limit to at least "
                f"{self.connections} plus what else connects from this address, or follow "
                f"fewer shards"
            )

    async def stop(self) -> None:
        """Stop serving and following Consul (every wait bounded)."""
        await self.server.stop()
        await self.metrics_server.stop()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self.consul.close()
        log_event(log, logging.INFO, "stopped")
