"""Fixtures: a cluster of real supervisors on the real etcd or Consul of the test session."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from testbed.consul import ConsulAgent
from testbed.etcd import EtcdCluster
from testbed.tls import CertPair, TestCA
from tests.integration.supervisor.cluster import ApiSecrets, Cluster

ETCD_TTL = 4
"""Small enough for quick tests, large enough for 3 supervisors + 9 atServers on 2 cores."""
CONSUL_TTL = 10
CONSUL_LOCK_DELAY = 1.0

ATSIGNS = ("@alice", "@bob", "@carol", "@dave", "@erin", "@frank")

MakeCluster = Callable[..., Cluster]


def _service_name(key_prefix: str) -> str:
    return "atserver-t" + hashlib.sha1(key_prefix.encode()).hexdigest()[:8]


@pytest.fixture
def make_cluster(
    tmp_path: Path,
    key_prefix: str,
    consul_agent: ConsulAgent,
    test_ca: TestCA,
    server_cert: CertPair,
    request: pytest.FixtureRequest,
) -> Iterator[MakeCluster]:
    """``make_cluster(backend, nodes=[("a1","A"),...], atsigns=...)``: a started cluster.

    The etcd fixture is only requested for the etcd backend, the session's Ceph only for
    ``storage="cephfs"`` (the default: the nodes' data roots are mounts of one CephFS
    directory; ``"local"``: each node its own directory, for single-node tests).
    ``secure=True``: every node API serves HTTPS with bearer tokens per role (ApiSecrets).
    """
    made: list[Cluster] = []

    def make(
        backend: str = "etcd",
        nodes: Sequence[tuple[str, str]] = (("a1", "A"), ("a2", "A"), ("b1", "B")),
        atsigns: Sequence[str] = ATSIGNS,
        start: bool = True,
        atsign_options: dict[str, dict[str, Any]] | None = None,
        etcd_fixture: str = "etcd",
        overrides: dict[str, Any] | None = None,
        storage: str = "cephfs",
        secure: bool = False,
    ) -> Cluster:
        if backend == "etcd":
            etcd: EtcdCluster = request.getfixturevalue(etcd_fixture)
            dcs: dict[str, Any] = {
                "backend": "etcd",
                "prefix": key_prefix,
                "etcd": {"endpoints": etcd.endpoints},
            }
            ttl: float = ETCD_TTL
        else:
            dcs = {
                "backend": "consul",
                "prefix": key_prefix,
                "consul": {"lock_delay": CONSUL_LOCK_DELAY},
            }
            ttl = CONSUL_TTL
        cluster = Cluster(
            base=tmp_path / f"cluster{len(made)}",
            backend=backend,
            dcs=dcs,
            consul=consul_agent,
            service=_service_name(key_prefix),
            cert=server_cert,
            ca_path=test_ca.cert_path,
            atsigns=list(atsigns),
            ttl=ttl,
            extra=overrides or {},
            ceph=request.getfixturevalue("ceph_cluster") if storage == "cephfs" else None,
            secure=(
                ApiSecrets.make(
                    tmp_path / f"cluster{len(made)}-secrets", test_ca.cert_path, server_cert
                )
                if secure
                else None
            ),
        )
        made.append(cluster)
        for name, cloud in nodes:
            cluster.add_node(name, cloud)
        cluster.write_inventory(atsign_options)
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for c in made:
            if getattr(getattr(request.node, "rep_call", None), "failed", False):
                print(c.dump())
            c.close()
