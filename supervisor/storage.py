"""The node's storage: is ``runner.data_root`` usable, and (CephFS) whose client is it.

Readiness, every ``storage.probe_interval``: ``data_root`` must be on the expected file
system (``/proc/self/mountinfo``), and a node-private probe file must take a write, an
fsync and a read back, all within ``storage.probe_timeout`` (in a worker thread: a frozen
mount blocks the thread, not the node; while one probe is stuck no other is started).
``storage.fail_after`` failures in a row make the storage *not ready*: the node claims
nothing (and says why in ``/readyz`` and ``/status``); the daemon decides whether its
atSigns move (see :mod:`supervisor.daemon`).

With ``storage.cephfs.mount: managed`` the supervisor runs the node's ceph-fuse itself (in
its own session, so it outlives a killed supervisor, which adopts it again) and mounts
anew when the client was fenced (ESHUTDOWN after an eviction) or died (ENOTCONN), once no
atServer runs on it any more: a fenced node gets back to service by itself. The node's
client identity (entity, global id, address, from the ceph-fuse admin socket) is what it
publishes so another node can fence exactly this client instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from atserver_runner.atomic_file import write_atomic
from atserver_runner.proc_start import same_process, start_ticks
from supervisor.config import SupervisorConfig
from supervisor.metrics import SupervisorMetrics

log = logging.getLogger("supervisor")

CEPH_FSTYPES = ("fuse.ceph-fuse", "ceph")
"""``/proc/self/mountinfo`` types of a CephFS mount (ceph-fuse, the kernel client)."""

FENCED_ERRNOS = frozenset({errno.ESHUTDOWN, errno.ENOTCONN, errno.EIO})
"""What a fenced (evicted, blocklisted) or dead ceph-fuse mount answers."""


def mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, file system type) of the mount holding ``path``, or None."""
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = right.split()[0] if right.split() else ""
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def _probe_file(directory: Path, name: str) -> None:
    """Write, fsync and read back a probe file (blocking; raises OSError)."""
    path = directory / name
    nonce = uuid.uuid4().hex.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, nonce)
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.read_bytes() != nonce:
        raise OSError(errno.EIO, f"{path} did not read back what was written")


FUSE_PID_FILE = "ceph-fuse.pid"
CLIENT_FILE = "ceph-fuse.client"
"""The last client instance this node's mount published (``client_ref``), kept in
``state_dir`` so the next mount, after the node itself was killed, can evict it."""


def recorded_fuse(state_dir: Path) -> psutil.Process | None:
    """The ceph-fuse a supervisor with this ``state_dir`` started (its pid file records the
    pid and its start ticks, so a recycled pid is never taken for it), if it still runs."""
    try:
        rec = json.loads((state_dir / FUSE_PID_FILE).read_text())
        pid = int(rec["pid"])
        ticks = int(rec.get("start_ticks", 0) or 0)
        if not same_process(pid, ticks=ticks, create_time=float(rec["create_time"])):
            return None
        return psutil.Process(pid)
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


