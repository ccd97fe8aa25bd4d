"""Bad input to a running dev atServer: every bad line gets an ``error:ATxxxx-... : ...`` line in
the SDK's format, the connection keeps working, and the server never crashes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from at_client.connections.response import Response

from atserver_runner.process import ProcessRunner
from tests.integration.runner.conftest import (
    ATSIGN,
    Onboarded,
    devserver_spec,
    tls_client_context,
    wait_healthy,
)

MAX_LINE = 4096


class RawClient:
    """A bare at-protocol client over TLS that checks the server certificate."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, ctx: ssl.SSLContext) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 10.0
        )
        client = cls(reader, writer)
        assert await client._read_prompt() == ""
        return client

    async def _read_prompt(self) -> str:
        """Everything up to and including the prompt (``@`` or ``@alice@``), prompt removed."""
        data = b""
        while not (
            data.endswith(b"@")
            and (data == b"@" or data.endswith(b"\n@") or data.endswith(f"\n{ATSIGN}@".encode()))
        ):
            chunk = await asyncio.wait_for(self.reader.read(65536), 10.0)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        text = data.decode()
        return text.rsplit("\n", 1)[0] if "\n" in text else ""

    async def send(self, line: bytes) -> str:
        self.writer.write(line + b"\n")
        await self.writer.drain()
        return await self._read_prompt()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


def sdk_error(answer: str) -> tuple[str, str]:
    """(code, text) as the atsdk parses an error answer."""
    assert answer.startswith("error:"), answer
    resp = Response()
    resp.set_raw_error_response(answer[len("error:") :])
    assert resp.is_error()
    return str(resp.get_error_code()), str(resp.get_error_text())


@pytest.fixture
async def served(
    tmp_path: Path, onboarded: Onboarded, make_process_runner: Callable[[str], ProcessRunner]
) -> AsyncIterator[tuple[ProcessRunner, str, int]]:
    runner = make_process_runner("node-a")
    spec = devserver_spec(
        runner.node,
        tmp_path / "data",
        1,
        onboarded,
        extra=("--max-line-bytes", str(MAX_LINE)),
    )
    await runner.start(spec)
    await wait_healthy(runner)
    yield runner, spec.host, spec.port


async def test_bad_lines_get_sdk_format_errors_and_the_server_lives_on(
    served: tuple[ProcessRunner, str, int], onboarded: Onboarded
) -> None:
    runner, host, port = served
    ctx = tls_client_context(onboarded.atsdk.ca)
    c = await RawClient.connect(host, port, ctx)
    try:
        cases: list[tuple[bytes, str]] = [
            (b"frobnicate:now", "AT0003"),
            (b"x" * (MAX_LINE * 3), "AT0005"),
            (b"\xff\xfe\x00garbage\x80", "AT0003"),
            (b"llookup:secret.test@alice", "AT0401"),  # not logged in
            (b"pkam:AAAA", "AT0401"),  # no challenge asked for
            (b"from:@mallory", "AT0009"),
            (b"noop:999999", "AT0022"),
            (b"update:ttl:-5:x.test@alice v", "AT0022"),
            (b"scan (unclosed", "AT0022"),
        ]
        for line, code in cases:
            answer = await c.send(line)
            got, text = sdk_error(answer)
            assert got == code, (line[:40], answer)
            assert text, answer
        # A wrong signature after a real challenge.
        challenge = await c.send(f"from:{ATSIGN}".encode())
        assert challenge.startswith("data:_")
        wrong = base64.b64encode(b"\x00" * 256).decode()
        code, text = sdk_error(await c.send(f"pkam:{wrong}".encode()))
        assert code == "AT0401" and "signature" in text
        # Onboarding finished, so CRAM is off for good.
        await c.send(f"from:{ATSIGN}".encode())
        code, text = sdk_error(await c.send(b"cram:" + b"0" * 128))
        assert code == "AT0401" and "CRAM is not available" in text
        # The same connection still works.
        assert (await c.send(b"info:brief")).startswith("data:{")
    finally:
        await c.close()

    # A client that hangs up mid-line and one that never finishes the handshake.
    _, w = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    w.write(b"update:half")
    await w.drain()
    w.close()
    _, plain = await asyncio.open_connection(host, port)
    plain.write(b"not TLS at all\r\n")
    await plain.drain()
    plain.close()

    assert (await runner.probe(ATSIGN)).healthy
    [w_] = await runner.list()
    assert w_.exit_code is None
    log = runner.log_file(ATSIGN).read_text()
    assert "Traceback" not in log and "internal_error" not in log, log


async def test_missing_key_and_logged_in_prompt(
    served: tuple[ProcessRunner, str, int], onboarded: Onboarded
) -> None:
    _, host, port = served
    out = await onboarded.atsdk.arun("get", host, port, "never.written")
    assert out["error"] == "AtKeyNotFoundException", out
    assert "AT0015" in out["detail"] or "not" in out["detail"].lower(), out


async def test_connection_limit_answers_an_error_and_recovers(
    tmp_path: Path, onboarded: Onboarded, make_process_runner: Callable[[str], ProcessRunner]
) -> None:
    runner = make_process_runner("node-a")
    spec = devserver_spec(
        runner.node, tmp_path / "data", 1, onboarded, extra=("--max-connections", "2")
    )
    await runner.start(spec)
    await wait_healthy(runner)
    ctx = tls_client_context(onboarded.atsdk.ca)
    held = [await RawClient.connect(spec.host, spec.port, ctx) for _ in range(2)]
    try:
        reader, writer = await asyncio.open_connection(
            spec.host, spec.port, ssl=ctx, server_hostname=spec.host
        )
        refused = await asyncio.wait_for(reader.read(), 10.0)  # until the server hangs up
        writer.close()
        code, text = sdk_error(refused.decode().strip("@\n"))
        assert code == "AT0012" and "2 connections" in text, refused
        assert (await held[0].send(b"info:brief")).startswith("data:")
    finally:
        for c in held:
            await c.close()
    # Once the held connections are gone, clients get in again.
    for _ in range(100):
        if (await runner.probe(ATSIGN)).healthy:
            break
        await asyncio.sleep(0.05)
    assert (await runner.probe(ATSIGN)).healthy
