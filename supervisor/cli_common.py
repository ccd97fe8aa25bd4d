"""What every ``supervisor`` subcommand shares: the --config option, errors, config loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from supervisor.config import ConfigError, SupervisorConfig, load_config

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="SUPERVISOR_CONFIG", help="the node's YAML file"),
]


def err(message: str) -> None:
    """One plain line on stderr (no markup: messages quote user input like [low, high])."""
    typer.echo(message, err=True)


def load(path: Path) -> SupervisorConfig:
    """The node's config; on mistakes print every one (FILE: FIELD: PROBLEM) and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            err(str(problem))
        raise typer.Exit(2) from None
