"""A small at-protocol client over TLS: directory lookups and PKAM-authenticated key updates.

It speaks the same lines as the atsdk (``from:`` -> ``data:<challenge>`` -> ``pkam:<sig>``
-> ``data:success``, then ``update:``/``llookup:``), with a deadline on every step, which
the atsdk lacks (see docs/chaos.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class AtError(Exception):
    """A protocol step failed: the server answered ``error:...``, closed, or timed out."""


def client_ssl_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = True
    return ctx


async def _read_until_prompt(reader: asyncio.StreamReader, prompt: str, timeout: float) -> str:
    """Read until the buffer ends with ``prompt`` (after a newline, or alone); return the text
    before it."""
    buf = b""
    want = prompt.encode()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        left = end - loop.time()
        if left <= 0:
            raise AtError(f"no answer within {timeout:g}s (got {buf[-80:]!r})")
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            raise AtError(f"no answer within {timeout:g}s (got {buf[-80:]!r})") from None
        if not chunk:
            raise AtError(f"connection closed (got {buf[-80:]!r})")
        buf += chunk
        if buf == want or buf.endswith(b"\n" + want):
            return buf[: -len(want)].decode(errors="replace").rstrip("\r\n")


async def lookup(
    host: str, port: int, atsign: str, ssl_ctx: ssl.SSLContext, timeout: float = 3.0
) -> tuple[str, int] | None:
    """Ask the directory where ``atsign`` is served; ``None`` when it answers ``null``."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname=host), timeout
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise AtError(f"directory {host}:{port}: cannot connect: {exc!r}") from None
    try:
        await _read_until_prompt(reader, "@", timeout)
        writer.write(atsign.lstrip("@").encode() + b"\n")
        await writer.drain()
        answer = (await _read_until_prompt(reader, "@", timeout)).strip()
        writer.write(b"@exit\n")
        with contextlib.suppress(OSError):
            await writer.drain()
    except (OSError, ssl.SSLError) as exc:
        raise AtError(f"directory {host}:{port}: {exc!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    if answer == "null":
        return None
    h, sep, p = answer.rpartition(":")
    if not sep or not p.isdigit():
        raise AtError(f"directory answered {answer!r} for {atsign}: not host:port")
    return h, int(p)


class AtConnection:
    """An authenticated connection to one atServer for one atSign."""

    def __init__(
        self,
        atsign: str,
        key: rsa.RSAPrivateKey,
        ssl_ctx: ssl.SSLContext,
        timeout: float = 3.0,
    ) -> None:
        self.atsign = atsign
        self.key = key
        self.ssl_ctx = ssl_ctx
        self.timeout = timeout
        self.address: tuple[str, int] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def prompt(self) -> str:
        return f"{self.atsign}@"

    async def connect(self, host: str, port: int) -> None:
        """Connect and log in with PKAM; :class:`AtError` on any failure."""
        await self.close()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self.ssl_ctx, server_hostname=host),
                self.timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise AtError(f"{self.atsign} at {host}:{port}: cannot connect: {exc!r}") from None
        self._reader, self._writer = reader, writer
        try:
            await _read_until_prompt(reader, "@", self.timeout)
            challenge = await self._send(f"from:{self.atsign}", "@")
            sig = self.key.sign(
                challenge.removeprefix("data:").encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            answer = await self._send("pkam:" + base64.b64encode(sig).decode(), self.prompt)
            if answer != "data:success":
                raise AtError(f"{self.atsign}: pkam refused: {answer}")
        except BaseException:
            await self.close()
            raise
        self.address = (host, port)

    async def _send(self, line: str, prompt: str | None = None) -> str:
        if self._writer is None or self._reader is None:
            raise AtError(f"{self.atsign}: not connected")
        try:
            self._writer.write(line.encode() + b"\n")
            await asyncio.wait_for(self._writer.drain(), self.timeout)
            answer = await _read_until_prompt(self._reader, prompt or self.prompt, self.timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise AtError(f"{self.atsign}: {line.split(':', 1)[0]}: {exc!r}") from None
        if answer.startswith("error:"):
            raise AtError(f"{self.atsign}: {line.split(':', 1)[0]}: {answer}")
        return answer

    async def update(self, key: str, value: str) -> str:
        """``update:<key> <value>``; returns the server's commit id (the acknowledgement)."""
        return (await self._send(f"update:{key} {value}")).removeprefix("data:")

    async def llookup(self, key: str) -> str:
        return (await self._send(f"llookup:{key}")).removeprefix("data:")

    async def info(self) -> str:
        return (await self._send("info:brief")).removeprefix("data:")

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self.address = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