class StorageGuard:
    """Readiness of ``data_root``, the managed mount, and this node's client identity."""

    def __init__(
        self,
        cfg: SupervisorConfig,
        *,
        on_change: Callable[[], None],
        nothing_runs: Callable[[], bool],
        evict: Callable[[str], Awaitable[tuple[bool, str]]] | None = None,
        metrics: SupervisorMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.st = cfg.storage
        self.data_root = cfg.runner.data_root
        self.on_change = on_change
        self.nothing_runs = nothing_runs
        self.evict = evict
        self.metrics = metrics
        self.clock = clock
        self.ready = False
        self.reason = "not checked yet"
        self.fenced = False
        """The mount answered as a fenced or dead client does (ESHUTDOWN, ENOTCONN)."""
        self.dead = False
        """The client itself is gone (ENOTCONN: its ceph-fuse died), not fenced by others."""
        self._evicted = ""
        """The client instance (``client_ref``) this node evicted after it died."""
        self.identity: dict[str, Any] | None = None
        self.since = clock()
        self._failures = 0
        self._stuck: asyncio.Future[None] | None = None
        self._stuck_since = 0.0
        self._fuse: subprocess.Popen[bytes] | None = None
        self.state_dir = cfg.runner.state_dir
        self.mounts = 0

    # --- readiness -----------------------------------------------------------------------------

    def expected_fstypes(self) -> tuple[str, ...]:
        if self.st.kind == "cephfs":
            return CEPH_FSTYPES
        if self.st.fstype:
            return (self.st.fstype,)
        return ()

    async def _probe(self) -> tuple[bool, str, bool]:
        """(ok, why not, fenced)."""
        wanted = self.expected_fstypes()
        if wanted:
            found = mount_of(self.data_root)
            if found is None or found[1] not in wanted:
                what = f"{found[1]} at {found[0]}" if found else "no mount"
                return False, f"{self.data_root} is not on {' or '.join(wanted)} ({what})", False
        if self._stuck is not None and not self._stuck.done():
            stuck = self.clock() - self._stuck_since
            return False, f"a probe of {self.data_root} has been blocked for {stuck:.1f}s", False
        if self.st.kind == "local":  # a node's own disk: the directory is ours to create
            with contextlib.suppress(OSError):
                self.data_root.mkdir(parents=True, exist_ok=True)
        name = f".atfailover-ready-{self.cfg.node.name}"
        self._stuck = asyncio.ensure_future(asyncio.to_thread(_probe_file, self.data_root, name))
        self._stuck_since = self.clock()
        try:
            await asyncio.wait_for(asyncio.shield(self._stuck), self.st.probe_timeout)
        except TimeoutError:
            return (
                False,
                f"write+fsync+read of {self.data_root} took > {self.st.probe_timeout:g}s",
                False,
            )
        except OSError as exc:
            fenced = exc.errno in FENCED_ERRNOS
            return False, f"{self.data_root}: {exc.strerror or exc}", fenced
        finally:
            if self._stuck.done():
                self._stuck = None
        return True, "", False

    async def check(self) -> bool:
        """One readiness probe; returns the readiness (which needs ``fail_after`` failures
        in a row to change to not ready, one success to change back)."""
        ok, why, fenced = await self._probe()
        self.fenced = fenced
        self.dead = not ok and self._client_died(why)
        was = self.ready
        if ok:
            self._failures = 0
            self.ready, self.reason = True, ""
        else:
            self._failures += 1
            if self._failures >= self.st.fail_after or not was:
                self.ready, self.reason = False, why
        if self.ready != was:
            self.since = self.clock()
            log.log(
                logging.INFO if self.ready else logging.ERROR,
                "event=storage-%s data_root=%s reason=%r",
                "ready" if self.ready else "not-ready",
                self.data_root,
                self.reason,
            )
            if self.ready and self.st.kind == "cephfs":
                await self.read_identity()
            self.on_change()
        elif self.ready and self.st.kind == "cephfs" and self.identity is None:
            # The read at readiness failed (a slow admin socket on a busy host): until it
            # works, generation records name only the entity, which a takeover must fence
            # whole, every mount of it, instead of this one client instance.
            await self.read_identity()
            if self.identity is not None:
                self.on_change()
        if self.metrics is not None:
            self.metrics.storage_ready.set(1.0 if self.ready else 0.0)
        return self.ready

    async def run(self) -> None:
        """Probe forever; when the client died, evict it (its capabilities block everyone
        else); mount anew (managed) when it was fenced or died and nothing runs on it."""
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            if self.dead:
                with contextlib.suppress(Exception):
                    await self.evict_dead_client()
            if self._should_remount():
                await self._remount()
            await asyncio.sleep(self.st.probe_interval)

    def _client_died(self, why: str) -> bool:
        if self.st.kind != "cephfs":
            return False
        if self.managed and self.identity is not None and self._recorded_fuse() is None:
            return True
        return os.strerror(errno.ENOTCONN) in why

    async def evict_dead_client(self) -> None:
        """Evict the instance that died (once): its MDS session would otherwise keep its
        files' capabilities until the session timeout (a minute), and a takeover's first
        read of the data dir, or this node's next mount, waits for them."""
        ref = self.client_ref() if self.identity else ""
        await self._evict_once(ref, "storage-dead-client-evicted", logging.WARNING)

    async def evict_previous_client(self) -> None:
        """Before mounting anew, evict the instance this node mounted last (recorded in
        ``state_dir``), which no longer runs: after a whole-node kill nobody else fences it
        when the node is back before its claims expire (a node with a live session is not
        fenced), and until its MDS session times out (a minute) its capabilities block
        this node's own readiness probe and every other node's reads of the files it had
        open."""
        try:
            ref = (self.state_dir / CLIENT_FILE).read_text().strip()
        except OSError:
            return
        await self._evict_once(ref, "storage-previous-client-evicted", logging.INFO)

    async def _evict_once(self, ref: str, event: str, ok_level: int) -> None:
        """Evict this node's own client instance ``ref`` unless it was evicted already."""
        if not ref or ref == self._evicted or self.evict is None:
            return
        ok, text = await self.evict(ref)
        log.log(
            ok_level if ok else logging.ERROR,
            "event=%s client=%s ok=%s detail=%r",
            event,
            ref,
            ok,
            text,
        )
        if ok:
            self._evicted = ref

    # --- the managed mount ---------------------------------------------------------------------

    @property
    def managed(self) -> bool:
        return (
            self.st.kind == "cephfs"
            and self.st.cephfs is not None
            and self.st.cephfs.mount == "managed"
        )

    @property
    def pid_file(self) -> Path:
        return self.state_dir / FUSE_PID_FILE

    @property
    def admin_socket(self) -> Path | None:
        c = self.st.cephfs
        if c is None:
            return None
        if c.admin_socket is not None:
            return c.admin_socket
        return self.state_dir / "ceph-fuse.asok" if c.mount == "managed" else None

    def _should_remount(self) -> bool:
        if not self.managed or self.ready:
            return False
        found = mount_of(self.data_root)
        mounted = found is not None and found[1] in CEPH_FSTYPES
        return (self.fenced or not mounted) and self.nothing_runs()

    def _recorded_fuse(self) -> psutil.Process | None:
        return recorded_fuse(self.state_dir)

    async def ensure_mounted(self) -> None:
        """Managed: adopt a running ceph-fuse of this node that serves ``data_root``, or
        mount. Does nothing for other kinds."""
        if not self.managed:
            return
        found = mount_of(self.data_root)
        if found is not None and found[1] in CEPH_FSTYPES and self._recorded_fuse() is not None:
            log.info("event=storage-mount-adopted data_root=%s", self.data_root)
            return
        await self._remount()

    async def _remount(self) -> None:
        c = self.st.cephfs
        assert c is not None
        old = self._recorded_fuse()
        self.identity = None  # the new mount is another client instance
        if old is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(old.pid, signal.SIGKILL)
        await asyncio.to_thread(self._lazy_unmount)
        await self.evict_previous_client()
        self.data_root.mkdir(parents=True, exist_ok=True)
        sock = self.admin_socket
        assert sock is not None
        argv = [
            c.ceph_fuse, "-f", "-c", str(c.conf), "-n", c.entity,
            *(["-k", str(c.keyring)] if c.keyring else []),
            "-r", c.root, "--admin-socket", str(sock),
            "--log-file", str(self.state_dir / "ceph-fuse.log"), str(self.data_root),
        ]  # fmt: skip
        began = self.clock()
        self._fuse = await asyncio.to_thread(self._spawn, argv)
        deadline = began + c.mount_timeout
        while self.clock() < deadline:
            found = mount_of(self.data_root)
            if found is not None and found[1] in CEPH_FSTYPES:
                self.mounts += 1
                log.info(
                    "event=storage-mounted data_root=%s entity=%s took=%.2fs",
                    self.data_root,
                    c.entity,
                    self.clock() - began,
                )
                self.fenced = False
                return
            if self._fuse.poll() is not None:
                break
            await asyncio.sleep(0.05)
        log.error(
            "event=storage-mount-failed data_root=%s exit=%s", self.data_root, self._fuse.poll()
        )

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ceph-fuse in its own session (it outlives a killed supervisor, which adopts
        it again) and record it (pid and create time) for the next supervisor and the tests."""
        with open(self.state_dir / "ceph-fuse.out", "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        with contextlib.suppress(psutil.Error):
            created = psutil.Process(proc.pid).create_time()
            record = {"pid": proc.pid, "create_time": created, "start_ticks": start_ticks(proc.pid)}
            self.pid_file.write_text(json.dumps(record))
        return proc

    def _lazy_unmount(self) -> None:
        found = mount_of(self.data_root)
        if found is None or found[0] != os.path.realpath(self.data_root):
            return
        for argv in (
            ["fusermount", "-uz", str(self.data_root)],
            ["umount", "-l", str(self.data_root)],
        ):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if subprocess.run(argv, capture_output=True, timeout=10).returncode == 0:
                    return

    async def stop(self) -> None:
        """Managed: unmount and stop ceph-fuse (nothing runs on it any more)."""
        if not self.managed:
            return
        await asyncio.to_thread(self._lazy_unmount)
        proc = self._recorded_fuse()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(psutil.Error):
                await asyncio.to_thread(proc.wait, 5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):  # unmounted: its MDS session is closed
            (self.state_dir / CLIENT_FILE).unlink()

    # --- identity ------------------------------------------------------------------------------

    async def read_identity(self) -> None:
        """This node's CephFS client (for its node record and generation records)."""
        from storage.ceph_fence import CephFenceError, read_mount_identity

        sock = self.admin_socket
        if sock is None:
            return
        try:
            ident = await read_mount_identity(sock, timeout=self.st.probe_timeout)
        except (CephFenceError, OSError, ValueError) as exc:
            log.warning("event=storage-identity-failed socket=%s error=%r", sock, exc)
            return
        self.identity = ident.to_dict()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(write_atomic, self.state_dir / CLIENT_FILE, self.client_ref())

    def client_ref(self) -> str:
        """``client.a1/4160/127.0.0.1:0/1234``: what generation records name. While the
        instance is unknown (no admin socket, or it did not answer yet) only the configured
        entity, ``client.a1//``, which a takeover fences whole; empty when not on CephFS."""
        ident = self.identity
        if ident:
            return f"{ident['entity']}/{ident['global_id']}/{ident.get('addr') or ''}"
        c = self.st.cephfs
        return f"{c.entity}//" if self.st.kind == "cephfs" and c is not None else ""

    def record(self) -> dict[str, Any]:
        """This node's storage in its node record."""
        out: dict[str, Any] = {"kind": self.st.kind, "ready": self.ready}
        if not self.ready:
            out["reason"] = self.reason
        if self.identity:
            out["client"] = self.identity
        return out
