"""``supervisor atsigns``: the atSign records in the DCS (``inventory.source: dcs``).

``add @alice [--prefer-nodes a1,b1] [--prefer-clouds A] [--disabled]``  create or update
``remove @alice``                 delete the record (its owner stops it; the data stays)
``list [--json]``                 every record
``import FILE [--dry-run] [--prune]``  an ``inventory.yaml``: all entries or none
``export``                        every record, in the ``inventory.yaml`` format

Writes need a credential that may write ``<prefix>/atsigns/`` (docs/supervisor.md, The
inventory in the DCS); give it like any config field, e.g.
``SUPERVISOR__DCS__CONSUL__TOKEN=...``. Exit codes: 0 done, 1 the DCS failed, 2 bad input
(nothing was written).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
import yaml

from leases.base import Backend, LeaseError
from leases.records import (
    AtSignRecord,
    RecordChanges,
    RecordProblem,
    make_record,
)
from supervisor.cli_common import ConfigOpt, err, load
from supervisor.config import SupervisorConfig
from supervisor.deadline import within
from supervisor.inventory_ops import (
    export_doc,
    import_records,
    parse_inventory_doc,
    put_record,
    remove_record,
)

atsigns_app = typer.Typer(
    help="The atSign records in the DCS: add, remove, list, import, export.",
    no_args_is_help=True,
)

DCS_TIMEOUT = 30.0
T = TypeVar("T")
AtSignArg = Annotated[str, typer.Argument(help="the atSign, e.g. @alice")]


def _with_backend(cfg: SupervisorConfig, work: Callable[[Backend], Awaitable[T]]) -> T:
    """Run ``work`` against the node's DCS; a DCS failure exits 1 with one line."""
    from supervisor.wiring import build_backend

    async def go() -> T:
        backend = build_backend(cfg)
        try:
            return await within(work(backend), DCS_TIMEOUT)
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    except (LeaseError, TimeoutError, OSError) as exc:
        err(f"{cfg.dcs.backend}: {exc or type(exc).__name__}")
        raise typer.Exit(1) from None


def _print_changes(changes: RecordChanges, dry_run: bool) -> None:
    verb = "would" if dry_run else "did"
    for r in changes.added:
        typer.echo(f"add {r.atsign}")
    for r in changes.updated:
        typer.echo(f"update {r.atsign}")
    for a in changes.removed:
        typer.echo(f"remove {a}")
    typer.echo(f"{verb}: {changes.summary()}")


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@atsigns_app.command()
def add(
    config: ConfigOpt,
    atsign: AtSignArg,
    prefer_nodes: Annotated[
        str | None, typer.Option("--prefer-nodes", help="comma-separated node names")
    ] = None,
    prefer_clouds: Annotated[
        str | None, typer.Option("--prefer-clouds", help="comma-separated cloud names")
    ] = None,
    disabled: Annotated[
        bool, typer.Option("--disabled", help="record it, but run it nowhere")
    ] = False,
) -> None:
    """Create the atSign's record, or replace its policy; served within about a second."""
    cfg = load(config)
    try:
        record = make_record(
            atsign,
            {
                "prefer_nodes": _names(prefer_nodes),
                "prefer_clouds": _names(prefer_clouds),
                "disabled": disabled,
            },
        )
    except RecordProblem as exc:
        msg = str(exc)  # "atsign: ..." or "@alice: prefer_nodes: ..."
        where = "ATSIGN" if msg.startswith("atsign:") else "--prefer-nodes/--prefer-clouds"
        err(f"{where}: {msg}")
        raise typer.Exit(2) from None

    async def work(backend: Backend) -> tuple[int, str]:
        return await put_record(backend, record, {n.name for n in cfg.inventory.nodes})

    code, said = _with_backend(cfg, work)
    if code:
        err(said)
        raise typer.Exit(code)
    typer.echo(said)


@atsigns_app.command()
def remove(config: ConfigOpt, atsign: AtSignArg) -> None:
    """Delete the atSign's record: its owner deregisters, stops and releases it; the data
    stays in its data dir."""
    cfg = load(config)
    try:
        name = make_record(atsign, {}).atsign
    except RecordProblem as exc:
        err(f"ATSIGN: {exc}")
        raise typer.Exit(2) from None

    async def work(backend: Backend) -> bool:
        return await remove_record(backend, name)

    if not _with_backend(cfg, work):
        err(f"{name}: no such record")
        raise typer.Exit(1)
    typer.echo(f"removed {name}")


@atsigns_app.command("list")
def list_(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every atSign record (and any stored value that is not a valid record)."""
    cfg = load(config)
    records, problems = _with_backend(cfg, lambda b: b.atsign_records())
    if as_json:
        doc = export_doc(records)
        doc["invalid"] = problems
        typer.echo(json.dumps(doc, indent=2))
        return
    for a in sorted(records):
        r = records[a]
        policy = []
        if r.prefer_nodes:
            policy.append("prefer_nodes=" + ",".join(r.prefer_nodes))
        if r.prefer_clouds:
            policy.append("prefer_clouds=" + ",".join(r.prefer_clouds))
        if r.disabled:
            policy.append("disabled")
        typer.echo(f"{a} {' '.join(policy)}".rstrip())
    for name, problem in sorted(problems.items()):
        typer.echo(f"invalid record {name}: {problem}", err=True)
    typer.echo(f"{len(records)} record(s)", err=True)


@atsigns_app.command()
def export(config: ConfigOpt) -> None:
    """Every record as an ``inventory.yaml`` (``import`` takes it back)."""
    cfg = load(config)
    records, _ = _with_backend(cfg, lambda b: b.atsign_records())
    typer.echo(yaml.safe_dump(export_doc(records), sort_keys=False), nl=False)


def parse_inventory_file(path: Path) -> tuple[list[AtSignRecord], set[str], list[str]]:
    """(records, the file's node names, problems) of an ``inventory.yaml``; every problem
    names the file and the entry."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        return [], set(), [f"{path}: cannot read: {exc.strerror or exc}"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        return [], set(), [f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]
    return parse_inventory_doc(doc, str(path))


@atsigns_app.command("import")
def import_(
    config: ConfigOpt,
    file: Annotated[Path, typer.Argument(help="an inventory.yaml (atsigns: [...])")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would change, write nothing")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="also remove records the file does not list")
    ] = False,
) -> None:
    """Write every entry of the file, or none: any bad entry (an invalid atSign, a
    duplicate, an unknown node, a malformed file) is named and nothing is written.
    Idempotent: a second import changes nothing."""
    cfg = load(config)
    records, file_nodes, problems = parse_inventory_file(file)
    if problems:
        for p in problems:
            err(p)
        err("nothing was written")
        raise typer.Exit(2)

    async def work(backend: Backend) -> tuple[RecordChanges, list[str]]:
        static = {n.name for n in cfg.inventory.nodes} | file_nodes
        return await import_records(backend, records, static, dry_run=dry_run, prune=prune)

    changes, bad = _with_backend(cfg, work)
    if bad:
        for p in bad:
            err(f"{file}: {p}")
        err("nothing was written")
        raise typer.Exit(2)
    _print_changes(changes, dry_run)
