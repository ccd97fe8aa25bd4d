"""Write keys to an atSign through the directory, and read them back later (after it moved).

Used by the demo's tour and the data tests: every write counts only once acknowledged
(``update`` answered ``data:<commit id>``), and the read-back goes through whatever server
the directory names *now*, so it checks that the data followed the claim.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from atserver_runner.devserver.protocol import validate_key
from atserver_runner.devserver.store import KeyStore, StoreCorrupt
from atserver_runner.paths import atsign_dir
from chaos.atclient import AtConnection, AtError, lookup
from chaos.cluster import AtSignKeys, Cluster
from chaos.workload import OpRecord


@dataclass(frozen=True)
class ReadBack:
    """What a read-back found: how many of the acknowledged writes, and what went wrong."""

    atsign: str
    written: int
    found: int
    served_by: tuple[str, int] | None
    missing: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.served_by is not None and not self.error and self.found == self.written

    def summary(self) -> str:
        if self.served_by is None:
            return f"{self.atsign}: not served ({self.error or 'directory answers null'})"
        text = f"{self.atsign}: {self.found}/{self.written} writes read back"
        return text + (f" ({self.error})" if self.error else "")


async def write_keys(
    keys: AtSignKeys,
    directory: tuple[str, int],
    ssl_ctx: ssl.SSLContext,
    count: int,
    timeout: float = 3.0,
) -> list[tuple[str, str]]:
    """Write ``count`` fresh keys; return the acknowledged (key, value) pairs, in order."""
    where = await lookup(*directory, keys.atsign, ssl_ctx, timeout)
    if where is None:
        raise AtError(f"{keys.atsign}: the directory answers null")
    conn = AtConnection(keys.atsign, keys.load_private(), ssl_ctx, timeout)
    done: list[tuple[str, str]] = []
    run = uuid.uuid4().hex[:8]
    try:
        await conn.connect(*where)
        for i in range(count):
            key = f"rb{run}{i:04d}.readback{keys.atsign}"
            value = f"v{run}-{i}"
            await conn.update(key, value)
            done.append((key, value))
    finally:
        await conn.close()
    return done


async def read_back(
    keys: AtSignKeys,
    directory: tuple[str, int],
    ssl_ctx: ssl.SSLContext,
    written: list[tuple[str, str]],
    timeout: float = 3.0,
) -> ReadBack:
    """Look every written key up on the server the directory names now."""
    try:
        where = await lookup(*directory, keys.atsign, ssl_ctx, timeout)
    except AtError as exc:
        return ReadBack(keys.atsign, len(written), 0, None, error=str(exc))
    if where is None:
        return ReadBack(keys.atsign, len(written), 0, None)
    conn = AtConnection(keys.atsign, keys.load_private(), ssl_ctx, timeout)
    missing: list[str] = []
    try:
        await conn.connect(*where)
        for key, value in written:
            try:
                got = await conn.llookup(key)
            except AtError:
                missing.append(key)
                continue
            if got != value:
                missing.append(key)
    except AtError as exc:
        return ReadBack(keys.atsign, len(written), 0, where, error=str(exc))
    finally:
        await conn.close()
    return ReadBack(keys.atsign, len(written), len(written) - len(missing), where, missing)


async def write_all(
    atsigns: Sequence[AtSignKeys], directory: tuple[str, int], ssl_ctx: ssl.SSLContext, count: int
) -> dict[str, list[tuple[str, str]]]:
    """``count`` keys to every atSign at once, each through the directory's answer; returns
    the acknowledged writes per atSign (a failed write raises :class:`AtError`)."""
    written = await asyncio.gather(*(write_keys(k, directory, ssl_ctx, count) for k in atsigns))
    return {k.atsign: w for k, w in zip(atsigns, written, strict=True)}


async def read_all(
    atsigns: Sequence[AtSignKeys],
    directory: tuple[str, int],
    ssl_ctx: ssl.SSLContext,
    written: dict[str, list[tuple[str, str]]],
) -> list[ReadBack]:
    """:func:`read_back` of every atSign's acknowledged writes, at once."""
    return list(
        await asyncio.gather(
            *(read_back(k, directory, ssl_ctx, written.get(k.atsign, [])) for k in atsigns)
        )
    )


@dataclass(frozen=True)
class MountReadBack:
    """Acknowledged writes read from an atSign's data files through a node's mount that is
    not its owner's (the data on CephFS, not what the serving atServer answers)."""

    atsign: str
    node: str | None
    checked: int
    missing: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.node is not None and not self.error and not self.missing


def read_through_other_mounts(
    cluster: Cluster, acknowledged: Sequence[OpRecord]
) -> list[MountReadBack]:
    """For every atSign, read its data directory's log through the mount of a node other
    than its current owner (a running node whose ceph-fuse runs) and check that every
    acknowledged write is there with its latest acknowledged value."""
    owners = cluster.owners_by_status()
    wanted: dict[str, dict[str, str]] = {}
    for op in sorted(acknowledged, key=lambda r: r.end):
        wanted.setdefault(op.atsign, {})[validate_key(op.key)] = op.value
    out = []
    for keys in cluster.atsigns:
        a = keys.atsign
        want = wanted.get(a, {})
        readers = [
            n for n in cluster.nodes
            if n.name != owners.get(a) and n.running() and not n.frozen and n.fuse_pid()
        ]  # fmt: skip
        if not readers:
            out.append(MountReadBack(a, None, len(want), error="no other node's mount is up"))
            continue
        node = readers[0]
        try:
            records = KeyStore(atsign_dir(cluster.node_data_root(node.name), a)).snapshot()
        except (OSError, StoreCorrupt) as exc:
            out.append(MountReadBack(a, node.name, len(want), error=f"{type(exc).__name__}: {exc}"))
            continue
        missing = [k for k, v in want.items() if (r := records.get(k)) is None or r.value != v]
        out.append(MountReadBack(a, node.name, len(want), missing))
    return out
