"""Probes over kept-open TLS connections: one handshake per atServer, retried when closed."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from atserver_runner.probe import ProbePool
from testbed.tls import CertPair


async def serve(cert: CertPair, answers: list[int]) -> tuple[asyncio.Server, int]:
    """A tiny at-protocol server: prompt, then 'data:{...}\\n@' per info:brief; it counts
    connections in ``answers`` and closes a connection after two answers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        answers.append(0)
        w.write(b"@")
        for _ in range(2):
            line = await r.readline()
            if not line:
                break
            w.write(b'data:{"atSign":"@alice","fencingToken":7}\n@')
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def test_one_handshake_for_many_probes_and_a_closed_connection_is_reopened(
    server_cert: CertPair,
) -> None:
    connections: list[int] = []
    server, port = await serve(server_cert, connections)
    pool = ProbePool(fresh_every=100)
    try:
        results = [
            await pool.probe("@alice", "127.0.0.1", port, expect_atsign="@alice") for _ in range(6)
        ]
        assert all(r.healthy for r in results), results
        assert "token=7" in results[0].detail
        # The server closes after two answers: reused twice, reopened, never failed.
        assert len(connections) == 3 and pool.handshakes == 3
        wrong = await pool.probe("@alice", "127.0.0.1", port, expect_atsign="@bob")
        assert not wrong.healthy and "serves @alice, not @bob" in wrong.detail
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("fresh_every", [1, 3])
async def test_every_nth_probe_opens_a_fresh_connection(
    server_cert: CertPair, fresh_every: int
) -> None:
    connections: list[int] = []
    server, port = await serve(server_cert, connections)
    pool = ProbePool(fresh_every=fresh_every)
    try:
        for _ in range(4):
            assert (await pool.probe("@alice", "127.0.0.1", port)).healthy
        assert pool.handshakes == (4 if fresh_every == 1 else 2)
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_nobody_listening_is_unhealthy_within_the_timeout() -> None:
    pool = ProbePool()
    result = await pool.probe("@x", "127.0.0.1", 1, timeout=0.5)
    assert not result.healthy and len(pool) == 0
