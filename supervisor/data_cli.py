"""``supervisor data``: the data guard's operator commands (see docs/supervisor.md, Data guard).

``supervisor data show @alice``    what the DCS records and what this node's data dir holds
``supervisor data accept @alice``  record this node's data dir as the atSign's latest
                                   (a restore from backup); only prints without ``--yes``
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer

from atserver_runner.paths import PathEscape, atsign_dir
from leases.base import Claim, Generation, LeaseError, normalize_atsign
from supervisor import data_guard
from supervisor.cli_common import ConfigOpt, err, load
from supervisor.config import SupervisorConfig
from supervisor.deadline import within

data_app = typer.Typer(
    help="The data guard: what is recorded where, and the way out after a restore.",
    no_args_is_help=True,
)

AtSignArg = Annotated[str, typer.Argument(help="the atSign, e.g. @alice")]
DCS_TIMEOUT = 10.0


def _atsign(value: str) -> str:
    try:
        return normalize_atsign(value)
    except ValueError as exc:
        err(f"ATSIGN: {exc}")
        raise typer.Exit(2) from None


def _describe(g: Generation | None) -> str:
    if g is None:
        return "the DCS has no generation record"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.time)) if g.time else "?"
    how = f"accepted by {g.accepted_by}" if g.accepted_by else f"on {g.node}"
    return f"the last start was generation {g.token} {how} at {when} (dir {g.dir_id[:8]})"


def _holds(m: data_guard.Marker | None) -> str:
    if m is None:
        return "this data dir holds no generation"
    return f"this data dir holds generation {m.token} (dir {m.dir_id[:8]}, from {m.node or '?'})"


async def _read(cfg: SupervisorConfig, atsign: str) -> tuple[Claim | None, Generation | None]:
    from supervisor.wiring import build_backend

    backend = build_backend(cfg)
    try:
        claim = await within(backend.owner(atsign), DCS_TIMEOUT)
        record = await within(backend.generation(atsign), DCS_TIMEOUT)
        return claim, record
    finally:
        await backend.close()


def _data_dir_and_marker(
    cfg: SupervisorConfig, atsign: str
) -> tuple[Path, data_guard.Marker | None]:
    try:
        data_dir = atsign_dir(cfg.runner.data_root, atsign)
    except PathEscape as exc:
        err(f"ATSIGN: {exc}")
        raise typer.Exit(2) from None
    if not data_dir.is_dir():
        err(f"{atsign}: no data dir at {data_dir} on {cfg.node.name}")
        raise typer.Exit(1)
    try:
        return data_dir, data_guard.read_marker(data_dir)
    except data_guard.MarkerUnreadable as exc:
        err(f"{atsign}: {exc}")
        raise typer.Exit(1) from None


def _look(
    cfg: SupervisorConfig, atsign: str
) -> tuple[str, Path, data_guard.Marker | None, Claim | None, Generation | None]:
    """(atSign, data dir, its marker, the claim, the generation record); exits 1 (2 for a
    bad atSign) with one line when any of them cannot be read."""
    name = _atsign(atsign)
    data_dir, marker = _data_dir_and_marker(cfg, name)
    try:
        claim, record = asyncio.run(_read(cfg, name))
    except (TimeoutError, LeaseError) as exc:
        err(f"cannot read the DCS: {exc!r}")
        raise typer.Exit(1) from None
    return name, data_dir, marker, claim, record


@data_app.command()
def show(atsign: AtSignArg, config: ConfigOpt) -> None:
    """What the DCS records as the atSign's latest start, and what this node's copy holds."""
    cfg = load(config)
    name, data_dir, marker, claim, record = _look(cfg, atsign)
    verdict = data_guard.verdict(record, marker)
    typer.echo(f"{name}: {_describe(record)}; {_holds(marker)} ({data_dir})")
    owner = f"held by {claim.info.node} (token {claim.token})" if claim else "not claimed"
    state = "current: may start here" if verdict.ok else f"refused here: {verdict.reason}"
    typer.echo(f"{name}: {owner}; this data dir is {state}")


@data_app.command()
def accept(
    atsign: AtSignArg,
    config: ConfigOpt,
    yes: Annotated[bool, typer.Option("--yes", help="record it (without: only say what)")] = False,
) -> None:
    """Record this node's data dir as the atSign's latest generation (after a restore).

    Says what is given up. Exits 1 while the atSign is claimed (running) anywhere: stop it
    or hand it off first.
    """
    cfg = load(config)
    name, data_dir, marker, claim, record = _look(cfg, atsign)
    if claim is not None:
        err(
            f"{name} is running on {claim.info.node} (token {claim.token}): nothing was "
            "recorded; stop it (drain or hand it off) before accepting another copy"
        )
        raise typer.Exit(1)
    if data_guard.verdict(record, marker).ok:
        typer.echo(f"{name}: nothing to accept: {_holds(marker)}, which is the latest")
        return
    typer.echo(
        f"accepting {data_dir} on {cfg.node.name} as {name}'s latest data: {_describe(record)}; "
        f"{_holds(marker)}. Whatever was written after that copy was made is given up."
    )
    if not yes:
        typer.echo("(nothing recorded: give --yes to record it)")
        return
    dir_id = marker.dir_id if marker is not None else data_guard.new_dir_id()
    prev = marker.token if marker is not None else 0
    expected = record.token if record is not None else 0
    try:
        new = asyncio.run(_accept(cfg, name, expected, dir_id, prev))
    except (TimeoutError, LeaseError) as exc:
        err(f"cannot write the DCS: {exc!r}")
        raise typer.Exit(1) from None
    if new is None:
        err(f"{name} was claimed, or its record changed, meanwhile: nothing was recorded")
        raise typer.Exit(1)
    data_guard.stamp_marker(data_dir, new.token, dir_id, cfg.node.name, name)
    typer.echo(f"{name}: recorded generation {new.token} for {data_dir} ({cfg.node.name})")


async def _accept(
    cfg: SupervisorConfig, atsign: str, expected: int, dir_id: str, prev: int
) -> Generation | None:
    from supervisor.wiring import build_backend

    backend = build_backend(cfg)
    try:
        return await within(
            backend.accept_generation(atsign, expected, cfg.node.name, dir_id, prev), DCS_TIMEOUT
        )
    finally:
        await backend.close()
