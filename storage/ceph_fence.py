"""Storage-layer fencing of CephFS clients (Ceph Pacific): find, evict and blocklist them.

Every node mounts the shared file system with its own cephx key ``client.<node>`` (caps in
``docs/storage.md``), so the *authenticated* entity name names all of a node's CephFS
sessions, whatever it remounted. After every (re)mount a node publishes its
:class:`ClientIdentity` (entity, global id, address), read from its own ceph-fuse admin socket
with :func:`read_mount_identity`. Before a node starts an atServer that another node owned, it
fences that node with :meth:`CephFencer.evict`:

1. list the MDS sessions authenticated as ``client.<node>`` on every active MDS rank;
2. ``client evict`` them there: the MDS blocklists each one's address (``osd blocklist add``:
   from then on no OSD accepts that client instance's I/O) and kills the session, so its
   capabilities are gone;
3. ``flush journal`` on those ranks, so that other clients get the evicted client's files at
   once (not at the MDS's next tick, nor after ``session_timeout``);
4. blocklist every address seen or published that is not blocklisted yet: all of them when
   no MDS answered (an MDS drops a blocklisted client's session when it sees the OSD map,
   ~1-3 s here, and a new MDS drops it at reconnect);
5. list again; the :class:`EvictionResult` says what was evicted, blocklisted and left over.

A fenced ceph-fuse fails every later operation with ESHUTDOWN, but ``fsync()`` of data written
before the fence may still return success although the data never landed: acknowledge a
write only after a fresh operation that needs the MDS (:func:`probe_mount`) succeeded after
the ``fsync``.

Errors: methods raise :class:`CephFenceError` when Ceph refused a command or could not be
reached, :class:`CephTimeout` (also a ``TimeoutError``) when it did not answer in time.
:meth:`CephFencer.evict` reports command failures in :attr:`EvictionResult.errors` instead.
Every call takes a ``timeout``; blocking librados/libcephfs calls run in worker threads
(``asyncio.to_thread``), bounded by librados' own ``rados_mon_op_timeout``, except MDS commands
(libcephfs waits for those until the MDS answers or leaves the MDS map: after a timeout the
worker thread may stay busy that long).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import ipaddress
import json
import os
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_BLOCKLIST_EXPIRE = 3600.0
"""Seconds a blocklist entry lasts (Ceph's default). A remount gets a new address, so a fenced
node's new mount is not affected; only the fenced client instance stays blocked."""

_ENTITY_RE = re.compile(r"^client\.[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ADDR_RE = re.compile(r"^(?P<ip>[0-9.]+|\[[0-9a-fA-F:.]+\]):(?P<port>\d+)/(?P<nonce>\d+)$")


class CephFenceError(Exception):
    """Ceph refused a command or could not be reached (``code``: a positive errno, or 0)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class CephTimeout(CephFenceError, TimeoutError):
    """Ceph (or a local mount) did not answer before the deadline."""


def _split_addr(addr: str) -> tuple[str, int, int]:
    text = addr.strip()
    if text.startswith("[") and text.endswith("]") and text.count("/") == 1:
        text = text[1:-1].split(",")[0]  # an addrvec with one address
    for prefix in ("v1:", "v2:", "any:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    m = _ADDR_RE.match(text)
    if m is None:
        raise ValueError(f"not a Ceph entity address (ip:port/nonce): {addr!r}")
    return m["ip"], int(m["port"]), int(m["nonce"])


def normalize_addr(addr: str) -> str:
    """``v1:127.0.0.1:0/123``, ``any:...`` or ``127.0.0.1:0/123`` -> ``127.0.0.1:0/123``.

    Raises ValueError for anything else, and for nonce 0: Ceph reads ``ip:0/0`` as *every*
    client on that IP (a host-wide fence that would also hit the node's OSDs and MDS).
    """
    ip, port, nonce = _split_addr(addr)
    if nonce == 0:
        raise ValueError(f"refusing address {addr!r} with nonce 0 (it would fence the whole IP)")
    return f"{ip}:{port}/{nonce}"


def _check_entity(entity: str) -> str:
    if not _ENTITY_RE.match(entity):
        raise ValueError(f"not a client entity name (client.<id>): {entity!r}")
    return entity


@dataclass(frozen=True)
class ClientIdentity:
    """What a node publishes about its own CephFS mount so that another node can fence it.

    ``entity`` (``client.a1``) names every mount of the node; ``global_id`` and ``addr``
    (``127.0.0.1:0/1302774613``) name this one client instance and change on every mount.
    """

    entity: str
    global_id: int
    addr: str | None = None
    fs_name: str | None = None
    mount_point: str | None = None
    root: str | None = None
    blocklisted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientIdentity:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ClientIdentity:
        """From the answer of ceph-fuse's admin socket command ``status``."""
        meta = status.get("metadata", {})
        return cls(
            entity=f"client.{meta['entity_id']}",
            global_id=int(status["id"]),
            addr=normalize_addr(str(status["addr_str"])),
            fs_name=status.get("fs_name"),
            mount_point=meta.get("mount_point"),
            root=meta.get("root"),
            blocklisted=bool(status.get("blocklisted", False)),
        )


@dataclass(frozen=True)
class ClientSession:
    """One client session held by one MDS rank (from ``session ls``)."""

    global_id: int
    entity: str
    """``client.<id>``: the authenticated name when listed by entity, else as the client says."""
    addr: str
    state: str
    mds: str
    rank: int
    hostname: str | None = None
    mount_point: str | None = None
    root: str | None = None

    @classmethod
    def from_session_ls(
        cls, entry: Mapping[str, Any], *, mds: str, rank: int, entity: str | None = None
    ) -> ClientSession:
        meta = entry.get("client_metadata", {})
        inst = str(entry.get("inst", ""))
        addr = inst.split(" ", 1)[1] if " " in inst else ""
        if not addr:
            a = entry["entity"]["addr"]
            addr = f"{a['addr']}/{a['nonce']}"
        ip, port, nonce = _split_addr(addr)
        return cls(
            global_id=int(entry["id"]),
            entity=entity or f"client.{meta.get('entity_id', '?')}",
            addr=f"{ip}:{port}/{nonce}",
            state=str(entry.get("state", "")),
            mds=mds,
            rank=rank,
            hostname=meta.get("hostname"),
            mount_point=meta.get("mount_point"),
            root=meta.get("root"),
        )

    def __str__(self) -> str:
        return f"client.{self.global_id} at {self.addr} on mds.{self.mds} ({self.state})"


@dataclass(frozen=True, order=True)
class MDSRank:
    """An active MDS daemon of the file system."""

    rank: int
    name: str
    gid: int


@dataclass(frozen=True)
class EvictionResult:
    """What :meth:`CephFencer.evict` did; ``fenced`` says whether the node is fenced."""

    entity: str
    evicted: tuple[ClientSession, ...]
    """Sessions of ``entity`` the MDS held before the eviction (all were evicted)."""
    blocklisted: tuple[str, ...]
    """Addresses now in the OSD blocklist (seen in sessions, or published)."""
    remaining: tuple[ClientSession, ...]
    """Sessions of ``entity`` still there afterwards (empty when it worked)."""
    errors: tuple[str, ...]
    seconds: float
    journal_flushed: bool = False
    """Whether the MDS journal was flushed after the eviction (see :meth:`CephFencer.evict`)."""

    @property
    def fenced(self) -> bool:
        """Every session evicted and every known address blocklisted, with no error."""
        return not self.errors and not self.remaining

    def __str__(self) -> str:
        what = "fenced" if self.fenced else "NOT fenced"
        sessions = ", ".join(str(s) for s in self.evicted) or "no session"
        text = (
            f"{what} {self.entity} in {self.seconds:.2f}s: evicted {sessions}; "
            f"blocklisted {', '.join(self.blocklisted) or 'nothing'}"
        )
        if self.journal_flushed:
            text += "; MDS journal flushed"
        if self.remaining:
            text += f"; still there: {', '.join(str(s) for s in self.remaining)}"
        if self.errors:
            text += f"; errors: {'; '.join(self.errors)}"
        return text


# --- the node's own mount -----------------------------------------------------------------
async def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout)
    except TimeoutError:
        raise CephTimeout(f"{what}: no answer within {timeout:g}s") from None


async def admin_socket_command(path: Path, cmd: Mapping[str, Any], *, timeout: float) -> Any:
    """Send ``cmd`` (e.g. ``{"prefix": "status"}``) to a Ceph admin socket; parsed JSON back."""

    async def ask() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(dict(cmd)).encode() + b"\0")
            await writer.drain()
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            return await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        raw = await asyncio.wait_for(ask(), timeout)
    except TimeoutError:
        raise CephTimeout(f"admin socket {path}: no answer within {timeout:g}s") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise CephFenceError(f"admin socket {path}: {exc}") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CephFenceError(f"admin socket {path}: not JSON: {raw[:200]!r}") from exc


async def read_mount_identity(admin_socket: Path, *, timeout: float) -> ClientIdentity:
    """The identity of a local ceph-fuse mount, from its admin socket (``status``).

    This is what a node publishes after every (re)mount. The admin socket is the mount's
    ``--admin-socket`` (default ``/var/run/ceph/$cluster-$name.$pid.asok`` style paths).
    """
    status = await admin_socket_command(admin_socket, {"prefix": "status"}, timeout=timeout)
    try:
        return ClientIdentity.from_status(status)
    except (KeyError, ValueError, TypeError) as exc:
        raise CephFenceError(f"unexpected status from {admin_socket}: {exc!r}") from exc


async def read_mount_client_id(mountpoint: Path, *, timeout: float) -> int:
    """The global id of the client that serves ``mountpoint`` (vxattr ``ceph.client_id``).

    Needs no admin socket, but gives no address: a fencer then finds the address in the
    MDS's session list. Blocks (up to ``timeout``) when the mount hangs.
    """
    raw = await _bounded(
        lambda: os.getxattr(mountpoint, "ceph.client_id"), timeout, f"getxattr {mountpoint}"
    )
    text = raw.decode().strip()  # "client4160"
    if not text.startswith("client") or not text[6:].isdigit():
        raise CephFenceError(f"unexpected ceph.client_id {text!r} on {mountpoint}")
    return int(text[6:])


async def probe_mount(directory: Path, *, timeout: float) -> None:
    """A fresh round trip to the MDS through the mount: create and remove a unique file in
    ``directory``. Raises OSError (ESHUTDOWN once the client is fenced) or CephTimeout."""

    def probe() -> None:
        name = directory / f".fence-probe-{uuid.uuid4().hex}"
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(name)

    await _bounded(probe, timeout, f"probe of {directory}")


# --- the fencer ---------------------------------------------------------------------------
def _parse_json_seq(raw: bytes) -> list[Any]:
    """Pacific's ``osd blocklist ls`` prints two JSON arrays back to back (entries, ranges)."""
    text = raw.decode(errors="replace").strip()
    decoder = json.JSONDecoder()
    out: list[Any] = []
    pos = 0
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class CephFencer:
    """One librados connection (and a libcephfs handle for MDS commands) that can fence
    other nodes' CephFS clients.

    ``entity``'s key needs the fencer caps of ``docs/storage.md``: ``mds 'allow *'``
    (MDS ``tell`` commands), ``mon 'allow r fsname=<fs>'`` and ``mon 'allow command "osd
    blocklist" with blocklistop=add'``. Use as ``async with CephFencer(...) as fencer``.
    """

    def __init__(
        self,
        *,
        conffile: str | Path,
        entity: str = "client.fence",
        keyring: str | Path | None = None,
        fs_name: str = "atfs",
        timeout: float = DEFAULT_TIMEOUT,
        conf: Mapping[str, str] | None = None,
    ) -> None:
        self.conffile = str(conffile)
        self.entity = _check_entity(entity)
        self.keyring = None if keyring is None else str(keyring)
        self.fs_name = fs_name
        self.timeout = timeout
        self.extra_conf = dict(conf or {})
        self._rados: Any = None
        self._fs: Any = None

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def connect(self, *, timeout: float | None = None) -> None:
        """Connect to the mons and prepare MDS commands (``ceph_init``, no mount), so that a
        later :meth:`evict` needs no set-up; raises CephFenceError/CephTimeout."""
        t = self._t(timeout)
        if self._rados is not None:
            return
        import rados  # type: ignore[import-not-found]

        # librados' own limits, so that a worker thread never outlives a call by much.
        conf = {
            "rados_mon_op_timeout": f"{max(1, round(t))}",
            "rados_osd_op_timeout": f"{max(1, round(t))}",
            "client_mount_timeout": f"{max(1, round(t))}",
            **self.extra_conf,
        }
        if self.keyring is not None:
            conf["keyring"] = self.keyring

        def connect() -> Any:
            handle = rados.Rados(conffile=self.conffile, name=self.entity, conf=conf)
            try:
                handle.connect()
            except BaseException:
                handle.shutdown()
                raise
            return handle

        try:
            self._rados = await _bounded(connect, t, f"connect as {self.entity}")
        except rados.Error as exc:
            raise CephFenceError(f"connect as {self.entity}: {exc}", _errno(exc)) from exc
        try:
            await self._ensure_fs(t)
        except BaseException:
            await self.close()
            raise

    async def _ensure_fs(self, timeout: float) -> Any:
        """The libcephfs handle (created on first use: ``ceph_init``, no mount)."""
        if self._fs is not None:
            return self._fs
        await self.active_mds(timeout=timeout)  # libcephfs aborts if the fs is not visible
        import cephfs  # type: ignore[import-not-found]

        def init() -> Any:
            fs = cephfs.LibCephFS(rados_inst=self._rados)
            fs.init()
            return fs

        try:
            self._fs = await _bounded(init, timeout, "libcephfs init")
        except cephfs.Error as exc:
            raise CephFenceError(f"libcephfs init: {exc}", _errno(exc)) from exc
        return self._fs

    async def close(self) -> None:
        fs, handle = self._fs, self._rados
        self._fs = self._rados = None

        def shutdown() -> None:
            if fs is not None:
                with contextlib.suppress(Exception):
                    fs.shutdown()
            if handle is not None:
                handle.shutdown()

        with contextlib.suppress(CephTimeout):
            await _bounded(shutdown, self.timeout, "shutdown")

    async def __aenter__(self) -> CephFencer:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- commands -------------------------------------------------------------------------
    async def _mon(self, cmd: Mapping[str, Any], timeout: float) -> bytes:
        if self._rados is None:
            raise CephFenceError("not connected")
        body = json.dumps({"format": "json", **cmd})
        ret, out, outs = await _bounded(
            lambda: self._rados.mon_command(body, b""), timeout, f"mon {cmd['prefix']!r}"
        )
        if ret == -errno_mod.ETIMEDOUT:
            raise CephTimeout(f"mon {cmd['prefix']!r}: {outs or 'timed out'}", errno_mod.ETIMEDOUT)
        if ret != 0:
            raise CephFenceError(f"mon {cmd['prefix']!r}: errno {-ret}: {outs}", -ret)
        return bytes(out)

    async def _mds(self, mds: str, cmd: Mapping[str, Any], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fs = await self._ensure_fs(timeout)
        body = json.dumps({"format": "json", **cmd})
        left = max(0.1, deadline - time.monotonic())
        ret, out, outs = await _bounded(
            lambda: fs.mds_command(mds, body, b""), left, f"mds.{mds} {cmd['prefix']!r}"
        )
        if ret != 0:
            raise CephFenceError(f"mds.{mds} {cmd['prefix']!r}: errno {-ret}: {outs}", -ret)
        return bytes(out)

    async def active_mds(self, *, timeout: float | None = None) -> list[MDSRank]:
        """The active MDS daemons of the file system (empty during a failover)."""
        raw = await self._mon({"prefix": "fs dump"}, self._t(timeout))
        dump = json.loads(raw)
        for fs in dump.get("filesystems", []):
            mdsmap = fs["mdsmap"]
            if mdsmap.get("fs_name") == self.fs_name:
                return sorted(
                    MDSRank(int(i["rank"]), str(i["name"]), int(i["gid"]))
                    for i in mdsmap.get("info", {}).values()
                    if i.get("state") == "up:active"
                )
        raise CephFenceError(f"file system {self.fs_name!r} not in the FSMap (or not visible)")

    async def list_sessions(
        self, entity: str | None = None, *, timeout: float | None = None
    ) -> list[ClientSession]:
        """Client sessions on every active MDS rank; with ``entity``, only those that
        authenticated as it (``auth_name`` filter on the MDS)."""
        t = self._t(timeout)
        deadline = time.monotonic() + t
        ranks = await self.active_mds(timeout=t)
        if not ranks:
            raise CephFenceError(f"no active MDS for {self.fs_name!r}")
        return await self._sessions(ranks, entity, max(0.1, deadline - time.monotonic()))

    async def _sessions(
        self, ranks: list[MDSRank], entity: str | None, timeout: float
    ) -> list[ClientSession]:
        deadline = time.monotonic() + timeout
        cmd: dict[str, Any] = {"prefix": "session ls"}
        if entity is not None:
            cmd["filters"] = [f"auth_name={_check_entity(entity).split('.', 1)[1]}"]

        async def one(r: MDSRank) -> list[ClientSession]:
            raw = await self._mds(r.name, cmd, max(0.1, deadline - time.monotonic()))
            return [
                ClientSession.from_session_ls(e, mds=r.name, rank=r.rank, entity=entity)
                for e in json.loads(raw)
            ]

        per_rank = await asyncio.gather(*(one(r) for r in ranks))
        return [s for sessions in per_rank for s in sessions]

    async def blocklist(
        self,
        addr: str,
        *,
        expire: float = DEFAULT_BLOCKLIST_EXPIRE,
        timeout: float | None = None,
    ) -> str:
        """Add one client address to the OSD blocklist; returns it normalized. Committed (in
        the OSD map) when this returns."""
        a = normalize_addr(addr)
        cmd = {"prefix": "osd blocklist", "blocklistop": "add", "addr": a, "expire": float(expire)}
        await self._mon(cmd, self._t(timeout))
        return a

    async def blocklist_entries(self, *, timeout: float | None = None) -> dict[str, str]:
        """The OSD blocklist: address (``ip:port/nonce``; a range is ``ip:0/<prefix length>``)
        -> until (UTC timestamp text)."""
        entries, ranges = await self._blocklist(self._t(timeout))
        return {**entries, **ranges}

    async def _blocklist(self, timeout: float) -> tuple[dict[str, str], dict[str, str]]:
        raw = await self._mon({"prefix": "osd blocklist ls"}, timeout)
        parts = [*_parse_json_seq(raw), [], []]
        entries = {str(e["addr"]): str(e.get("until", "")) for e in parts[0] if "addr" in e}
        ranges: dict[str, str] = {}
        for e in parts[1]:
            key = e.get("range") or e.get("addr")
            if key:
                ranges[str(key)] = str(e.get("until", ""))
        return entries, ranges

    async def is_blocklisted(self, addr: str, *, timeout: float | None = None) -> bool:
        """Whether the OSDs reject ``addr``: listed itself, its whole IP (``ip:0/0``), or a
        blocklisted range containing it."""
        ip, port, nonce = _split_addr(addr)
        entries, ranges = await self._blocklist(self._t(timeout))
        if f"{ip}:{port}/{nonce}" in entries or f"{ip}:0/0" in entries:
            return True
        address = ipaddress.ip_address(ip.strip("[]"))
        for key in ranges:
            with contextlib.suppress(ValueError):
                net_ip, _, prefix = _split_addr(key)
                if address in ipaddress.ip_network(f"{net_ip.strip('[]')}/{prefix}", strict=False):
                    return True
        return False

    async def evict(
        self,
        entity: str,
        *,
        known: Iterable[ClientIdentity | str] = (),
        instances: Iterable[int] | None = None,
        expire: float = DEFAULT_BLOCKLIST_EXPIRE,
        flush_journal: bool = True,
        timeout: float | None = None,
    ) -> EvictionResult:
        """Fence every CephFS client of ``entity`` (``client.<node>``) and the client instances
        of ``known`` (its published identities or addresses). Never raises for a command
        failure: see :attr:`EvictionResult.fenced` and ``errors``.

        ``instances``: fence only these client instances (global ids) of ``entity``, not its
        other mounts: a node that lost its claims and has mounted anew since keeps its new
        mount. Their addresses in ``known`` are blocklisted even when no MDS lists them.

        1. ``session ls`` (filter ``auth_name``) on every active MDS rank;
        2. ``client evict`` there: the MDS blocklists each session's address and kills the
           session, dropping its capabilities;
        3. with ``flush_journal``, ``flush journal`` on those ranks: other clients get the
           evicted client's files once the MDS has journaled the release, which otherwise
           waits for its next tick (``mds_tick_interval``, 5 s: measured 3.6-5.0 s after the
           eviction here, 0.5-0.8 s with the flush). A failed flush is not an error;
        4. ``osd blocklist add`` each address of steps 1 and ``known`` that is not blocklisted
           yet (all of them when no MDS answered);
        5. ``session ls`` again: what is left (should be nothing).
        """
        _check_entity(entity)
        if entity == self.entity:
            raise ValueError(f"refusing to fence this fencer's own entity {entity}")
        began = time.monotonic()
        deadline = began + self._t(timeout)
        errors: list[str] = []

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        async def attempt(what: str, step: Awaitable[T]) -> T | None:
            try:
                return await step
            except CephFenceError as exc:
                errors.append(f"{what}: {exc}")
                return None

        addrs: list[str] = []
        for k in known:
            raw = k.addr if isinstance(k, ClientIdentity) else k
            try:
                a = normalize_addr(raw) if raw else None
            except ValueError as exc:
                errors.append(str(exc))
                continue
            if a and a not in addrs:
                addrs.append(a)
        # 1. the entity's sessions (their addresses) on every active rank
        ranks = await attempt("fs dump", self.active_mds(timeout=left()))
        if ranks == []:
            errors.append(f"no active MDS for {self.fs_name!r}")
        before = None
        if ranks:
            before = await attempt("session ls", self._sessions(ranks, entity, left()))
        only = set(instances) if instances is not None else None
        if before is not None and only is not None:
            before = [s for s in before if s.global_id in only]
        for s in before or []:
            if s.addr not in addrs:
                addrs.append(s.addr)
        # 2. the MDS blocklists and kills them; 3. and lets others at their files at once
        flushed = False
        if ranks and before is not None:
            if only is None:
                filters = [[f"auth_name={entity[7:]}"]]
            else:  # one command per instance still there (an evicted one is gone already)
                filters = [[f"id={s.global_id}"] for s in before]
            evicted = await asyncio.gather(
                *(
                    attempt(
                        f"evict on mds.{r.name}",
                        self._mds(r.name, {"prefix": "client evict", "filters": f}, left()),
                    )
                    for r in ranks
                    for f in filters
                )
            )
            if flush_journal and before and all(e is not None for e in evicted):
                flushes = await asyncio.gather(
                    *(
                        _quietly(self._mds(r.name, {"prefix": "flush journal"}, left()))
                        for r in ranks
                    )
                )
                flushed = all(flushes)
        # 4. every known address in the OSD blocklist
        blocklisted: list[str] = []
        listed = await attempt("osd blocklist ls", self._blocklist(left()))
        present = listed[0] if listed is not None else {}
        for a in addrs:
            if a in present or f"{a.rsplit(':', 1)[0]}:0/0" in present:
                blocklisted.append(a)
                continue
            done = await attempt(f"blocklist {a}", self.blocklist(a, expire=expire, timeout=left()))
            if done:
                blocklisted.append(done)
        # 5. what is left (a session being killed may be listed for a moment)
        remaining: list[ClientSession] = []
        while ranks and before is not None:
            after = await attempt("session ls", self._sessions(ranks, entity, left()))
            if after is not None and only is not None:
                after = [s for s in after if s.global_id in only]
            remaining = after or []
            if not after or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        return EvictionResult(
            entity=entity,
            evicted=tuple(before or ()),
            blocklisted=tuple(blocklisted),
            remaining=tuple(remaining),
            errors=tuple(errors),
            seconds=time.monotonic() - began,
            journal_flushed=flushed,
        )


async def _quietly(step: Awaitable[object]) -> bool:
    """Whether ``step`` succeeded (its failure is not an error of the caller)."""
    try:
        await step
    except CephFenceError:
        return False
    return True


def _errno(exc: BaseException) -> int:
    value = getattr(exc, "errno", 0)
    return abs(int(value)) if isinstance(value, int) else 0
