"""Durable key store of the dev atServer: an append-only log of JSON lines in the data dir.

Every write is appended and fsynced before it is acknowledged. At start the log is replayed
(a torn last line from a crash mid-write is dropped: it was never acknowledged) and rewritten
compacted (write to a temporary file, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_FILE_NAME = "keys.jsonl"


@dataclass
class Record:
    """One stored key with its value and metadata."""

    key: str
    value: str
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0

    def expired(self, now: float) -> bool:
        ttl = int(self.meta.get("ttl") or 0)
        return ttl > 0 and now >= self.updated_at + ttl / 1000.0

    def born(self, now: float) -> bool:
        ttb = int(self.meta.get("ttb") or 0)
        return ttb <= 0 or now >= self.updated_at + ttb / 1000.0

    def metadata_json(self) -> dict[str, Any]:
        """The ``metaData`` object the SDK parses (camelCase; dates as ISO strings)."""
        out: dict[str, Any] = {
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
            "version": self.version,
            "ttl": int(self.meta.get("ttl", 0)),
            "ttb": int(self.meta.get("ttb", 0)),
            "ttr": int(self.meta.get("ttr", 0)),
            "ccd": bool(self.meta.get("ccd", False)),
            "isBinary": bool(self.meta.get("isBinary", False)),
            "isEncrypted": bool(self.meta.get("isEncrypted", False)),
        }
        if self.meta.get("ttl"):
            out["expiresAt"] = _iso(self.updated_at + int(self.meta["ttl"]) / 1000.0)
        if self.meta.get("ttb"):
            out["availableAt"] = _iso(self.updated_at + int(self.meta["ttb"]) / 1000.0)
        for name, value in self.meta.items():
            if name not in out:
                out[name] = value
        return out


def _iso(epoch: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class StoreCorrupt(Exception):
    """A log line other than the last one is not a valid record."""


class KeyStore:
    """Keys of one atSign, persisted in ``data_dir/keys.jsonl``."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = data_dir / LOG_FILE_NAME
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._fd: int | None = None
        self.commit_id = 0
        """Sequence number of the last write (survives restarts and compaction)."""

    def open(self) -> None:
        """Replay the log, compact it, and open it for appending."""
        self._records = dict(self._replay())
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"op": "seq", "seq": self.commit_id}) + "\n")
            for rec in self._records.values():
                f.write(json.dumps(_encode("put", rec), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def snapshot(self) -> dict[str, Record]:
        """The records the log holds now, read only (no compaction, no file left open): for
        a checker reading an atSign's data through another node's mount."""
        return dict(self._replay())

    def _replay(self) -> Iterator[tuple[str, Record]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = raw.split(b"\n")
        records: dict[str, Record] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                op, rec = _decode(entry)
            except (ValueError, KeyError, TypeError) as exc:
                if number == len(lines) and not raw.endswith(b"\n"):
                    break  # torn last write: never acknowledged
                raise StoreCorrupt(f"{self.path} line {number}: {exc}") from None
            self.commit_id = max(self.commit_id, int(entry.get("seq", 0)))
            if op == "put":
                records[rec.key] = rec
            elif op == "delete":
                records.pop(rec.key, None)
        yield from records.items()

    def _append(self, op: str, rec: Record) -> None:
        if self._fd is None:
            raise RuntimeError("KeyStore used before open()")
        entry = _encode(op, rec)
        entry["seq"] = self.commit_id + 1
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        os.fsync(self._fd)
        self.commit_id += 1

    def get(self, key: str) -> Record | None:
        """The live record of ``key`` (not expired, already born), or ``None``."""
        rec = self._records.get(key)
        now = self._clock()
        if rec is None or rec.expired(now) or not rec.born(now):
            return None
        return rec

    def live_keys(self) -> list[str]:
        now = self._clock()
        return sorted(k for k, r in self._records.items() if not r.expired(now) and r.born(now))

    def put(self, key: str, value: str, meta: dict[str, Any]) -> Record:
        """Store durably (fsync) and return the new record."""
        now = self._clock()
        old = self._records.get(key)
        rec = Record(
            key=key,
            value=value,
            meta=dict(meta),
            created_at=old.created_at if old else now,
            updated_at=now,
            version=(old.version + 1) if old else 0,
        )
        self._append("put", rec)
        self._records[key] = rec
        return rec

    def delete(self, key: str) -> bool:
        """Delete durably; ``False`` if the key did not exist."""
        if key not in self._records:
            return False
        self._append("delete", Record(key=key, value=""))
        del self._records[key]
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _encode(op: str, rec: Record) -> dict[str, Any]:
    if op == "delete":
        return {"op": "delete", "key": rec.key}
    return {
        "op": "put",
        "key": rec.key,
        "value": rec.value,
        "meta": rec.meta,
        "created": rec.created_at,
        "updated": rec.updated_at,
        "version": rec.version,
    }


def _decode(entry: dict[str, Any]) -> tuple[str, Record]:
    op = entry["op"]
    if op == "seq":
        return op, Record(key="", value="")
    if op == "delete":
        return op, Record(key=str(entry["key"]), value="")
    if op != "put":
        raise ValueError(f"unknown op {op!r}")
    return op, Record(
        key=str(entry["key"]),
        value=str(entry["value"]),
        meta=dict(entry.get("meta", {})),
        created_at=float(entry["created"]),
        updated_at=float(entry["updated"]),
        version=int(entry.get("version", 0)),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
