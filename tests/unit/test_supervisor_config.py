"""Config loading: valid files, env overrides, and one clear error per kind of mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from supervisor.cli import app
from supervisor.config import ConfigError, load_config
from testbed.tls import CertPair, TestCA

BASE: dict[str, Any] = {
    "node": {"name": "a1", "cloud": "A", "zone": "a-1", "address": "127.0.0.1"},
    "dcs": {"backend": "etcd", "prefix": "t", "etcd": {"endpoints": ["127.0.0.1:2379"]}},
    "timing": {"ttl": 3},
    "consul": {"url": "http://127.0.0.1:8500"},
    "runner": {
        "kind": "process",
        "port_range": [7000, 7010],
        "data_root": "data",
        "state_dir": "state",
    },
    "http": {"listen": "127.0.0.1:8081"},
    "inventory": {
        "nodes": [{"name": "a1", "cloud": "A"}, {"name": "b1", "cloud": "B"}],
        "atsigns": [{"atsign": "@alice", "prefer_nodes": ["a1"]}, {"atsign": "bob"}],
    },
}


def write(tmp_path: Path, data: Any, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def with_(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return data


def test_valid_file_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), env={})
    assert cfg.node.name == "a1"
    assert cfg.runner.data_root == tmp_path / "data"
    assert [a.atsign for a in cfg.inventory.atsigns] == ["@alice", "@bob"]
    assert cfg.placement.failback == "manual"


def test_env_overrides_fields(tmp_path: Path) -> None:
    env = {
        "SUPERVISOR__DCS__BACKEND": "consul",
        "SUPERVISOR__TIMING__TTL": "12",
        "SUPERVISOR__PLACEMENT__CAPACITY": "3",
    }
    cfg = load_config(write(tmp_path, BASE), env=env)
    assert cfg.dcs.backend == "consul"
    assert cfg.timing.ttl == 12
    assert cfg.placement.capacity == 3


def test_inventory_from_a_file(tmp_path: Path) -> None:
    write(tmp_path, BASE["inventory"], "inventory.yaml")
    cfg = load_config(write(tmp_path, with_(inventory={"path": "inventory.yaml"})), env={})
    assert len(cfg.inventory.atsigns) == 2


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        (with_(node__name=None), "node.name", "required field is missing"),
        (with_(node__colour="red"), "node.colour", "unknown field"),
        (with_(dcs__backend="zookeeper"), "dcs.backend", "'etcd' or 'consul'"),
        (with_(dcs__etcd__endpoints=["localhost"]), "dcs.etcd.endpoints", "not host:port"),
        (with_(timing__renew_interval=2), "timing.renew_interval", "at most ttl/3"),
        (
            with_(timing__ttl=4, timing__renew_deadline=3.5),
            "timing.renew_deadline",
            "less than ttl",
        ),
        (with_(timing__ttl=1), "timing.ttl", "etcd needs ttl >= 2"),
        (with_(timing__ttl=2.5), "timing.ttl", "whole seconds"),
        (with_(runner__port_range=[9000, 8000]), "runner.port_range", "low <= high"),
        (with_(runner__kind="docker"), "runner", "no image"),
        (with_(http__listen="8081"), "http.listen", "not host:port"),
        (
            with_(consul__deregister_critical_after="30s"),
            "consul.deregister_critical_after",
            "minimum of 1m",
        ),
        (
            with_(consul__deregister_critical_after="soon"),
            "consul.deregister_critical_after",
            "not a duration",
        ),
        (
            with_(inventory__atsigns=[{"atsign": "@bad atsign"}]),
            "inventory.atsigns.0.atsign",
            "not a valid atSign",
        ),
        (
            with_(inventory__atsigns=[{"atsign": "@x"}, {"atsign": "x"}]),
            "inventory",
            "listed twice",
        ),
        (
            with_(inventory__atsigns=[{"atsign": "@x", "prefer_nodes": ["zz"]}]),
            "inventory.atsigns.0.prefer_nodes",
            "unknown node",
        ),
    ],
)
def test_each_mistake_names_file_field_and_problem(
    tmp_path: Path, data: dict[str, Any], field: str, problem: str
) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.file == str(path)
    assert info.value.field == field
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: {field}: ")


def test_consul_shards_default_list_and_errors_name_the_field(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE), env={}).consul.shards == (256,)
    cfg = load_config(write(tmp_path, with_(consul__shards=[1, 256])), env={})
    assert cfg.consul.shards == (1, 256)
    env = {"SUPERVISOR__CONSUL__SHARDS": "16"}
    assert load_config(write(tmp_path, BASE), env=env).consul.shards == (16,)
    for bad, problem in [
        ([1, 100], "shards must be 1 or a power of 2"),
        ([], "at least one shard count"),
        ([16, 8], "shard counts 16 and 8 both name"),
        ("many", "valid tuple"),
    ]:
        path = write(tmp_path, with_(consul__shards=bad))
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.field == "consul.shards", info.value
        assert problem in info.value.problem, info.value


def test_consul_minimum_ttl(tmp_path: Path) -> None:
    data = with_(dcs__backend="consul", dcs__etcd=None, timing__ttl=6)
    with pytest.raises(ConfigError, match=r"timing.ttl: consul needs ttl >= 10s"):
        load_config(write(tmp_path, data), env={})


def test_bad_yaml_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(write(tmp_path, "node:\n  name: a1\n  cloud: [A\nx: 1\n"), env={})
    with pytest.raises(ConfigError, match="file does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
    missing = write(tmp_path, with_(inventory={"path": "missing.yaml"}))
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert info.value.field == "inventory.path"


def test_env_override_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"timing\.ttl"):
        load_config(write(tmp_path, BASE), env={"SUPERVISOR__TIMING__TTL": "soon"})


def test_cli_exits_2_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, with_(timing__renew_interval=2))
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert "timing.renew_interval" in result.output
    ok = CliRunner().invoke(
        app, ["check-config", "--config", str(write(tmp_path, BASE, "ok.yaml"))]
    )
    assert ok.exit_code == 0, ok.output
    assert "self-fence after 1.5s" in ok.output
    assert "node API http without credentials" in ok.output


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name", ["node-etcd-process.yaml", "node-consul-process.yaml", "node-docker.yaml"]
)
def test_example_configs_load(test_ca: TestCA, server_cert: CertPair, name: str) -> None:
    env = {
        "SUPERVISOR__RUNNER__TLS__CA": str(test_ca.cert_path),
        "SUPERVISOR__RUNNER__TLS__CERT": str(server_cert.cert),
        "SUPERVISOR__RUNNER__TLS__KEY": str(server_cert.key),
    }
    cfg = load_config(REPO / "configs" / name, env=env)
    assert len(cfg.inventory.atsigns) == 6
    assert cfg.consul.service_name == "atserver"


def test_run_with_a_bad_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, with_(runner__port_range=[1, 0]))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: runner.port_range:" in result.output


def test_unusable_tls_files_are_config_errors(tmp_path: Path, server_cert: CertPair) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    path = write(tmp_path, with_(runner__tls={"ca": "ca.pem"}))
    with pytest.raises(ConfigError, match=r"runner\.tls: ca file .* holds no usable"):
        load_config(path, env={})
    path = write(tmp_path, with_(runner__tls={"cert": str(server_cert.cert), "key": "ca.pem"}))
    with pytest.raises(ConfigError, match=r"runner\.tls: cert .* are not a usable pair"):
        load_config(path, env={})


def test_several_etcd_members_need_a_deadline_that_outlasts_an_election(tmp_path: Path) -> None:
    data = with_(dcs__etcd__endpoints=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    with pytest.raises(ConfigError, match=r"timing\.ttl: with 3 etcd members a leader election"):
        load_config(write(tmp_path, data), env={})
    data["timing"]["ttl"] = 6
    assert load_config(write(tmp_path, data), env={}).timing.ttl == 6


def test_every_mistake_is_listed_each_on_its_own_line(tmp_path: Path) -> None:
    """Seven mistakes in four sections (one of them a cross-section rule): seven lines."""
    data = with_(
        node__cloud="",
        dcs__prefix="",
        timing__ttl=3.5,  # etcd lease TTLs are whole seconds
        runner__port_range=[9, 1],
        runner__kind="podman",
        http__listen="nowhere",
        inventory__atsigns=[{"atsign": "@x", "prefer_nodes": ["zz"]}],
    )
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    fields = [p.field for p in info.value.problems]
    assert sorted(fields) == sorted(
        [
            "node.cloud",
            "dcs.prefix",
            "timing.ttl",
            "runner.kind",
            "runner.port_range",
            "http.listen",
            "inventory.atsigns.0.prefer_nodes",
        ]
    ), fields
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 7, result.output
    assert all(line.startswith(f"{path}: ") for line in lines), result.output
    assert "more problem" not in result.output


def test_three_mistakes_three_lines(tmp_path: Path) -> None:
    path = write(tmp_path, with_(timing__ttl="soon", runner__state_dir=None, bogus=1))
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"{path}: bogus: unknown field (check the spelling)",
        f"{path}: timing.ttl: Input should be a valid number, unable to parse string as a number",
        f"{path}: runner.state_dir: required field is missing",
    ] or sorted(result.output.splitlines()) == sorted(
        [
            f"{path}: bogus: unknown field (check the spelling)",
            f"{path}: timing.ttl: Input should be a valid number, "
            "unable to parse string as a number",
            f"{path}: runner.state_dir: required field is missing",
        ]
    ), result.output


def test_mistakes_in_the_inventory_file_and_the_node_file_are_all_listed(tmp_path: Path) -> None:
    (tmp_path / "inventory.yaml").write_text(
        yaml.safe_dump({"nodes": [{"name": "a1", "cloud": "A"}], "atsigns": [{"atsign": "@a b"}]})
    )
    path = write(tmp_path, with_(inventory={"path": "inventory.yaml"}, timing__renew_interval=5))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    got = {(p.file, p.field) for p in info.value.problems}
    assert got == {
        (str(tmp_path / "inventory.yaml"), "atsigns.0.atsign"),
        (str(path), "timing.renew_interval"),
    }


@pytest.mark.parametrize("bad", ["@..", "@.", "@a/b", "@a\\b", "@../etc", "@a\u2028b"])
def test_check_config_refuses_atsigns_that_are_not_one_path_component(
    tmp_path: Path, bad: str
) -> None:
    path = write(tmp_path, with_(inventory__atsigns=[{"atsign": "@ok"}, {"atsign": bad}]))
    result = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: inventory.atsigns.1.atsign: not a valid atSign" in result.output


def test_consul_session_checks_need_a_lock_delay_above_the_deadline(tmp_path: Path) -> None:
    consul = {
        "backend": "consul",
        "prefix": "t",
        "consul": {"lock_delay": 5, "session_check_ttl": 4},
    }
    path = write(tmp_path, with_(dcs=consul, timing={"ttl": 10}))
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert (
        "dcs.consul.session_check_ttl: lock_delay (5s) must be above renew_deadline + "
        "stop_budget (7s)"
    ) in str(exc.value)
    consul["consul"] = {"lock_delay": 8, "session_check_ttl": 4}
    cfg = load_config(write(tmp_path, with_(dcs=consul, timing={"ttl": 10})), env={})
    assert cfg.dcs.consul is not None and cfg.dcs.consul.session_check_ttl == 4
