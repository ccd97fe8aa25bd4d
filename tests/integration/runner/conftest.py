"""Fixtures for the runner tests: the real ``atsdk`` client, an onboarded atSign, runners that
clean up after themselves, and helpers to wait for a dev atServer to serve."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from atserver_runner import devserver
from atserver_runner.base import ProbeResult, Runner, Workload, WorkloadSpec, WorkloadState
from atserver_runner.process import ProcessRunner
from testbed.ports import free_port
from testbed.tls import CertPair, TestCA

DRIVER = Path(__file__).with_name("atsdk_driver.py")
ATSIGN = "@alice"
CRAM_SECRET = "b26455a907582760ebf35bc4847de549bc41c24b25c8b1c58d5964f7b4f8a43bc55b0e9a601c9a9657d9a8b8bbc32f88b4e38ffaca03c8710ebae1b14ca9f364"  # noqa: E501 (test value)


@dataclass(frozen=True)
class Atsdk:
    """Runs the real atsdk client (tests/integration/runner/atsdk_driver.py) in a subprocess,
    bounded by a timeout: atsdk itself has none and spins when a server hangs up."""

    home: Path
    ca: Path

    def run(self, cmd: str, host: str, port: int, *rest: str, timeout: float = 60.0) -> Any:
        env = {**os.environ, "HOME": str(self.home), "SSL_CERT_FILE": str(self.ca)}
        try:
            done = subprocess.run(
                [sys.executable, str(DRIVER), cmd, ATSIGN, host, str(port), *rest],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"atsdk {cmd} did not finish in {timeout}s: {exc.stdout!r}"
            ) from None
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise AssertionError(
                f"atsdk {cmd} failed with {done.returncode}: "
                f"{done.stdout!r} {done.stderr[-2000:]!r}"
            )
        return json.loads(lines[-1])

    async def arun(self, cmd: str, host: str, port: int, *rest: str, timeout: float = 60.0) -> Any:
        return await asyncio.to_thread(self.run, cmd, host, port, *rest, timeout=timeout)


@dataclass(frozen=True)
class Onboarded:
    """``@alice`` onboarded once per session; its keys live in ``atsdk.home``."""

    atsdk: Atsdk
    pkam_public_key_file: Path
    cert: CertPair


def devserver_spec(
    runner_node: str,
    data_dir: Path,
    token: int,
    onboarded: Onboarded,
    *,
    port: int | None = None,
    extra: tuple[str, ...] = (),
    cram_secret: str | None = None,
) -> WorkloadSpec:
    """A WorkloadSpec running the dev atServer for ``@alice`` as a local process."""
    port = port or free_port()
    secret_args: dict[str, Any] = {}
    if cram_secret is not None:
        secret_file = data_dir.parent / f"{data_dir.name}.cram"
        secret_file.write_text(cram_secret)
        secret_args["cram_secret_file"] = secret_file
    else:
        secret_args["pkam_public_key_file"] = onboarded.pkam_public_key_file
    command = devserver.argv(
        python=sys.executable,
        atsign=ATSIGN,
        port=port,
        data_dir=data_dir,
        fencing_token=token,
        cert=onboarded.cert.cert,
        key=onboarded.cert.key,
        extra=extra,
        **secret_args,
    )
    return WorkloadSpec(
        atsign=ATSIGN,
        node=runner_node,
        port=port,
        data_dir=data_dir,
        fencing_token=token,
        command=tuple(command),
    )


async def wait_healthy(runner: Runner, atsign: str = ATSIGN, timeout: float = 30.0) -> ProbeResult:
    """Probe until healthy (bounded); raise with the last probe's detail otherwise."""
    deadline = time.monotonic() + timeout
    last = ProbeResult(False, "never probed")
    while time.monotonic() < deadline:
        last = await runner.probe(atsign, timeout=2.0)
        if last.healthy:
            return last
        if any(
            w.atsign == atsign and w.state is WorkloadState.STOPPED for w in await runner.list()
        ):
            raise AssertionError(f"{atsign} exited before serving: {last.detail}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{atsign} not healthy within {timeout}s: {last.detail}")


async def wait_stopped(runner: Runner, atsign: str = ATSIGN, timeout: float = 15.0) -> Workload:
    """Wait (bounded) until the runner reports the workload STOPPED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in await runner.list():
            if w.atsign == atsign and w.state is WorkloadState.STOPPED:
                return w
        await asyncio.sleep(0.05)
    raise AssertionError(f"{atsign} still running after {timeout}s")


async def _stop_all(runner: Runner) -> None:
    for w in await runner.list():
        await runner.stop(w.atsign, timeout=5.0)


def _print_logs(runner: ProcessRunner) -> None:
    for log in sorted(runner.log_dir.glob("*.log")):
        print(f"\n===== {runner.node} {log.name} =====\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="session")
def onboarded(
    tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, server_cert: CertPair
) -> Iterator[Onboarded]:
    """Onboard ``@alice`` with atsdk's own utilities (CRAM, then PKAM keys) once per session."""
    base = tmp_path_factory.mktemp("atsdk")
    sdk = Atsdk(home=base / "home", ca=test_ca.cert_path)
    sdk.home.mkdir()
    runner = ProcessRunner(f"onboard-{uuid.uuid4().hex[:6]}", base / "state")
    partial = Onboarded(sdk, base / "unused", server_cert)
    spec = devserver_spec(runner.node, base / "data", 1, partial, cram_secret=CRAM_SECRET)

    async def onboard() -> str:
        try:
            await runner.start(spec)
            await wait_healthy(runner)
            result = await sdk.arun("onboard", spec.host, spec.port, CRAM_SECRET)
            return str(result["pkam_public_key"])
        except BaseException:
            _print_logs(runner)
            raise
        finally:
            await _stop_all(runner)

    # In a thread of its own: asyncio.run() must not meet a running loop of the test session.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        key = pool.submit(asyncio.run, onboard()).result(timeout=180)
    key_file = base / "pkam_public_key.b64"
    key_file.write_text(key)
    yield Onboarded(sdk, key_file, server_cert)


@pytest.fixture
async def make_process_runner(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[str], ProcessRunner]]:
    """Make ProcessRunners ("nodes", each with its own state dir); all their workloads are
    stopped at the end of the test, also when it fails."""
    made: list[ProcessRunner] = []

    def make(node: str) -> ProcessRunner:
        runner = ProcessRunner(node, tmp_path / "nodes" / node, probe_ca=None)
        made.append(runner)
        return runner

    try:
        yield make
    finally:
        failed = any(
            getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
            for w in ("setup", "call")
        )
        for runner in made:
            if failed:
                _print_logs(runner)
            await _stop_all(runner)


def tls_client_context(ca: Path) -> ssl.SSLContext:
    """A client context that verifies the dev atServer against the test CA."""
    return ssl.create_default_context(cafile=str(ca))
