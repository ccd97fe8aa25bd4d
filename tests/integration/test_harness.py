"""The harness itself: real servers come up, and stop/restart as promised."""

from __future__ import annotations

import json
import urllib.request

from testbed.consul import ConsulAgent
from testbed.etcd import EtcdCluster


def _put_get_etcd(endpoint: str) -> str:
    import base64

    key = base64.b64encode(b"harness").decode()
    val = base64.b64encode(b"ok").decode()
    for path, body in (("put", {"key": key, "value": val}), ("range", {"key": key})):
        req = urllib.request.Request(
            f"http://{endpoint}/v3/kv/{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            out = json.loads(resp.read())
    return base64.b64decode(out["kvs"][0]["value"]).decode()


def test_single_etcd_serves(etcd: EtcdCluster) -> None:
    assert _put_get_etcd(etcd.endpoints[0]) == "ok"


def test_three_member_cluster_survives_leader_kill(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    etcd_cluster.kill_member(leader)
    others = [m for m in etcd_cluster.members if m is not leader]
    # A quorum of two remains and elects a leader that accepts writes.
    from testbed.process import wait_until

    wait_until(
        lambda: _put_get_etcd(others[0].endpoint) == "ok", 15, what="write after leader kill"
    )
    etcd_cluster.restart_member(leader)
    assert leader.healthy()


def test_consul_agent_serves_kv(consul_agent: ConsulAgent) -> None:
    req = urllib.request.Request(f"{consul_agent.url}/v1/kv/harness", data=b"ok", method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read()) is True
    with urllib.request.urlopen(f"{consul_agent.url}/v1/kv/harness?raw", timeout=5) as resp:
        assert resp.read() == b"ok"


def test_docker_engine_answers(docker_client: object) -> None:
    assert docker_client.ping() is True  # type: ignore[attr-defined]
