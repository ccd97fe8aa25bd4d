"""AtSign records: the inventory kept in the DCS (``<prefix>/atsigns/<atsign>``, no lease).

A record holds one atSign's placement policy and whether it is disabled. Unknown fields are
kept as they are (``extra``) so that a newer writer's fields survive an older node's read;
known fields are validated on every read and write, so a bad record names itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from leases.base import ClaimEventKind, normalize_atsign

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KNOWN_FIELDS = ("prefer_nodes", "prefer_clouds", "disabled")
TXN_OPS = 64
"""Operations per DCS transaction when records are written (Consul 1.8 allows 64 per txn,
etcd 128 by default): a larger write goes in several transactions, each all-or-nothing."""


RECORDS_TIMEOUT = 5.0
"""Seconds a record read or write may take: records are not on the failover path, and a
busy node's DCS client (its request timeout sized for renewals, 0.4 s at ttl 4) must not
fail a registrar's write under load."""


class RecordProblem(ValueError):
    """A record (or a field of one) that is not valid; the message names it."""


@dataclass(frozen=True)
class AtSignRecord:
    """One atSign of the inventory: where it would rather run, and whether it runs at all."""

    atsign: str
    prefer_nodes: tuple[str, ...] = ()
    prefer_clouds: tuple[str, ...] = ()
    disabled: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            **dict(self.extra),
            "prefer_nodes": list(self.prefer_nodes),
            "prefer_clouds": list(self.prefer_clouds),
            "disabled": self.disabled,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":")).encode()

    def same_as(self, other: AtSignRecord | None) -> bool:
        """Equal content (what a write would change)."""
        return other is not None and self.encode() == other.encode()


def _names(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise RecordProblem(f"{where}: expected a list of names, got {type(value).__name__}")
    out: list[str] = []
    for v in value:
        name = str(v).strip() if isinstance(v, str) else None
        if not name or not NODE_NAME.match(name):
            raise RecordProblem(f"{where}: {v!r} is not a node or cloud name")
        if name in out:
            raise RecordProblem(f"{where}: {name} is listed twice")
        out.append(name)
    return tuple(out)


def make_record(atsign: str, data: Mapping[str, Any], where: str = "") -> AtSignRecord:
    """Validate ``data`` (a record's JSON or an inventory entry) into a record; raise
    :class:`RecordProblem` naming ``where`` and the field otherwise."""
    at = f"{where}: " if where else ""
    try:
        name = normalize_atsign(atsign)
    except ValueError as exc:
        raise RecordProblem(f"{at}atsign: {exc}") from None
    if not isinstance(data, Mapping):
        raise RecordProblem(f"{at}{name}: a record must be a mapping")
    disabled = data.get("disabled", False)
    if not isinstance(disabled, bool):
        raise RecordProblem(f"{at}{name}: disabled: expected true or false, got {disabled!r}")
    extra = {k: v for k, v in data.items() if k not in (*KNOWN_FIELDS, "atsign")}
    return AtSignRecord(
        atsign=name,
        prefer_nodes=_names(f"{at}{name}: prefer_nodes", data.get("prefer_nodes")),
        prefer_clouds=_names(f"{at}{name}: prefer_clouds", data.get("prefer_clouds")),
        disabled=disabled,
        extra=extra,
    )


def decode_record(atsign: str, raw: bytes | str | None) -> AtSignRecord:
    """A record as stored; raise :class:`RecordProblem` for one that is not valid JSON."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise RecordProblem(f"the record of {atsign} is not JSON: {exc}") from None
    return make_record(atsign, data, "record")


def unknown_nodes(records: Iterable[AtSignRecord], known: Iterable[str]) -> list[str]:
    """``"@alice: prefer_nodes: unknown node(s) ['z9']"`` for each record naming a node not
    in ``known``."""
    names = set(known)
    out = []
    for r in records:
        missing = [n for n in r.prefer_nodes if n not in names]
        if missing:
            out.append(f"{r.atsign}: prefer_nodes: unknown node(s) {missing}")
    return out


@dataclass(frozen=True)
class RecordChanges:
    """What writing a set of records would change."""

    added: tuple[AtSignRecord, ...] = ()
    updated: tuple[AtSignRecord, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.removed)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
            f"{self.unchanged} unchanged"
        )


def diff_records(
    current: Mapping[str, AtSignRecord],
    wanted: Sequence[AtSignRecord],
    *,
    remove_missing: bool = False,
) -> RecordChanges:
    """The writes that turn ``current`` into ``wanted`` (with ``remove_missing``, records not
    in ``wanted`` are removed too)."""
    added, updated = [], []
    unchanged = 0
    names = set()
    for r in wanted:
        names.add(r.atsign)
        old = current.get(r.atsign)
        if old is None:
            added.append(r)
        elif r.same_as(old):
            unchanged += 1
        else:
            updated.append(r)
    removed = sorted(a for a in current if a not in names) if remove_missing else []
    return RecordChanges(tuple(added), tuple(updated), tuple(removed), unchanged)


@dataclass(frozen=True)
class RecordEvent:
    """One change seen by :meth:`leases.base.Backend.watch_atsign_records`."""

    kind: ClaimEventKind
    atsign: str | None = None
    record: AtSignRecord | None = None
    """The new record (PUT); ``None`` for a DELETE, or for a PUT whose value is not valid
    (``problem`` says why: treat it as absent)."""
    problem: str = ""
    snapshot: Mapping[str, AtSignRecord] | None = None
    revision: int = 0


def chunks(items: Sequence[Any], size: int = TXN_OPS) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items[:0]]


def record_from_stored(name: str, raw: bytes | str | None) -> tuple[AtSignRecord | None, str]:
    """(record, "") for a stored value under ``<prefix>/atsigns/<name>``, or (None, why)."""
    try:
        return decode_record(name, raw), ""
    except RecordProblem as exc:
        return None, str(exc)
