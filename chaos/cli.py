"""``python -m chaos``: the demo and chaos runs on a local cluster.

Exit codes: 0 ok; 1 something did not come up, a bound was missed, or the checker found a
violation; 2 bad arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Local cluster demo and chaos runs for the atSign failover layer.", no_args_is_help=True
)


@app.callback()
def main() -> None:
    """Local cluster demo and chaos runs for the atSign failover layer."""


def _backend(value: str) -> str:
    if value not in ("etcd", "consul"):
        raise typer.BadParameter(f"must be etcd or consul, got {value!r}")
    return value


@app.command()
def demo(
    backend: Annotated[str, typer.Option(callback=_backend, help="etcd or consul")] = "etcd",
    nodes: Annotated[int, typer.Option(min=2, max=8, help="supervisor nodes")] = 4,
    atsigns: Annotated[int, typer.Option(min=1, max=50, help="atSigns")] = 6,
    duration: Annotated[
        float, typer.Option(min=30, help="overall bound in seconds (the tour fails after it)")
    ] = 240.0,
    base_dir: Annotated[
        Path | None, typer.Option(help="where configs, data and logs go [a new temp dir]")
    ] = None,
    interactive: Annotated[
        bool | None,
        typer.Option(help="live table and kill prompt [when stdin is a terminal]"),
    ] = None,
) -> None:
    """Start a local cluster, show who owns what, and fail a node over."""
    from chaos.demo import run_demo

    raise typer.Exit(run_demo(backend, nodes, atsigns, duration, base_dir, interactive))


if __name__ == "__main__":
    app()
