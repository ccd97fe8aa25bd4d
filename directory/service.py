"""One atDirectory replica: Consul watcher + TLS server + metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

from prometheus_client import CollectorRegistry

from directory.catalog import CatalogWatcher, ConsulHealthClient
from directory.config import DirectoryConfig
from directory.logs import log_event
from directory.metrics import DirectoryMetrics, MetricsServer
from directory.server import DirectoryServer, ServerLimits, server_ssl_context

log = logging.getLogger("atdirectory.service")


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
        self.consul = ConsulHealthClient(
            config.consul,
            service=config.service,
            token=config.consul_token,
            connect_timeout=config.consul_connect_timeout,
            stale=config.consul_stale,
        )
        self.watcher = CatalogWatcher(
            self.consul,
            self.metrics,
            wait=config.consul_wait,
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
        raise_fd_limit(self.config.max_connections + 256)
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
            metrics_port=self.metrics_server.port, atsigns=len(self.watcher.current),
        )  # fmt: skip

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
