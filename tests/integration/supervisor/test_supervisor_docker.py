"""One run with the Docker runner: atServers as containers, a SIGKILLed node's containers are
stopped by its fence and its atSigns run elsewhere."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from atserver_runner.devserver import image
from atserver_runner.docker import LABEL_ATSIGN, LABEL_NODE, LABEL_TOKEN
from testbed.dockerd import DockerEngine
from tests.integration.supervisor.cluster import Node
from tests.integration.supervisor.conftest import MakeCluster

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def devserver_image(docker_client: Any) -> str:
    """The dev atServer image (built once; skipped when already up to date)."""
    image.build(docker_client, image.DEFAULT_TAG)
    return image.DEFAULT_TAG


@pytest.fixture
def node_suffix(docker_client: Any) -> Iterator[str]:
    """Unique node names (container names derive from them); their containers go afterwards."""
    suffix = uuid.uuid4().hex[:6]
    try:
        yield suffix
    finally:
        for c in docker_client.containers.list(all=True, ignore_removed=True):
            if c.labels.get(LABEL_NODE, "").endswith(f"-{suffix}"):
                with contextlib.suppress(Exception):
                    c.remove(force=True)


def test_docker_runner_cluster_and_sigkill_failover(
    make_cluster: MakeCluster,
    docker_client: Any,
    docker_engine: DockerEngine,
    devserver_image: str,
    node_suffix: str,
) -> None:
    a1, b1 = f"a1-{node_suffix}", f"b1-{node_suffix}"
    c = make_cluster(
        "etcd",
        nodes=((a1, "A"), (b1, "B")),
        atsigns=("@alice", "@bob", "@carol"),
        start=False,
        overrides={
            "runner.kind": "docker",
            "runner.image": devserver_image,
            "runner.docker_url": docker_engine.base_url,
        },
    )

    def containers(node: Node) -> dict[str, int]:
        found = docker_client.containers.list(
            filters={"label": f"{LABEL_NODE}={node.name}"}, ignore_removed=True
        )
        return {x.labels[LABEL_ATSIGN]: int(x.labels[LABEL_TOKEN]) for x in found}

    c.observe = containers
    c.start()
    c.wait(c.all_once, 90, "every atSign running once (containers) and passing")
    victim = max(c.nodes.values(), key=lambda n: len(containers(n)))
    moved = containers(victim)
    killed = time.monotonic()
    victim.proc.kill()
    took = c.wait(lambda: c.all_once(exclude=[victim.name]), c.ttl + 30, "takeover")
    print(
        f"\nMEASURE docker runner, etcd ttl {c.ttl:g}s: {len(moved)} atSigns passing elsewhere "
        f"{took:.1f}s after SIGKILL"
    )
    fenced = {e["atsign"]: e for e in victim.fence_log() if e["event"] == "fenced"}
    assert set(moved) <= set(fenced)
    for atsign, token in moved.items():
        assert fenced[atsign]["mono"] < fenced[atsign]["deadline"] + c.ttl / 2
        assert fenced[atsign]["mono"] < killed + c.ttl
        assert c.running()[atsign][0][1] > token
