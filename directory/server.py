"""The asyncio TLS server that answers "where is @alice?" from the current map."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from directory.logs import log_event
from directory.metrics import DirectoryMetrics
from directory.protocol import (
    CONNECTION_LIMIT_ANSWER,
    LINE_END,
    NULL_ANSWER,
    PROMPT,
    Exit,
    Invalid,
    invalid_answer,
    line_too_long_answer,
    parse_line,
)

log = logging.getLogger("atdirectory.server")

# A client that stops reading may hold at most this much of our output in memory.
WRITE_BUFFER_HIGH = 16 * 1024


# asyncio's TLS protocol allocates (and zero-fills) a max_size read buffer per connection:
# 256 KiB by default, i.e. 2.5 GB for 10,000 clients (python/cpython#109534, fixed upstream
# by lazy allocation). A TLS record holds at most 16 KiB, so 32 KiB loses nothing.
TLS_READ_BUFFER = 32 * 1024


def shrink_asyncio_tls_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Cap asyncio's per-connection TLS read buffer for this process (see above)."""
    if asyncio.sslproto.SSLProtocol.max_size > size:
        asyncio.sslproto.SSLProtocol.max_size = size


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Per-connection limits; every wait of the server is bounded by one of these."""

    max_line_bytes: int = 512
    idle_timeout: float = 300.0
    max_connections: int = 10_000
    handshake_timeout: float = 10.0
    write_timeout: float = 10.0
    close_timeout: float = 2.0


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for ``cert``/``key`` (PEM); errors name the file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise ValueError(f"TLS certificate or key not found: {exc.filename}") from exc
    except ssl.SSLError as exc:
        raise ValueError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from exc
    return ctx


class DirectoryServer:
    """Answers atSign lookups over TLS; ``lookup(key)`` returns the whole reply or None.

    A misbehaving client only ever costs its own connection: each read is bounded by
    ``idle_timeout`` and ``max_line_bytes``, each write by ``write_timeout`` and a small
    write buffer, the TLS handshake by ``handshake_timeout``, and connections beyond
    ``max_connections`` are told so and closed.
    """

    def __init__(
        self,
        lookup: Callable[[str], bytes | None],
        ssl_context: ssl.SSLContext,
        metrics: DirectoryMetrics,
        *,
        host: str = "127.0.0.1",
        port: int = 64,
        limits: ServerLimits | None = None,
    ) -> None:
        self._lookup = lookup
        self._ssl = ssl_context
        self._metrics = metrics
        self._host = host
        self._port = port
        self.limits = limits or ServerLimits()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        metrics.bind_connections(lambda: len(self._open))
        metrics.connections_limit.set(self.limits.max_connections)

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("directory server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        """Listen; raises OSError (naming host and port) if the address cannot be bound."""
        shrink_asyncio_tls_buffers()
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self._host,
                self._port,
                ssl=self._ssl,
                limit=self.limits.max_line_bytes,
                ssl_handshake_timeout=self.limits.handshake_timeout,
                ssl_shutdown_timeout=self.limits.close_timeout,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        log_event(log, logging.INFO, "listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Stop accepting, close every open connection, and wait (bounded) for them."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._open):
            writer.close()
        # Python 3.11's Server.wait_closed() does not wait for handlers; wait for them here
        # so none is still running (and then cancelled) when the event loop shuts down.
        pending = set(self._handlers)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.limits.close_timeout + 1.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            # Only stop() cancels handlers. Not re-raised: asyncio 3.11's stream callback
            # calls task.exception() on the finished task, which raises for a cancelled one.
            writer.transport.abort()
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        metrics = self._metrics
        if len(self._open) >= self.limits.max_connections:
            metrics.connections_rejected.inc()
            writer.write(CONNECTION_LIMIT_ANSWER)
            await self._close(writer)
            return
        metrics.connections.inc()
        self._open.add(writer)
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        cause = "server_stopped"
        try:
            cause = await self._serve(reader, writer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log_event(log, logging.DEBUG, "connection_error", error=repr(exc))
            cause = "connection_error"
        finally:
            self._open.discard(writer)
            metrics.disconnects.labels(cause).inc()
            # A client that stopped reading gets no graceful TLS close: drop it now.
            abort = cause in ("write_timeout", "connection_error", "server_stopped")
            await self._close(writer, abort=abort)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Answer lines until the client leaves; returns why the connection ended."""
        metrics = self._metrics
        limits = self.limits
        lookup = self._lookup
        writer.write(PROMPT)
        while True:
            try:
                async with asyncio.timeout(limits.idle_timeout):
                    line = await reader.readuntil(LINE_END)
            except TimeoutError:
                return "idle_timeout"
            except asyncio.IncompleteReadError:
                return "client_closed"
            except asyncio.LimitOverrunError:
                metrics.invalid_lines.labels("line_too_long").inc()
                writer.write(line_too_long_answer(limits.max_line_bytes))
                await self._drain(writer)
                return "line_too_long"
            request = parse_line(line)
            if isinstance(request, Exit):
                return "exit"
            if isinstance(request, Invalid):
                metrics.invalid_lines.labels("syntax").inc()
                log_event(log, logging.DEBUG, "invalid_line", reason=request.reason)
                writer.write(invalid_answer(request.reason))
            else:
                metrics.lookups.inc()
                answer = lookup(request.key)
                if answer is None:
                    metrics.misses.inc()
                    writer.write(NULL_ANSWER)
                else:
                    metrics.hits.inc()
                    writer.write(answer)
            buffered = writer.transport.get_write_buffer_size()
            if buffered > WRITE_BUFFER_HIGH and not await self._drain(writer):
                return "write_timeout"

    async def _drain(self, writer: asyncio.StreamWriter) -> bool:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
        except TimeoutError:
            return False
        return True

    async def _close(self, writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.close_timeout):
                await writer.wait_closed()
