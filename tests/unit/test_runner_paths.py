"""Paths built from atSigns stay inside their root, in the daemon and in every runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from atserver_runner.base import RunnerError, WorkloadSpec
from atserver_runner.docker import DockerRunner
from atserver_runner.paths import PathEscape, atsign_dir, ensure_within
from atserver_runner.process import ProcessRunner


@pytest.mark.parametrize("bad", ["@", "@.", "@..", "@a/b", "@a\\b", "@a\0b", "@../x"])
def test_atsign_dir_refuses_anything_but_one_component(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PathEscape):
        atsign_dir(tmp_path, bad)


@pytest.mark.parametrize("name", ["@alice", "@a.b", "@...x", "@🦄"])
def test_atsign_dir_is_a_direct_child(tmp_path: Path, name: str) -> None:
    d = atsign_dir(tmp_path, name)
    assert d.parent == tmp_path and d.name == name[1:]


@pytest.mark.parametrize("inside", [False, True])
def test_ensure_within_is_lexical(tmp_path: Path, inside: bool) -> None:
    root = tmp_path / "data"
    path = root / "alice" if inside else root / "alice" / ".." / ".."
    if inside:
        assert ensure_within(root, path, "dir") == path
    else:
        with pytest.raises(PathEscape, match="is not inside"):
            ensure_within(root, path, "dir")
    with pytest.raises(PathEscape):
        ensure_within(root, root, "dir")


def spec(data_dir: Path) -> WorkloadSpec:
    return WorkloadSpec(
        atsign="@..", node="n1", port=1, data_dir=data_dir, fencing_token=1, command=("true",)
    )


@pytest.mark.parametrize("escape", ["..", "../other", "."])
def test_process_runner_refuses_a_data_dir_outside_its_root(tmp_path: Path, escape: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    runner = ProcessRunner("n1", tmp_path / "state", data_root=root)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunnerError, match="is not inside"):
        runner._start_sync(spec(root / escape))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert not list((tmp_path / "state").glob("*.json"))  # no pid file either


class NoDocker:
    """Any use of this 'client' fails the test: the check must come first."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the Docker client was used ({name}) before the path check")


@pytest.mark.parametrize("escape", ["..", "../other"])
def test_docker_runner_refuses_before_any_docker_call_or_chown(tmp_path: Path, escape: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "precious").write_text("x")
    runner = DockerRunner("n1", NoDocker(), image="img", data_root=root)
    with pytest.raises(RunnerError, match="is not inside"):
        runner._start_sync(spec(root / escape))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "precious"]


def test_pid_and_log_files_of_any_atsign_stay_in_the_state_dir(tmp_path: Path) -> None:
    runner = ProcessRunner("n1", tmp_path / "state")
    for name in ["@..", "@.", "@a/../../b", "@a\\b", "@"]:
        for path in (runner.pid_file(name), runner.log_file(name)):
            assert path.parent in (runner.state_dir, runner.log_dir), path
            assert path.name not in (".", "..")
