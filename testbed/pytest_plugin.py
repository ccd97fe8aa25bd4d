"""Pytest fixtures that start the real servers once per test session.

Each server is started on free loopback ports, its log is printed when a test
that used it fails, and it is stopped by PID at the end (also after failures).
Tests get their own key prefix / service names through ``key_prefix``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.ceph import CephCluster, CephSpace
from testbed.consul import ConsulAgent
from testbed.dockerd import DockerEngine
from testbed.etcd import EtcdCluster
from testbed.tls import CertPair, TestCA


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def _dump_on_failure(request: pytest.FixtureRequest, name: str, server: Any) -> None:
    if _failed(request):
        print(f"\n===== {name} log (last lines) =====\n{server.log_tail()}\n")


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


def _running_cluster(base_dir: Path, size: int, name: str) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(base_dir, size=size, name=name)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _heal(cluster: EtcdCluster, request: pytest.FixtureRequest, what: str) -> None:
    """Thaw and restart whatever a test froze or killed, so the next test finds it whole."""
    cluster.thaw()
    for m in cluster.members:
        if m.process is not None and not m.process.running():
            cluster.restart_member(m)
    _dump_on_failure(request, what, cluster)


@pytest.fixture(scope="session")
def _etcd_single(servers_dir: Path) -> Iterator[EtcdCluster]:
    yield from _running_cluster(servers_dir / "etcd", 1, "etcd")


@pytest.fixture
def etcd(_etcd_single: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A single real etcd server (session-wide); thawed and running again after each test."""
    yield _etcd_single
    _heal(_etcd_single, request, "etcd")


@pytest.fixture(scope="session")
def _etcd_three(servers_dir: Path) -> Iterator[EtcdCluster]:
    yield from _running_cluster(servers_dir / "etcd3", 3, "member")


@pytest.fixture
def etcd_cluster(_etcd_three: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster; ``kill_member``/``restart_member``; all members back after."""
    yield _etcd_three
    _heal(_etcd_three, request, "etcd cluster")


@pytest.fixture(scope="session")
def _consul_agent(servers_dir: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(servers_dir / "consul")
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def consul_agent(
    _consul_agent: ConsulAgent, request: pytest.FixtureRequest
) -> Iterator[ConsulAgent]:
    """A Consul dev agent (session-wide); thawed and running again after each test."""
    yield _consul_agent
    if _consul_agent.process is not None:
        _consul_agent.thaw()
        if not _consul_agent.process.running():
            _consul_agent.start()
    _dump_on_failure(request, "consul", _consul_agent)


@pytest.fixture(scope="session")
def docker_engine(servers_dir: Path) -> Iterator[DockerEngine]:
    """The Docker engine: the running one, or dockerd started for this session.

    Skips with the reason only if dockerd cannot start, unless
    ``ATFAILOVER_REQUIRE_DOCKER=1`` (CI sets it), which makes that a failure.
    """
    engine = DockerEngine(servers_dir / "docker")
    try:
        engine.ensure()
    except RuntimeError as exc:
        if os.environ.get("ATFAILOVER_REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[Any]:
    import docker

    client = docker.DockerClient(base_url=docker_engine.base_url, timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix no other test uses, e.g. ``t/test_claim_race-1a2b3c4d``."""
    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:40].strip("-")
    return f"t/{slug}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A session-wide test CA; trust it in clients with ``SSL_CERT_FILE=str(test_ca.cert_path)``."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def server_cert(test_ca: TestCA) -> CertPair:
    """A server certificate for 127.0.0.1 and localhost, signed by ``test_ca``."""
    return test_ca.issue("server")


@pytest.fixture(scope="session")
def _ceph_cluster(servers_dir: Path) -> Iterator[CephCluster]:
    cluster = CephCluster(servers_dir / "ceph")
    try:
        took = cluster.start()
        rss = cluster.memory_rss()
        print(
            f"\nMEASURE ceph bring-up (3 mons, mgr, 3 OSDs, 2 MDS, fs {cluster.fs_name}): "
            f"{took:.1f}s; RSS {sum(rss.values()) / 2**20:.0f} MiB "
            f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in sorted(rss.items()))})"
        )
        yield cluster
        rss = cluster.memory_rss()
        print(f"\nMEASURE ceph RSS after the session's tests: {sum(rss.values()) / 2**20:.0f} MiB")
    finally:
        cluster.stop()


@pytest.fixture
def ceph_cluster(
    _ceph_cluster: CephCluster, request: pytest.FixtureRequest
) -> Iterator[CephCluster]:
    """A real Ceph cluster with CephFS (session-wide, see ``testbed/ceph.py``); killed daemons
    are restarted and the cluster is healthy again after each test."""
    yield _ceph_cluster
    _dump_on_failure(request, "ceph", _ceph_cluster)
    _ceph_cluster.heal()


@pytest.fixture
def ceph_space(
    ceph_cluster: CephCluster, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[CephSpace]:
    """This test's own directory on the fs and per-node mounts: ``ceph_space.mount("a1")``
    mounts ``/atservers`` as ``client.a1-<token>``; ``ceph_space.dir(m)`` is the directory.
    Everything it mounted is unmounted (and its sessions evicted) afterwards."""
    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:32].strip("-")
    space = CephSpace(ceph_cluster, f"t-{slug}", tmp_path / "mnt")
    try:
        yield space
    finally:
        if _failed(request):
            for node, m in space.mounts.items():
                print(f"\n===== ceph-fuse {node} ({m.tag}) =====\n{m.log_tail()}\n")
        space.close()
