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
