"""Settings: precedence and errors that name the setting and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from directory.config import ConfigError, load_config


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    return {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}


def test_command_line_beats_environment_beats_file(tmp_path: Path, pem: dict[str, str]) -> None:
    f = tmp_path / "d.yaml"
    f.write_text("port: 1064\nidle_timeout: 5\nmax_connections: 7\n")
    env = {"ATDIRECTORY_PORT": "2064", "ATDIRECTORY_IDLE_TIMEOUT": "6"}
    cfg = load_config({"port": 3064, **pem}, env, f)
    assert (cfg.port, cfg.idle_timeout, cfg.max_connections) == (3064, 6.0, 7)
    assert load_config(pem, {}).port == 64


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({"port": 70000}, {}, "--port (command line): Input should be less than or equal"),
        ({}, {"ATDIRECTORY_PORTT": "1"}, "environment variable ATDIRECTORY_PORTT: unknown"),
        ({}, {"ATDIRECTORY_IDLE_TIMEOUT": "x"}, "ATDIRECTORY_IDLE_TIMEOUT (environment)"),
        ({"consul": "127.0.0.1:8500"}, {}, "--consul (command line): Value error, must be"),
        ({"cert": "/nonexistent.pem"}, {}, "/nonexistent.pem' does not exist"),
    ],
)
def test_errors_name_the_setting_and_source(
    pem: dict[str, str], cli: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**pem, **cli}, env)
    assert message in str(err.value)


def test_missing_cert_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--cert / ATDIRECTORY_CERT / config file cert: required"):
        load_config({}, {})
    f = tmp_path / "d.yaml"
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match=f"config file {f}: top level must be a mapping"):
        load_config({}, {}, f)
    f.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match=f"{f}: prot: unknown setting"):
        load_config({}, {}, f)


def test_shards_from_every_source(tmp_path: Path, pem: dict[str, str]) -> None:
    # A fresh deployment: 256 shards, as the supervisors' consul.shards default.
    assert load_config(pem, {}).shards == (256,)
    assert load_config(pem, {}).services[:2] == ["atserver-00", "atserver-01"]
    assert load_config({**pem, "shards": "1"}, {}).services == ["atserver"]
    assert load_config({**pem, "shards": "1, 256"}, {}).shards == (1, 256)
    assert load_config(pem, {"ATDIRECTORY_SHARDS": "16"}).shards == (16,)
    f = tmp_path / "d.yaml"
    f.write_text("shards: [1, 4096]\nservice: at-x\n")
    cfg = load_config(pem, {}, f)
    assert cfg.shards == (1, 4096) and len(cfg.services) == 4097
    assert cfg.services[:2] == ["at-x", "at-x-000"]
    f.write_text("shards: 256\n")
    assert load_config(pem, {}, f).shards == (256,)


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({"shards": "100"}, {}, "--shards (command line): Value error, shards must be 1 or a"),
        ({"shards": "8,16"}, {}, "--shards (command line): Value error, shard counts 8 and 16"),
        ({}, {"ATDIRECTORY_SHARDS": "a,b"}, "ATDIRECTORY_SHARDS (environment): Value error, must"),
        ({"shards": ""}, {}, "--shards (command line): Value error, must be shard counts"),
        ({"service": "At Server"}, {}, "--service (command line): String should match pattern"),
        ({"consul_list_wait": 0.5}, {}, "--consul-list-wait (command line): Input should be"),
    ],
)
def test_layout_errors_name_the_setting(
    pem: dict[str, str], cli: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**pem, **cli}, env)
    assert message in str(err.value)


def test_layout_error_in_the_file_names_the_file_and_key(
    tmp_path: Path, pem: dict[str, str]
) -> None:
    f = tmp_path / "d.yaml"
    f.write_text("shards: [1, 3]\n")
    with pytest.raises(ConfigError, match=f"{f}: shards: Value error, shards must be"):
        load_config(pem, {}, f)
