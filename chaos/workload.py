"""The workload client: keeps writing and reading keys on every atSign through the directory.

Each atSign gets one task that finds its atServer through the directory, logs in with PKAM,
and loops ``update`` (a fresh key and value each time) then ``llookup`` of that key. Every
operation is recorded (:class:`OpRecord`); an acknowledged write is one whose ``update``
returned ``data:<commit id>``. :meth:`WorkloadClient.verify` reads every acknowledged write
back at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from chaos.atclient import AtConnection, AtError, lookup
from chaos.cluster import AtSignKeys


@dataclass(frozen=True)
class OpRecord:
    """One client operation (wall-clock seconds)."""

    atsign: str
    op: str
    """``write``, ``read`` (read-after-write on the same connection) or ``connect``."""
    key: str
    value: str
    start: float
    end: float
    ok: bool
    server: str = ""
    token: int | None = None
    """The fencing token the server reported (``info:brief``) when the connection opened."""
    error: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """The end-of-run read-back of every acknowledged write."""

    checked: int
    lost: list[dict[str, str]]
    unreadable_atsigns: dict[str, str]
    """atSign -> the last error, for atSigns whose writes could not all be read back."""


class WorkloadClient:
    """Writes and reads on every atSign until :meth:`stop`; see the module docstring."""

    def __init__(
        self,
        atsigns: Sequence[AtSignKeys],
        directory: tuple[str, int],
        ssl_ctx: ssl.SSLContext,
        *,
        interval: float = 0.25,
        op_timeout: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.atsigns = list(atsigns)
        self.directory = directory
        self.ssl_ctx = ssl_ctx
        self.interval = interval
        self.op_timeout = op_timeout
        self.clock = clock
        self.records: list[OpRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for keys in self.atsigns:
            self._tasks.append(asyncio.create_task(self._loop(keys), name=f"client-{keys.atsign}"))

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=4 * self.op_timeout + 5)
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    def acknowledged(self) -> list[OpRecord]:
        return [r for r in self.records if r.op == "write" and r.ok]

    async def _connect(self, conn: AtConnection) -> int | None:
        where = await lookup(*self.directory, conn.atsign, self.ssl_ctx, self.op_timeout)
        if where is None:
            raise AtError(f"directory has no passing instance of {conn.atsign}")
        await conn.connect(*where)
        info = json.loads(await conn.info())
        token = info.get("fencingToken")
        return int(token) if token is not None else None

    async def _loop(self, keys: AtSignKeys) -> None:
        conn = AtConnection(keys.atsign, keys.load_private(), self.ssl_ctx, self.op_timeout)
        token: int | None = None
        seq = 0
        try:
            while not self._stop.is_set():
                if conn.address is None:
                    t0 = self.clock()
                    try:
                        token = await self._connect(conn)
                    except AtError as exc:
                        self.records.append(
                            OpRecord(keys.atsign, "connect", "", "", t0, self.clock(), False,
                                     error=str(exc))
                        )  # fmt: skip
                        await self._pause()
                        continue
                seq += 1
                key = f"public:k{seq:06d}.chaos{keys.atsign}"
                value = f"v{seq}-{int(self.clock() * 1000)}"
                server = f"{conn.address[0]}:{conn.address[1]}" if conn.address else ""
                t0 = self.clock()
                try:
                    await conn.update(key, value)
                    ok, err = True, ""
                except AtError as exc:
                    ok, err = False, str(exc)
                self.records.append(
                    OpRecord(keys.atsign, "write", key, value, t0, self.clock(), ok, server,
                             token, err)
                )  # fmt: skip
                if ok:
                    t0 = self.clock()
                    try:
                        seen = await conn.llookup(key)
                        ok, err = seen == value, "" if seen == value else f"read {seen!r}"
                    except AtError as exc:
                        ok, err = False, str(exc)
                    self.records.append(
                        OpRecord(keys.atsign, "read", key, value, t0, self.clock(), ok, server,
                                 token, err)
                    )  # fmt: skip
                if not ok:
                    await conn.close()
                await self._pause()
        finally:
            await conn.close()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.interval)

    async def verify(self, timeout: float = 60.0) -> VerifyResult:
        """Read back every acknowledged write through the directory; retry failures until
        ``timeout`` (an atSign might still be failing over)."""
        by_atsign: dict[str, list[OpRecord]] = {}
        for r in self.acknowledged():
            by_atsign.setdefault(r.atsign, []).append(r)
        lost: list[dict[str, str]] = []
        unreadable: dict[str, str] = {}
        end = time.monotonic() + timeout
        for keys in self.atsigns:
            writes = by_atsign.get(keys.atsign, [])
            pending = list(writes)
            conn = AtConnection(keys.atsign, keys.load_private(), self.ssl_ctx, self.op_timeout)
            last_error = ""
            try:
                while pending and time.monotonic() < end:
                    try:
                        if conn.address is None:
                            await self._connect(conn)
                        rec = pending[0]
                        try:
                            seen = await conn.llookup(rec.key)
                        except AtError as exc:
                            if "AT0015" not in str(exc) and "does not exist" not in str(exc):
                                raise
                            seen = None
                        if seen != rec.value:
                            lost.append(
                                {"atsign": rec.atsign, "key": rec.key, "value": rec.value,
                                 "read": "" if seen is None else seen}
                            )  # fmt: skip
                        pending.pop(0)
                    except AtError as exc:
                        last_error = str(exc)
                        await conn.close()
                        await asyncio.sleep(0.5)
            finally:
                await conn.close()
            if pending:
                unreadable[keys.atsign] = (
                    f"{len(pending)} of {len(writes)} not read back; last error: {last_error}"
                )
        checked = sum(len(v) for v in by_atsign.values())
        return VerifyResult(checked=checked, lost=lost, unreadable_atsigns=unreadable)

    def dump(self, path: Path) -> None:
        """The client's history as JSON lines."""
        with open(path, "w") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r)) + "\n")


def load_records(path: Path) -> list[OpRecord]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(OpRecord(**json.loads(line)))
    return out
