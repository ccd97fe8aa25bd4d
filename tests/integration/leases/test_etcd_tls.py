"""etcd over TLS with client-certificate authentication: the options reach the wire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from leases import ClaimInfo, DCSUnavailable, Timing
from leases.etcd import EtcdBackend
from testbed.etcd import etcd_binary
from testbed.ports import free_port
from testbed.process import ManagedProcess
from testbed.tls import CertPair, TestCA

TIMING = Timing.for_ttl(3.0)


@pytest.fixture
async def tls_etcd(tmp_path: Path, test_ca: TestCA, server_cert: CertPair) -> AsyncIterator[str]:
    """A single etcd that only accepts TLS clients with a certificate from ``test_ca``."""
    client_port, peer_port = free_port(), free_port()
    endpoint = f"https://127.0.0.1:{client_port}"
    argv = [
        etcd_binary(),
        "--name", "tls0",
        "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", endpoint,
        "--advertise-client-urls", endpoint,
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"tls0=http://127.0.0.1:{peer_port}",
        "--cert-file", str(server_cert.cert),
        "--key-file", str(server_cert.key),
        "--trusted-ca-file", str(test_ca.cert_path),
        "--client-cert-auth",
        "--logger", "zap",
        "--log-outputs", "stderr",
    ]  # fmt: skip
    proc = ManagedProcess("etcd-tls", argv, tmp_path / "etcd.log")
    proc.start()
    try:
        client = test_ca.issue("leases-client", client=True)
        probe = EtcdBackend(
            [endpoint], "probe", ca_cert=test_ca.cert_path, cert_cert=client.cert,
            cert_key=client.key,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                await probe.owners()
                break
            except DCSUnavailable:
                if time.monotonic() > deadline or not proc.running():
                    raise AssertionError(f"TLS etcd did not start: {proc.log_tail()}") from None
                await asyncio.sleep(0.2)
        await probe.close()
        yield endpoint
    finally:
        proc.stop()


async def test_claims_work_over_tls_with_a_client_certificate(
    tls_etcd: str, test_ca: TestCA, key_prefix: str
) -> None:
    client = test_ca.issue("leases-client", client=True)
    backend = EtcdBackend(
        [tls_etcd], key_prefix, ca_cert=test_ca.cert_path, cert_cert=client.cert,
        cert_key=client.key,
    )  # fmt: skip
    try:
        assert "tls=True" in repr(backend)
        session = await backend.open_session("n", TIMING)
        claim = await session.claim("@tls", ClaimInfo(node="n"))
        assert claim is not None
        events = backend.watch()
        first = await asyncio.wait_for(anext(events), 5)
        assert first.snapshot == {"@tls": claim}
        await events.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(TIMING.renew_interval * 2)
        assert session.renewals >= 1 and not session.lost.is_set()
        assert await session.release(claim)
        await session.close()
    finally:
        await backend.close()


async def test_tls_without_client_certificate_or_trust_is_refused_clearly(
    tls_etcd: str, test_ca: TestCA, key_prefix: str
) -> None:
    no_cert = EtcdBackend([tls_etcd], key_prefix, ca_cert=test_ca.cert_path, request_timeout=2)
    untrusted = EtcdBackend([tls_etcd], key_prefix, request_timeout=2)  # system CAs only
    try:
        for backend in (no_cert, untrusted):
            started = time.monotonic()
            with pytest.raises(DCSUnavailable, match=tls_etcd.removeprefix("https://")):
                await backend.open_session("n", TIMING)
            assert time.monotonic() - started < TIMING.request_timeout + 1.0
    finally:
        await no_cert.close()
        await untrusted.close()
