"""Partitions of one node from the DCS, on loopback, without touching the host's network.

Each node reaches the DCS only through its own TCP relays (one per etcd member, or one for
the Consul HTTP API), run by the harness on 127.0.0.1 in a background thread. Cutting a
node's relays is a partition: bytes stop flowing both ways on open connections (the peer
sees silence, as with dropped packets) and new connections are accepted but never
answered. Healing closes every connection that lived through the cut (clients reconnect,
as after a partition long enough for TCP to give up) and forwards again.

This replaces network namespaces: the nodes, etcd, Consul and the directory all share the
host's loopback, and the project's rule is loopback-only traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_BUFFER = 65536


@dataclass
class _Group:
    name: str
    cut: bool = False
    healed: asyncio.Event = field(default_factory=asyncio.Event)
    conns: set[asyncio.StreamWriter] = field(default_factory=set)
    tainted: set[asyncio.StreamWriter] = field(default_factory=set)
    servers: list[asyncio.Server] = field(default_factory=list)


class RelayHost:
    """A thread running TCP relays grouped by node; :meth:`cut`/:meth:`heal` a group."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relays", daemon=True)
        self._groups: dict[str, _Group] = {}
        self._thread.start()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add(self, group: str, target_port: int) -> int:
        """A relay for ``group`` to 127.0.0.1:``target_port``; returns its listening port."""
        return self._call(self._add(group, target_port))

    async def _add(self, name: str, target_port: int) -> int:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(name)
            group.healed.set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(group, target_port, reader, writer)

        server = await asyncio.start_server(handle, self.host, 0)
        group.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _serve(
        self,
        group: _Group,
        target_port: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        group.conns.add(writer)
        if group.cut:
            group.tainted.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            await group.healed.wait()
            if writer in group.tainted:
                return
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(self.host, target_port), 5.0
                )
            except (OSError, TimeoutError):
                return
            up_writer = upstream
            group.conns.add(upstream)
            await asyncio.gather(
                self._pipe(group, reader, upstream), self._pipe(group, up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    group.conns.discard(w)
                    group.tainted.discard(w)
                    w.close()

    async def _pipe(
        self, group: _Group, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                data = await reader.read(_BUFFER)
                if not data:
                    break
                if group.cut:
                    group.tainted.add(writer)
                    await group.healed.wait()  # the bytes are lost with the connection
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    def cut(self, group: str) -> None:
        """Partition: silence every relay of ``group``."""
        self._call(self._cut(group))

    async def _cut(self, name: str) -> None:
        group = self._groups[name]
        group.cut = True
        group.healed.clear()
        group.tainted |= group.conns

    def heal(self, group: str) -> None:
        """End the partition: drop the connections that lived through it, forward again."""
        self._call(self._heal(group))

    async def _heal(self, name: str) -> None:
        group = self._groups[name]
        group.cut = False
        for w in list(group.tainted):
            w.close()
        group.tainted.clear()
        group.healed.set()

    def stop(self) -> None:
        """Close every relay and stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _stop(self) -> None:
        for group in self._groups.values():
            group.cut = False
            group.healed.set()
            for server in group.servers:
                server.close()
            for w in list(group.conns):
                w.close()
