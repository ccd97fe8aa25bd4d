"""Health probe: one at-protocol round trip over TLS, never just a TCP connect.

(docker-proxy accepts TCP on a published port before the app inside listens, so only an
answer from the atServer itself counts.) The probe reads the ``@`` prompt, sends
``info:brief`` and expects ``data:{...}`` back, then ``@exit``. ``info:brief`` is answered
by the real atServer and by the dev atServer, before authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from pathlib import Path

from atserver_runner.base import ProbeResult

PROBE_COMMAND = b"info:brief\n"
MAX_ANSWER_BYTES = 64 * 1024


def probe_ssl_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """Verify against ``ca_file`` (e.g. the cluster CA), or, with ``None``, do not verify.

    Local probes (the runner probing a workload it started on this host) need no
    verification: they check liveness, not identity.
    """
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _read_until(reader: asyncio.StreamReader, done: bytes, limit: int) -> bytes:
    data = b""
    while done not in data:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes: {data[:80]!r}")
        data += chunk
        if len(data) > limit:
            raise ValueError(f"answer longer than {limit} bytes")
    return data


async def probe_atserver(
    host: str,
    port: int,
    *,
    timeout: float = 2.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    expect_atsign: str | None = None,
) -> ProbeResult:
    """Connect with TLS, read the prompt, send ``info:brief``, expect ``data:``; all within
    ``timeout`` seconds. ``expect_atsign``: also fail if the server says it serves another
    atSign (only servers that report ``atSign`` in ``info``, like the dev atServer)."""
    ctx = ssl_context or probe_ssl_context()
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None

    async def round_trip() -> str:
        nonlocal writer
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=ctx,
            server_hostname=server_hostname or (host if ctx.check_hostname else None),
            ssl_handshake_timeout=timeout,
        )
        await _read_until(reader, b"@", 1024)
        writer.write(PROBE_COMMAND)
        await writer.drain()
        answer = await _read_until(reader, b"\n", MAX_ANSWER_BYTES)
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(b"@exit\n")
            await writer.drain()
        return answer.decode("utf-8", errors="replace")

    try:
        answer = await asyncio.wait_for(round_trip(), timeout)
    except TimeoutError:
        return ProbeResult(
            False, f"no at-protocol answer from {host}:{port} within {timeout}s", timeout
        )
    except (OSError, ssl.SSLError, ConnectionError, ValueError) as exc:
        return ProbeResult(
            False, f"{host}:{port}: {type(exc).__name__}: {exc}", time.monotonic() - start
        )
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    return judge_answer(answer, host, port, expect_atsign, time.monotonic() - start)


def judge_answer(
    answer: str, host: str, port: int, expect_atsign: str | None, latency: float
) -> ProbeResult:
    """The probe's verdict on an ``info:brief`` answer."""
    line = answer.lstrip("@").strip().splitlines()[0] if answer.strip() else ""
    if not line.startswith("data:"):
        return ProbeResult(False, f"{host}:{port} answered {line[:120]!r} to info:brief", latency)
    try:
        info = json.loads(line[len("data:") :])
    except ValueError:
        info = {}
    served = info.get("atSign") if isinstance(info, dict) else None
    if expect_atsign is not None and served is not None and served != expect_atsign:
        return ProbeResult(False, f"{host}:{port} serves {served}, not {expect_atsign}", latency)
    token = info.get("fencingToken") if isinstance(info, dict) else None
    extra = f" token={token}" if token is not None else ""
    return ProbeResult(True, f"{host}:{port} answered info:brief{extra}", latency)


class _Held:
    """One kept-open probe connection."""

    def __init__(
        self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.host = host
        self.port = port
        self.reader = reader
        self.writer = writer
        self.uses = 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class ProbePool:
    """Probes over kept-open TLS connections: one handshake per atServer, not per probe.

    A TLS handshake costs the prober about 3.5 ms of CPU here (asyncio), an ``info:brief``
    round trip on an open connection a tenth of that: at a thousand atServers that is the
    difference between most of a core and a few percent. Every ``fresh_every``-th probe
    of an atServer opens a new connection (so the accept path is checked too), and a kept
    connection that fails is tried once more on a new one before the probe fails.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, fresh_every: int = 60) -> None:
        self.ctx = ssl_context or probe_ssl_context()
        self.fresh_every = fresh_every
        self._held: dict[str, _Held] = {}
        self.handshakes = 0

    def __len__(self) -> int:
        return len(self._held)

    async def _open(self, host: str, port: int, timeout: float) -> _Held:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=self.ctx,
            server_hostname=host if self.ctx.check_hostname else None,
            ssl_handshake_timeout=timeout,
        )
        self.handshakes += 1
        held = _Held(host, port, reader, writer)
        try:
            await _read_until(reader, b"@", 1024)
        except BaseException:
            held.close()
            raise
        return held

    async def _ask(self, held: _Held) -> str:
        held.writer.write(PROBE_COMMAND)
        await held.writer.drain()
        data = b""
        # The answer, then the prompt ("\n@"): read both, so the next probe starts clean.
        while not (b"\n" in data and data.endswith(b"@")):
            chunk = await held.reader.read(4096)
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} bytes")
            data += chunk
            if len(data) > MAX_ANSWER_BYTES:
                raise ValueError(f"answer longer than {MAX_ANSWER_BYTES} bytes")
        held.uses += 1
        return data.decode("utf-8", errors="replace")

    async def probe(
        self,
        key: str,
        host: str,
        port: int,
        *,
        timeout: float = 2.0,
        expect_atsign: str | None = None,
    ) -> ProbeResult:
        """Probe the atServer ``key`` at host:port (all within ``timeout``); never raises."""
        start = time.monotonic()
        held = self._held.pop(key, None)
        if held is not None and (
            (held.host, held.port) != (host, port) or held.uses >= self.fresh_every
        ):
            held.close()
            held = None
        try:
            async with asyncio.timeout(timeout):
                if held is not None:
                    try:
                        answer = await self._ask(held)
                        self._held[key] = held
                        return judge_answer(
                            answer, host, port, expect_atsign, time.monotonic() - start
                        )
                    except (OSError, ssl.SSLError, ConnectionError, ValueError):
                        held.close()  # closed by the server (idle timeout, restart): anew
                held = await self._open(host, port, timeout)
                answer = await self._ask(held)
        except TimeoutError:
            if held is not None:
                held.close()
            return ProbeResult(
                False, f"no at-protocol answer from {host}:{port} within {timeout}s", timeout
            )
        except (OSError, ssl.SSLError, ConnectionError, ValueError) as exc:
            if held is not None:
                held.close()
            return ProbeResult(
                False, f"{host}:{port}: {type(exc).__name__}: {exc}", time.monotonic() - start
            )
        self._held[key] = held
        return judge_answer(answer, host, port, expect_atsign, time.monotonic() - start)

    def forget(self, key: str) -> None:
        """Close ``key``'s connection (its atServer stopped)."""
        held = self._held.pop(key, None)
        if held is not None:
            held.close()

    def close(self) -> None:
        for key in list(self._held):
            self.forget(key)
