"""The dev atServer's command line: bad arguments name the option and exit 2 (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from atserver_runner import devserver
from atserver_runner.devserver.__main__ import main, parse_args


@pytest.fixture
def base_args(tmp_path: Path) -> list[str]:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    return devserver.argv(
        python=None,
        atsign="@Alice",
        port=6464,
        data_dir=tmp_path / "d",
        fencing_token=3,
        cert=cert,
        key=key,
    )


def test_argv_round_trips_through_the_parser(base_args: list[str]) -> None:
    cfg = parse_args([*base_args, "--max-connections", "7", "--pkam-public-key", "AAAA"])
    assert (cfg.atsign, cfg.port, cfg.fencing_token) == ("@alice", 6464, 3)
    assert cfg.max_connections == 7 and cfg.pkam_public_key == "AAAA"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--port", "70000"], "--port: 70000 is not a TCP port"),
        (["--fencing-token", "-1"], "--fencing-token: must be >= 0"),
        (["--atsign", "not valid"], "--atsign: not an atSign"),
        (["--max-connections", "0"], "--max-connections: must be at least 1"),
        (["--write-timeout", "0"], "--write-timeout: must be > 0"),
        (["--max-line-bytes", "10"], "--max-line-bytes: must be at least 1024"),
        (["--cert", "/nonexistent.pem"], "--cert: /nonexistent.pem is not a readable file"),
    ],
)
def test_bad_arguments_name_the_option(
    base_args: list[str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*base_args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_required_option_mentions_the_environment_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ATSERVER_ATSIGN", "ATSERVER_PORT", "ATSERVER_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--port", "1"]) == 2
    assert "ATSERVER_ATSIGN" in capsys.readouterr().err


def test_environment_configures_the_server(
    base_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATSERVER_FENCING_TOKEN", "99")
    args = list(base_args)
    i = args.index("--fencing-token")
    del args[i : i + 2]
    assert parse_args(args).fencing_token == 99
