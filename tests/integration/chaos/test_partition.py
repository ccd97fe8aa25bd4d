"""The partition relays: forward, go silent when cut, drop connections and forward on heal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from chaos.partition import RelayHost


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _roundtrip(port: int, payload: bytes, timeout: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    finally:
        writer.close()


async def test_cut_silences_and_heal_drops_then_forwards(echo_port: int) -> None:
    relays = RelayHost()
    try:
        port = await asyncio.to_thread(relays.add, "a1", echo_port)
        other = await asyncio.to_thread(relays.add, "b1", echo_port)
        assert await _roundtrip(port, b"hello", 2.0) == b"hello"

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 2.0) == b"x"
        await asyncio.to_thread(relays.cut, "a1")
        writer.write(b"during the cut")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.5)  # silence, not a refusal
        with pytest.raises(TimeoutError):
            await _roundtrip(port, b"new", 0.5)  # accepted, never answered
        assert await _roundtrip(other, b"other node", 2.0) == b"other node"

        await asyncio.to_thread(relays.heal, "a1")
        assert await asyncio.wait_for(reader.read(100), 2.0) == b""  # dropped on heal
        writer.close()
        assert await _roundtrip(port, b"again", 2.0) == b"again"
    finally:
        await asyncio.to_thread(relays.stop)
