"""DockerRunner with the locally built dev atServer image and the real atsdk client."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from atserver_runner.base import ResourceLimits, Runner, RunnerError, WorkloadSpec, WorkloadState
from atserver_runner.devserver import image
from atserver_runner.devserver.fence import read_fence
from atserver_runner.docker import LABEL_ATSIGN, LABEL_NODE, LABEL_TOKEN, DockerRunner
from atserver_runner.process import ProcessRunner
from testbed.ports import free_port
from tests.integration.runner.conftest import (
    ATSIGN,
    Onboarded,
    devserver_spec,
    wait_healthy,
    wait_stopped,
)

pytestmark = pytest.mark.docker

MakeRunner = Callable[[str], DockerRunner]


@pytest.fixture(scope="session")
def devserver_image(docker_client: Any) -> str:
    """The dev atServer image, built once (and skipped when already up to date)."""
    result = image.build(docker_client, image.DEFAULT_TAG)
    print(f"image: built={result.built} {result.seconds:.2f}s {result.size_bytes / 1e6:.1f} MB")
    return result.tag


@pytest.fixture
async def make_docker_runner(
    docker_client: Any, devserver_image: str, onboarded: Onboarded, key_prefix: str
) -> AsyncIterator[Callable[[str], DockerRunner]]:
    """DockerRunners for nodes named after this test's key prefix; every container of those
    nodes is removed at the end, also when the test fails."""
    suffix = key_prefix.rsplit("-", 1)[-1]
    made: list[DockerRunner] = []

    def make(node: str) -> DockerRunner:
        runner = DockerRunner(
            f"{node}-{suffix}",
            docker_client,
            image=devserver_image,
            tls_cert=onboarded.cert.cert,
            tls_key=onboarded.cert.key,
            probe_ca=onboarded.atsdk.ca,
        )
        made.append(runner)
        return runner

    try:
        yield make
    finally:
        for runner in made:
            for w in await runner.list():
                print(f"\n===== {runner.node} container log =====\n{await runner.logs(w.atsign)}")
                await runner.stop(w.atsign, timeout=2.0)
            left = docker_client.containers.list(
                all=True, filters={"label": [f"{LABEL_NODE}={runner.node}"]}, ignore_removed=True
            )
            for c in left:  # should be none; remove them anyway so nothing stays behind
                c.remove(force=True)
            assert not left, f"containers left behind: {[c.name for c in left]}"


LIMITS = ResourceLimits(cpus=0.5, memory_bytes=256 * 1024 * 1024)


def docker_spec(
    runner: DockerRunner,
    data_dir: Path,
    token: int,
    onboarded: Onboarded,
    limits: ResourceLimits = LIMITS,
) -> WorkloadSpec:
    return WorkloadSpec(
        atsign=ATSIGN,
        node=runner.node,
        port=free_port(),
        data_dir=data_dir,
        fencing_token=token,
        env={"ATSERVER_PKAM_PUBLIC_KEY": onboarded.pkam_public_key_file.read_text().strip()},
        limits=limits,
    )


async def test_container_shape_and_atsdk_round_trip(
    make_docker_runner: MakeRunner, docker_client: Any, onboarded: Onboarded, tmp_path: Path
) -> None:
    runner = make_docker_runner("dk-a")
    assert isinstance(runner, Runner)
    data = tmp_path / "data"
    spec = docker_spec(runner, data, 70, onboarded)
    t0 = time.monotonic()
    w = await runner.start(spec)
    probe = await wait_healthy(runner)
    print(f"docker start -> healthy: {time.monotonic() - t0:.3f}s, probe {probe.latency_s:.4f}s")
    assert w.state is WorkloadState.RUNNING and w.fencing_token == 70 and w.port == spec.port

    c = docker_client.containers.get(w.ident)
    assert c.name == f"atserver-{runner.node}-alice"
    assert c.labels[LABEL_ATSIGN] == ATSIGN
    assert c.labels[LABEL_NODE] == runner.node
    assert c.labels[LABEL_TOKEN] == "70"
    host = c.attrs["HostConfig"]
    assert host["PortBindings"] == {
        "6464/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]
    }
    mounts = {m["Destination"]: m for m in c.attrs["Mounts"]}
    assert mounts["/data"]["Source"] == str(data.resolve()) and mounts["/data"]["RW"]
    assert host["CapDrop"] == ["ALL"]
    assert host["Init"] is True
    assert host["Privileged"] is False
    assert host["RestartPolicy"]["Name"] in ("", "no")
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 * 1024 * 1024
    assert c.attrs["Config"]["User"] == "10001:10001"

    out = await onboarded.atsdk.arun("exercise", spec.host, spec.port)
    assert (out["self"], out["public"], out["after_delete"]) == (
        "hello self",
        "hello world",
        "AtKeyNotFoundException",
    )
    assert read_fence(data) == 70

    # Frozen: still RUNNING (it holds the port and data dir) but the probe fails; stop works.
    c.pause()
    frozen = await runner.probe(ATSIGN, timeout=1.0)
    assert not frozen.healthy and "container is paused" in frozen.detail, frozen
    assert [x.state for x in await runner.list()] == [WorkloadState.RUNNING]
    c.unpause()
    assert (await runner.probe(ATSIGN)).healthy
    c.pause()

    t0 = time.monotonic()
    assert await runner.stop(ATSIGN, timeout=10.0) is True
    print(f"docker stop of a paused container: {time.monotonic() - t0:.3f}s")
    assert await runner.list() == []
    assert await runner.stop(ATSIGN) is False
    assert not (await runner.probe(ATSIGN)).healthy


async def test_list_refinds_containers_and_data_follows_the_claim(
    make_docker_runner: MakeRunner,
    make_process_runner: Callable[[str], ProcessRunner],
    onboarded: Onboarded,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = make_docker_runner("dk-a")
    spec = docker_spec(first, data, 80, onboarded, limits=ResourceLimits())
    t0 = time.monotonic()
    started = await first.start(spec)
    await wait_healthy(first)
    print(f"docker start -> healthy (no limits): {time.monotonic() - t0:.3f}s")
    put = await onboarded.atsdk.arun("put", spec.host, spec.port, "docker.test", "from-docker")
    assert "error" not in put, put

    # A restarted supervisor: a new runner for the same node finds the container by label.
    again = DockerRunner(first.node, first.client, image=first.image, probe_ca=onboarded.atsdk.ca)
    [found] = await again.list()
    assert (found.ident, found.fencing_token, found.port, found.state) == (
        started.ident,
        80,
        spec.port,
        WorkloadState.RUNNING,
    )
    assert (await again.probe(ATSIGN)).healthy
    assert (await again.start(spec)).ident == started.ident  # no second copy
    with pytest.raises(RunnerError, match="already runs with fencing token 80"):
        await again.start(docker_spec(again, data, 81, onboarded))
    t0 = time.monotonic()
    assert await again.stop(ATSIGN) is True
    print(f"docker graceful stop: {time.monotonic() - t0:.3f}s")
    assert await first.list() == []

    # The claim moves to a process-runner node: same data dir, higher token, data is there.
    other = make_process_runner("proc-b")
    pspec = devserver_spec(other.node, data, 82, onboarded)
    await other.start(pspec)
    await wait_healthy(other)
    got = await onboarded.atsdk.arun("get", pspec.host, pspec.port, "docker.test")
    assert got == {"value": "from-docker"}
    await other.stop(ATSIGN)

    # And a container with a lower token than the fence refuses to start.
    late = make_docker_runner("dk-c")
    await late.start(docker_spec(late, data, 79, onboarded))
    end = await wait_stopped(late, timeout=30.0)
    assert end.exit_code == 3, await late.logs(ATSIGN)
    assert "refused_to_start" in await late.logs(ATSIGN)
    assert read_fence(data) == 82


async def test_failed_start_leaves_no_container(
    make_docker_runner: MakeRunner, docker_client: Any, onboarded: Onboarded, tmp_path: Path
) -> None:
    runner = make_docker_runner("dk-a")
    spec = docker_spec(runner, tmp_path / "data", 1, onboarded)
    missing = WorkloadSpec(**{**spec.__dict__, "image": "atfailover/no-such-image:none"})
    with pytest.raises(
        RunnerError, match="@alice: image 'atfailover/no-such-image:none' not found"
    ):
        await runner.start(missing)
    # A port that is already taken: create succeeds, start fails, the container is removed.
    busy = await runner.start(spec)
    await wait_healthy(runner)
    clash = make_docker_runner("dk-b")
    with pytest.raises(RunnerError, match="@alice: cannot start container"):
        await clash.start(WorkloadSpec(**{**spec.__dict__, "node": clash.node}))
    assert await clash.list() == []
    assert [w.ident for w in await runner.list()] == [busy.ident]


def test_image_build_is_idempotent(docker_client: Any, devserver_image: str) -> None:
    again = image.build(docker_client, devserver_image)
    assert again.built is False
    labels = docker_client.images.get(devserver_image).attrs["Config"]["Labels"]
    assert labels[image.HASH_LABEL] == again.content_sha256
    assert again.size_bytes < 200 * 1024 * 1024


FREEZE_SERVER = """
import os, signal
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) not in (1, os.getpid()):
        os.kill(int(pid), signal.SIGSTOP)
"""


async def test_stop_kills_a_server_that_ignores_sigterm_after_a_subsecond_grace(
    make_docker_runner: MakeRunner, docker_client: Any, onboarded: Onboarded, tmp_path: Path
) -> None:
    runner = make_docker_runner("dk-a")
    w = await runner.start(docker_spec(runner, tmp_path / "data", 1, onboarded))
    await wait_healthy(runner)
    c = docker_client.containers.get(w.ident)
    # SIGSTOP the server inside the container (not docker pause): SIGTERM stays pending.
    python = f"{image.PYTHON_HOME}/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    code, out = c.exec_run([python, "-c", FREEZE_SERVER])
    assert code == 0, out
    assert not (await runner.probe(ATSIGN, timeout=1.0)).healthy
    t0 = time.monotonic()
    assert await runner.stop(ATSIGN, timeout=0.5) is True
    took = time.monotonic() - t0
    print(f"docker stop of a server ignoring SIGTERM (grace 0.5 s): {took:.3f}s")
    assert 0.5 <= took < 5.0, took
    assert await runner.list() == []
