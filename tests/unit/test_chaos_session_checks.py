"""``chaos run --session-checks``: the node configs the chaos cluster writes bind each
node's Consul session to its own agent, with timing that the supervisor's own config check
accepts (nothing is started: the configs are loaded as ``supervisor run`` would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chaos.cli import app
from chaos.cluster import SESSION_CHECK_TIMING, Cluster, ClusterSpec
from supervisor.config import load_config
from testbed.consul import ConsulAgent


def _config(tmp_path: Path, spec: ClusterSpec, relay_port: int | None = None) -> Path:
    cluster = Cluster(spec)
    cluster._agents["a1"] = ConsulAgent(tmp_path / "consul", name="a1", join=cluster.consul)
    if relay_port is not None:
        cluster._node_dcs["a1"] = [relay_port]
    doc = cluster.node_config(0, "a1", "cloud-a", 18470)
    path = tmp_path / "a1.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_session_checks_send_the_session_to_the_nodes_own_agent_with_valid_timing(
    tmp_path: Path,
) -> None:
    spec = ClusterSpec(tmp_path / "c", backend="consul", session_checks=True, storage="local")
    cfg = load_config(_config(tmp_path, spec))
    assert cfg.dcs.consul is not None
    assert cfg.dcs.consul.session_check_ttl == SESSION_CHECK_TIMING["dcs.consul.session_check_ttl"]
    assert cfg.dcs.consul.lock_delay == SESSION_CHECK_TIMING["dcs.consul.lock_delay"]
    assert cfg.dcs_consul_url == cfg.consul.url  # the node's agent: its serfHealth
    assert cfg.timing.renew_deadline == SESSION_CHECK_TIMING["timing.renew_deadline"]


def test_with_relays_the_node_reaches_its_agent_only_through_its_relay(tmp_path: Path) -> None:
    spec = ClusterSpec(
        tmp_path / "c", backend="consul", session_checks=True, storage="local", dcs_relays=True
    )
    cfg = load_config(_config(tmp_path, spec, relay_port=41234))
    assert cfg.dcs_consul_url == "http://127.0.0.1:41234"


def test_without_session_checks_the_session_is_ttl_only_on_the_server(tmp_path: Path) -> None:
    spec = ClusterSpec(tmp_path / "c", backend="consul", storage="local")
    cluster_cfg = load_config(_config(tmp_path, spec))
    assert cluster_cfg.dcs.consul is not None
    assert cluster_cfg.dcs.consul.session_check_ttl is None
    assert cluster_cfg.dcs.consul.lock_delay == spec.consul_lock_delay
    assert cluster_cfg.dcs_consul_url != cluster_cfg.consul.url


def test_session_checks_are_refused_on_etcd(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Consul setting"):
        ClusterSpec(tmp_path, backend="etcd", session_checks=True)
    result = CliRunner().invoke(app, ["run", "--backend", "etcd", "--session-checks"])
    assert result.exit_code == 2
    assert "--session-checks" in result.output
