"""Writes of single atSign records, shared by ``supervisor atsigns`` and the node API's
registrar calls (``POST /atsigns``, ``POST /atsigns/remove``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from leases.base import Backend
from leases.records import (
    AtSignRecord,
    RecordChanges,
    RecordProblem,
    diff_records,
    make_record,
    unknown_nodes,
)


async def known_nodes(
    backend: Backend, static: Iterable[str] = (), records: Mapping[str, AtSignRecord] | None = None
) -> set[str]:
    """Nodes a record may prefer: the live members, a static node list (a config's or a
    file's ``nodes``), and the nodes that ``records`` (already read) prefer."""
    known = set(await backend.nodes()) | set(static)
    for r in (records or {}).values():
        known |= set(r.prefer_nodes)
    return known


async def put_record(
    backend: Backend, record: AtSignRecord, static_nodes: Iterable[str] = ()
) -> tuple[int, str]:
    """Create or replace one record: (0, "added @alice" / "updated" / "unchanged"), or
    (2, why) for a record naming a node that is neither live nor listed (nothing written).
    Fields a newer writer added to the stored record are kept. Reads one key and the node
    records, not every atSign record."""
    if record.prefer_nodes:
        problems = unknown_nodes([record], await known_nodes(backend, static_nodes))
        if problems:
            return 2, f"prefer_nodes: {problems[0]}; nothing was written"
    old = await backend.atsign_record(record.atsign)
    if record.same_as(old):
        return 0, f"unchanged {record.atsign}"
    if old is not None:
        record = AtSignRecord(
            record.atsign,
            record.prefer_nodes,
            record.prefer_clouds,
            record.disabled,
            {**old.extra, **record.extra},
        )
    await backend.write_atsign_records([record])
    return 0, f"{'updated' if old else 'added'} {record.atsign}"


async def remove_record(backend: Backend, atsign: str) -> bool:
    """Delete one record (also one whose value is not valid); False when there is none."""
    if await backend.atsign_record(atsign) is None:
        records, problems = await backend.atsign_records()
        if atsign not in records and atsign not in problems:
            return False
    await backend.write_atsign_records([], [atsign])
    return True


def export_doc(records: Mapping[str, AtSignRecord]) -> dict[str, Any]:
    """The records in the ``inventory.yaml`` format (``atsigns: [...]``), sorted."""
    entries = []
    for a in sorted(records):
        r = records[a]
        entry: dict[str, Any] = {"atsign": a}
        if r.prefer_nodes:
            entry["prefer_nodes"] = list(r.prefer_nodes)
        if r.prefer_clouds:
            entry["prefer_clouds"] = list(r.prefer_clouds)
        if r.disabled:
            entry["disabled"] = True
        entry.update({k: v for k, v in r.extra.items() if k not in entry})
        entries.append(entry)
    return {"atsigns": entries}


def parse_inventory_doc(
    doc: Any, where_file: str
) -> tuple[list[AtSignRecord], set[str], list[str]]:
    """(records, node names, problems) of an ``inventory.yaml`` document (``{nodes: [...],
    atsigns: [...]}``); every problem names ``where_file`` and the entry."""
    if not isinstance(doc, dict) or not isinstance(doc.get("atsigns", []), list):
        return [], set(), [f"{where_file}: expected a mapping with an 'atsigns' list"]
    nodes = set()
    problems: list[str] = []
    for i, n in enumerate(doc.get("nodes") or []):
        if isinstance(n, dict) and isinstance(n.get("name"), str):
            nodes.add(n["name"])
        else:
            problems.append(f"{where_file}: nodes.{i}: expected a mapping with a name")
    records: list[AtSignRecord] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc.get("atsigns") or []):
        where = f"{where_file}: atsigns.{i}"
        if not isinstance(entry, dict) or "atsign" not in entry:
            problems.append(f"{where}: expected a mapping with an atsign")
            continue
        try:
            record = make_record(str(entry["atsign"]), entry, where)
        except RecordProblem as exc:
            problems.append(str(exc))
            continue
        if record.atsign in seen:
            problems.append(
                f"{where}: {record.atsign} is listed twice (also atsigns.{seen[record.atsign]})"
            )
            continue
        seen[record.atsign] = i
        records.append(record)
    return records, nodes, problems


async def import_records(
    backend: Backend,
    records: Sequence[AtSignRecord],
    static_nodes: Iterable[str] = (),
    *,
    dry_run: bool = False,
    prune: bool = False,
) -> tuple[RecordChanges, list[str]]:
    """Write every record or none: (what changes, problems). A record naming an unknown node
    is a problem, and then nothing is written; so is ``dry_run``. Fields a newer writer added
    to a stored record stay unless the record gives them. ``prune``: records not listed go."""
    current, _ = await backend.atsign_records()
    known = await known_nodes(backend, static_nodes, current)
    bad = unknown_nodes(records, known)
    changes = diff_records(current, records, remove_missing=prune)
    if bad or dry_run or changes.empty:
        return changes, bad
    merged = [
        AtSignRecord(
            r.atsign,
            r.prefer_nodes,
            r.prefer_clouds,
            r.disabled,
            {**current[r.atsign].extra, **r.extra} if r.atsign in current else r.extra,
        )
        for r in changes.updated
    ]
    await backend.write_atsign_records([*changes.added, *merged], changes.removed)
    return changes, bad
