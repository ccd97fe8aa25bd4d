"""Who owns what, as an operator sees it: DCS claims, Consul health, the directory's answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from rich.table import Table

from chaos.atclient import AtError, client_ssl_context, lookup
from chaos.cluster import Cluster
from leases import Backend, Claim, open_backend


@dataclass(frozen=True)
class OwnerRow:
    atsign: str
    owner: str | None
    cloud: str | None
    token: int | None
    health: str
    """``passing``, ``critical``, or ``unregistered``."""
    directory: str
    """The directory's answer (``host:port (node)``), ``null``, or the error."""

    @property
    def served(self) -> bool:
        return self.health == "passing" and self.directory.startswith("127.")


class Observer:
    """Reads the cluster's state from the outside (never from a supervisor's memory)."""

    def __init__(self, cluster: Cluster, request_timeout: float = 2.0) -> None:
        self.cluster = cluster
        self.ssl_ctx = client_ssl_context(cluster.ca.cert_path)
        self.request_timeout = request_timeout
        self._backend: Backend | None = None

    def _open(self) -> Backend:
        if self._backend is None:
            c = self.cluster
            if c.spec.backend == "etcd":
                assert c.etcd is not None
                self._backend = open_backend(
                    "etcd",
                    endpoints=c.etcd.endpoints,
                    prefix=c.prefix,
                    request_timeout=self.request_timeout,
                )
            else:
                self._backend = open_backend(
                    "consul",
                    url=c.consul_url,
                    prefix=c.prefix,
                    request_timeout=self.request_timeout,
                )
        return self._backend

    async def close(self) -> None:
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.close()
            self._backend = None

    async def claims(self) -> dict[str, Claim] | None:
        try:
            return await asyncio.wait_for(self._open().owners(), self.request_timeout * 2)
        except Exception:
            return None

    def node_of_port(self, port: int) -> str:
        for node in self.cluster.nodes:
            low, high = node.port_range
            if low <= port <= high:
                return node.name
        return "?"

    async def _directory(self, atsign: str) -> str:
        try:
            where = await lookup(
                *self.cluster.directory_address, atsign, self.ssl_ctx, self.request_timeout
            )
        except AtError as exc:
            return f"error: {exc}"
        if where is None:
            return "null"
        return f"{where[0]}:{where[1]} ({self.node_of_port(where[1])})"

    async def snapshot(self) -> list[OwnerRow]:
        claims = await self.claims()
        try:
            health = await asyncio.to_thread(self.cluster.health)
        except OSError:
            health = {}
        atsigns = [a.atsign for a in self.cluster.atsigns]
        answers = await asyncio.gather(*(self._directory(a) for a in atsigns))
        rows = []
        for atsign, answer in zip(atsigns, answers, strict=True):
            c = (claims or {}).get(atsign)
            h = health.get(atsign)
            state = "unregistered" if h is None else ("passing" if h["passing"] else "critical")
            rows.append(
                OwnerRow(
                    atsign=atsign,
                    owner=c.info.node if c else ("?" if claims is None else None),
                    cloud=c.info.cloud if c else None,
                    token=c.token if c else None,
                    health=state,
                    directory=answer,
                )
            )
        return rows


def owner_table(rows: list[OwnerRow], title: str = "") -> Table:
    """A rich table of :class:`OwnerRow` s."""
    table = Table(title=title or time.strftime("who owns what — %H:%M:%S"))
    for col in ("atSign", "owner", "cloud", "token", "health (Consul)", "directory answer"):
        table.add_column(col)
    for r in rows:
        colour = "green" if r.health == "passing" else "red"
        table.add_row(
            r.atsign,
            r.owner or "-",
            r.cloud or "-",
            str(r.token) if r.token is not None else "-",
            f"[{colour}]{r.health}[/{colour}]",
            r.directory,
        )
    return table
