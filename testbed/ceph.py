"""A real Ceph (Pacific, Debian 12 packages) cluster started by hand on loopback, with CephFS.

No cephadm, no systemd: keys are generated here and imported at ``ceph-mon --mkfs``, every
daemon is a :class:`~testbed.process.ManagedProcess` (stopped by its PID), and the set-up's mon
commands go over one librados connection (the ``ceph`` CLI costs 0.7-3 s per call here).

The layout: 3 mons (``mon_election_timeout = 2``), 1 mgr, 3 bluestore OSDs on sparse files,
2 MDS (one active, one standby) and one file system (``atfs``) whose pools have size 3 /
min_size 2. Everything binds 127.0.0.1, msgr2 only, on a port range of its own, so two
clusters can run side by side. Node clients mount ``/atservers`` with ceph-fuse as
``client.<name>``; see :func:`node_caps` and :func:`fencer_caps` for what their keys may do.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from testbed.process import ManagedProcess, wait_until

FS_NAME = "atfs"
DATA_ROOT = "/atservers"
"""The only directory node keys may use (the atServers' data directories live below it)."""
DATA_NAMESPACE = "atservers"
"""RADOS namespace of the file data below :data:`DATA_ROOT` (its ``pool_namespace`` layout)."""
OSD_SIZE = 2 << 30
OSD_MEMORY_TARGET = 939524096
"""896 MiB: the lowest value Pacific accepts (lower ones are ignored and 4 GiB stays)."""

_PORT_LOW, _PORT_HIGH = 20000, 32000  # below the kernel's ephemeral range (32768-60999)
_PORTS_PER_CLUSTER = 40
_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


class CephCommandError(RuntimeError):
    """A mon/mgr command answered with an error code (``errno`` is positive)."""

    def __init__(self, cmd: Mapping[str, Any], errno: int, message: str) -> None:
        super().__init__(f"{cmd.get('prefix')!r} failed: errno {errno}: {message}")
        self.errno = errno


def ceph_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH: run scripts/bootstrap.sh (Debian Ceph)")
    return path


def cephx_key() -> str:
    """A new random cephx secret, encoded as ``ceph-authtool --gen-key`` does."""
    now = time.time()
    secret = os.urandom(16)
    blob = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), len(secret)) + secret
    return base64.b64encode(blob).decode()


def keyring_text(entity: str, key: str, caps: Mapping[str, str]) -> str:
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {svc} = "{cap}"' for svc, cap in caps.items()]
    return "\n".join(lines) + "\n"


def node_caps(fs_name: str = FS_NAME, path: str = DATA_ROOT) -> dict[str, str]:
    """Caps of a node's own key: ``rw`` below ``path`` of ``fs_name`` and nothing else.

    This is ``ceph fs authorize <fs> client.<node> <path> rw`` with the OSD cap narrowed from
    the whole data pool (``tag cephfs data=<fs>``) to the RADOS namespace that ``path``'s
    layout puts its file data in, as the mgr's ``fs subvolume`` does: otherwise the key could
    read and write any file's objects with librados, bypassing the MDS's path check.
    """
    return {
        "mds": f"allow rw fsname={fs_name} path={path}",
        "mon": f"allow r fsname={fs_name}",
        "osd": f"allow rw pool=cephfs.{fs_name}.data namespace={DATA_NAMESPACE}",
    }


def fencer_caps(fs_name: str = FS_NAME) -> dict[str, str]:
    """Caps a supervisor needs to find, evict and blocklist another node's CephFS client.

    - ``mds 'allow *'``: MDS ``tell`` commands (``session ls``, ``client evict``, ``flush
      journal``) need it: ``MDSDaemon::handle_command`` checks ``allow_all()`` (``*`` with no
      ``path``/``uid``); ``allow rw`` or ``allow * path=...`` get EACCES. ``fsname=`` does not
      limit tell commands (they reach every MDS); it limits what a mount with the key sees.
      No OSD caps: the key reads and writes no file data.
    - ``mon 'allow r fsname=<fs>'``: the FSMap (which MDS is active), the OSDMap (``osd
      blocklist ls``), and ``ceph_init`` for MDS commands, which hangs without a mon read cap
      and aborts the process if the FSMap it may see lacks the fs.
    - ``mon 'allow command "osd blocklist" with blocklistop=add'``: blocklist an address (the
      fence when no MDS answers), but not remove an entry (un-fence).
    """
    return {
        "mds": f"allow * fsname={fs_name}",
        "mon": f'allow r fsname={fs_name}, allow command "osd blocklist" with blocklistop=add',
    }


def blocklister_caps(fs_name: str = FS_NAME) -> dict[str, str]:
    """The mon-only part of :func:`fencer_caps` (no MDS caps at all): enough to fence a client
    instance whose address its node published (``osd blocklist add``); the MDS then drops its
    sessions when it sees the OSD map. It cannot find sessions the node did not publish."""
    return {"mon": fencer_caps(fs_name)["mon"]}


def _reserve_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive TCP ports that are free on ``host`` now."""
    with _ports_lock:
        for _ in range(200):
            base = random.randrange(_PORT_LOW, _PORT_HIGH - count)
            ports = range(base, base + count)
            if any(p in _ports_taken for p in ports):
                continue
            try:
                for p in ports:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                        s.bind((host, p))
            except OSError:
                continue
            _ports_taken.update(ports)
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _umount(path: Path, timeout: float = 10.0) -> None:
    """Unmount ``path`` (a mount this harness made); lazily if a plain unmount fails."""
    if not _mounted(path):
        return
    umount = shutil.which("umount") or "/usr/bin/umount"
    try:
        done = subprocess.run(
            [umount, str(path)], capture_output=True, timeout=timeout, check=False
        )
        ok = done.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok and _mounted(path):
        subprocess.run([umount, "-l", str(path)], capture_output=True, timeout=timeout, check=False)


def managed_fuse(state_dir: Path) -> tuple[int, float] | None:
    """(pid, create time) of the ceph-fuse a supervisor with this ``state_dir`` runs, if
    that process still runs (its pid file, read as the supervisor reads it)."""
    from supervisor.storage import recorded_fuse

    proc = recorded_fuse(state_dir)
    if proc is None:
        return None
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def reap_managed_mount(state_dir: Path, mountpoint: Path) -> None:
    """What a supervisor's managed mount left (its ceph-fuse survives a killed supervisor):
    kill that ceph-fuse by its recorded PID and take the mount at ``mountpoint`` away."""
    fuse = managed_fuse(state_dir)
    if fuse is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(fuse[0], signal.SIGCONT)  # a frozen one must be able to die
            os.killpg(fuse[0], signal.SIGKILL)
    _umount(mountpoint)


@dataclass
class CephDaemon:
    """One daemon (``mon.a``, ``osd.0``, ``mds.b``...); a stopped one can start again."""

    kind: str
    ident: str
    data_dir: Path
    process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.ident}"

    def running(self) -> bool:
        return self.process is not None and self.process.running()


@dataclass
class Mount:
    """A ceph-fuse mount of the file system at ``path`` as ``client.<name>``, rooted at ``root``.

    Each (re)mount has its own admin socket (:attr:`admin_socket`), so the node's own client
    identity can be read from it (``storage.ceph_fence.read_mount_identity``).
    """

    cluster: CephCluster
    name: str
    path: Path
    root: str
    keyring: Path
    process: ManagedProcess | None = None
    generation: int = 0
    """How many times this mount was started (1 for the first mount)."""
    tag: str = ""
    """``client.<name>.<serial>``: names this mount instance's log and admin socket."""
    admin_socket: Path = field(default=Path("/nonexistent"))

    @property
    def entity(self) -> str:
        return f"client.{self.name}"

    def mounted(self) -> bool:
        return _mounted(self.path)

    def start(self, timeout: float = 60.0) -> float:
        """Mount (the process runs in the foreground); returns the seconds it took."""
        began = time.monotonic()
        if self.mounted():
            raise RuntimeError(f"{self.path} is already a mount point")
        self.path.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        self.tag = f"{self.entity}.{self.cluster.next_mount_serial()}"
        self.admin_socket = self.cluster.run_dir / f"{self.tag}.asok"
        argv = [
            ceph_binary("ceph-fuse"), "-f",
            "-c", str(self.cluster.conf_path),
            "-n", self.entity,
            "-k", str(self.keyring),
            "-r", self.root,
            "--admin-socket", str(self.admin_socket),
            "--log-file", str(self.cluster.log_dir / f"ceph-fuse.{self.tag}.log"),
            str(self.path),
        ]  # fmt: skip
        self.process = ManagedProcess(
            f"ceph-fuse.{self.tag}", argv, self.cluster.log_dir / f"ceph-fuse.{self.tag}.out"
        )
        self.process.start()
        deadline = began + timeout
        while not (self.mounted() and os.path.isdir(self.path)):
            if not self.process.running() or time.monotonic() > deadline:
                why = (
                    "timed out" if self.process.running() else f"exited {self.process.returncode()}"
                )
                tail = self.log_tail(10)
                self.unmount()
                raise RuntimeError(f"ceph-fuse {self.entity} on {self.path}: {why}:\n{tail}")
            time.sleep(0.05)
        return time.monotonic() - began

    def unmount(self, timeout: float = 10.0) -> None:
        """Unmount by path and stop this mount's ceph-fuse by PID (thawed first if frozen)."""
        if self.process is not None:
            self.process.thaw()
        _umount(self.path, timeout)
        if self.process is not None:
            # After the unmount ceph-fuse exits by itself; a fenced one may hang flushing.
            self.process.stop(timeout=3.0)
        _umount(self.path, timeout)

    def freeze(self) -> None:
        """SIGSTOP this mount's ceph-fuse (file operations on the mount then block)."""
        assert self.process is not None
        self.process.freeze()

    def thaw(self) -> None:
        assert self.process is not None
        self.process.thaw()

    def kill(self) -> None:
        """SIGKILL this mount's ceph-fuse (a crash); the dead mount stays until :meth:`unmount`."""
        assert self.process is not None
        self.process.kill()

    def remount(self, timeout: float = 60.0) -> float:
        """Unmount and mount again (a new client instance); returns the seconds it took."""
        began = time.monotonic()
        self.unmount()
        self.start(timeout)
        return time.monotonic() - began

    def log_tail(self, lines: int = 30) -> str:
        if self.process is None:
            return "(never mounted)"
        log = self.cluster.log_dir / f"ceph-fuse.{self.tag}.log"
        return _file_tail(log, lines) + "\n" + self.process.log_tail(lines)


def _file_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class CephCluster:
    """A small Ceph cluster with one CephFS under ``base_dir``, for tests and local clusters.

    ``start()`` builds it from nothing and returns the bring-up time; ``stop()`` stops every
    process by PID (clients, then MDS and mgr, OSDs, mons) and unmounts every mount it made.
    Fault injection: :meth:`kill_osd`/:meth:`restart_osd`, :meth:`kill_active_mds`,
    :meth:`restart_mds`, and the :class:`Mount` returned by :meth:`mount` (freeze, thaw, kill,
    remount).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        fs_name: str = FS_NAME,
        mons: int = 3,
        osds: int = 3,
        mdss: int = 2,
        osd_size: int = OSD_SIZE,
    ) -> None:
        self.base_dir = base_dir.resolve()
        self.fs_name = fs_name
        self.fsid = str(uuid.uuid4())
        self.osd_size = osd_size
        self.conf_path = self.base_dir / "ceph.conf"
        self.keyring_dir = self.base_dir / "keyrings"
        self.log_dir = self.base_dir / "log"
        self.run_dir = self.base_dir / "run"
        self.admin_keyring = self.keyring_dir / "client.admin.keyring"
        self.port_base = _reserve_port_range(_PORTS_PER_CLUSTER)
        self.mon_ports = [self.port_base + i for i in range(mons)]
        self.mons = [
            CephDaemon("mon", chr(ord("a") + i), self.base_dir / "mon") for i in range(mons)
        ]
        self.mgrs = [CephDaemon("mgr", "x", self.base_dir / "mgr")]
        self.osds = [CephDaemon("osd", str(i), self.base_dir / "osd") for i in range(osds)]
        self.mdss = [
            CephDaemon("mds", chr(ord("a") + i), self.base_dir / "mds") for i in range(mdss)
        ]
        for d in self.daemons:
            d.data_dir = d.data_dir / f"ceph-{d.ident}"
        self.mounts: list[Mount] = []
        self.bringup_seconds: float | None = None
        self._rados: Any = None
        self._admin_fs: Any = None
        self._lock = threading.Lock()
        self._mount_serial = 0

    # --- layout --------------------------------------------------------------------------
    @property
    def daemons(self) -> list[CephDaemon]:
        return [*self.mons, *self.mgrs, *self.osds, *self.mdss]

    @property
    def mon_host(self) -> str:
        return ",".join(f"[v2:127.0.0.1:{p}]" for p in self.mon_ports)

    @property
    def data_pool(self) -> str:
        return f"cephfs.{self.fs_name}.data"

    @property
    def metadata_pool(self) -> str:
        return f"cephfs.{self.fs_name}.meta"

    def keyring_path(self, entity: str) -> Path:
        return self.keyring_dir / f"{entity}.keyring"

    def _conf_text(self) -> str:
        b = self.base_dir
        ms_min = self.port_base + len(self.mon_ports)
        ms_max = self.port_base + _PORTS_PER_CLUSTER - 1
        glob = {
            "fsid": self.fsid,
            "mon_host": self.mon_host,
            "public_addr": "127.0.0.1",
            "cluster_addr": "127.0.0.1",
            "ms_bind_msgr1": "false",
            "ms_bind_msgr2": "true",
            "ms_bind_port_min": str(ms_min),
            "ms_bind_port_max": str(ms_max),
            "auth_cluster_required": "cephx",
            "auth_service_required": "cephx",
            "auth_client_required": "cephx",
            "auth_allow_insecure_global_id_reclaim": "false",
            "keyring": f"{self.keyring_dir}/$name.keyring",
            "log_file": f"{self.log_dir}/$cluster-$name.log",
            "admin_socket": f"{self.run_dir}/$cluster-$name.asok",
            "run_dir": str(self.run_dir),
            "crash_dir": f"{b}/crash",
            "exporter_sock_dir": str(self.run_dir),
            "mon_data": f"{b}/mon/$cluster-$id",
            "mgr_data": f"{b}/mgr/$cluster-$id",
            "osd_data": f"{b}/osd/$cluster-$id",
            "mds_data": f"{b}/mds/$cluster-$id",
            "mon_cluster_log_file": f"{self.log_dir}/$cluster.log",
            "mon_election_timeout": "2",
            "mon_allow_pool_delete": "true",
            "mon_data_avail_warn": "2",
            "mon_data_avail_crit": "1",
            "mon_warn_on_pool_no_redundancy": "false",
            "mon_osd_reporter_subtree_level": "osd",
            # No mgr python modules (the fs needs none; they cost ~270 MiB): only the
            # mgr's own PG statistics, which wait_healthy() reads.
            "mgr_module_path": f"{b}/mgr-modules",
            "mgr_initial_modules": "",
            "mgr_stats_period": "1",  # PG states reach `pg stat` in ~1 s, not 5
            "osd_pool_default_size": "3",
            "osd_pool_default_min_size": "2",
            "osd_pool_default_pg_num": "8",
            "osd_pool_default_pgp_num": "8",
            "osd_pool_default_pg_autoscale_mode": "off",
            "osd_crush_chooseleaf_type": "0",
            "osd_objectstore": "bluestore",
            "osd_memory_target": str(OSD_MEMORY_TARGET),
            "bluestore_block_size": str(self.osd_size),
            "bluestore_block_create": "true",
            "mds_cache_memory_limit": str(128 << 20),
            # Within 60 s (the default) of a new quorum, or while a mon is down, the mons
            # defer failing a silent MDS up to this long instead of mds_beacon_grace (15 s): a
            # fresh test cluster would take 40 s to replace a killed MDS.
            "mds_beacon_mon_down_grace": "15",
            "rados_mon_op_timeout": "30",
            "client_mount_timeout": "30",
        }
        out = ["[global]", *(f"{k} = {v}" for k, v in glob.items())]
        for i, (mon, port) in enumerate(zip(self.mons, self.mon_ports, strict=True)):
            out += ["", f"[{mon.name}]", f"public_addrv = [v2:127.0.0.1:{port}]"]
            if i:  # every mon writes the whole cluster log: one file is enough
                out.append("mon_cluster_log_to_file = false")
        out += ["", "[client]", f"log_file = {self.log_dir}/$cluster-$name.$pid.log"]
        return "\n".join(out) + "\n"

    def _daemon_caps(self, d: CephDaemon) -> dict[str, str]:
        return {
            "mon": {"mon": "allow *"},
            "mgr": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
            "osd": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
            "mds": {
                "mon": "allow profile mds",
                "mgr": "allow profile mds",
                "osd": "allow rwx",
                "mds": "allow *",
            },
        }[d.kind]

    def _write_keys(self) -> Path:
        """Every daemon's keyring, and the mon keyring that imports them all at mkfs."""
        self.keyring_dir.mkdir(parents=True, exist_ok=True)
        admin_caps = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}
        entries = [("client.admin", admin_caps)]
        entries += [(d.name, self._daemon_caps(d)) for d in self.daemons if d.kind != "mon"]
        mon_key = cephx_key()
        everything = [keyring_text("mon.", mon_key, {"mon": "allow *"})]
        for entity, caps in entries:
            text = keyring_text(entity, cephx_key(), caps)
            self.keyring_path(entity).write_text(text)
            everything.append(text)
        for mon in self.mons:  # mons read the shared mon. key from their own keyring path
            self.keyring_path(mon.name).write_text(everything[0])
        mon_keyring = self.base_dir / "mon-mkfs.keyring"
        mon_keyring.write_text("".join(everything))
        for path in (*self.keyring_dir.iterdir(), mon_keyring):
            path.chmod(0o600)
        return mon_keyring

    # --- processes -----------------------------------------------------------------------
    def _daemon_argv(self, d: CephDaemon) -> list[str]:
        return [ceph_binary(f"ceph-{d.kind}"), "-f", "-c", str(self.conf_path), "-i", d.ident]

    def _start_daemon(self, d: CephDaemon) -> None:
        if d.process is None:
            d.process = ManagedProcess(d.name, self._daemon_argv(d), self.log_dir / f"{d.name}.out")
        d.process.start()

    def _run(self, argv: list[str], what: str, timeout: float = 120.0) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")

    def _mkfs_mons(self, mon_keyring: Path) -> None:
        monmap = self.base_dir / "monmap"
        argv = [ceph_binary("monmaptool"), "--create", "--fsid", self.fsid, "--enable-all-features"]
        for mon, port in zip(self.mons, self.mon_ports, strict=True):
            argv += ["--addv", mon.ident, f"[v2:127.0.0.1:{port}]"]
        self._run([*argv, str(monmap)], "monmaptool")
        procs = []
        for mon in self.mons:
            mon.data_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                ceph_binary("ceph-mon"), "--mkfs", "-c", str(self.conf_path), "-i", mon.ident,
                "--monmap", str(monmap), "--keyring", str(mon_keyring),
            ]  # fmt: skip
            procs.append(
                (mon, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            )
        for mon, p in procs:
            out, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"ceph-mon --mkfs {mon.name}: {out.decode(errors='replace')}")

    def _mkfs_osds(self) -> dict[str, str]:
        """Bluestore on a sparse ``block`` file per OSD, all at once; returns id -> OSD uuid."""
        uuids: dict[str, str] = {}
        procs = []
        for osd in self.osds:
            osd.data_dir.mkdir(parents=True, exist_ok=True)
            uuids[osd.ident] = str(uuid.uuid4())
            argv = [
                ceph_binary("ceph-osd"), "--mkfs", "--no-mon-config", "-c", str(self.conf_path),
                "-i", osd.ident, "--osd-uuid", uuids[osd.ident],
            ]  # fmt: skip
            procs.append(
                (osd, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            )
        for osd, p in procs:
            out, _ = p.communicate(timeout=180)
            if p.returncode != 0:
                raise RuntimeError(f"ceph-osd --mkfs {osd.name}: {out.decode(errors='replace')}")
        return uuids

    # --- librados ------------------------------------------------------------------------
    def _connect(self, timeout: float) -> None:
        import rados  # type: ignore[import-not-found]

        deadline = time.monotonic() + timeout
        while True:
            r = rados.Rados(
                conffile=str(self.conf_path),
                name="client.admin",
                conf={"keyring": str(self.admin_keyring), "client_mount_timeout": "10"},
            )
            try:
                r.connect()
            except rados.Error:
                r.shutdown()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            self._rados = r
            return

    def mon_command(self, cmd: Mapping[str, Any], inbuf: bytes = b"") -> Any:
        """Run a mon command as client.admin; returns its parsed JSON output (or the status
        text when there is none). Raises :class:`CephCommandError`."""
        return self._command(self._rados.mon_command, cmd, inbuf)

    def mgr_command(self, cmd: Mapping[str, Any], inbuf: bytes = b"") -> Any:
        return self._command(self._rados.mgr_command, cmd, inbuf)

    def _command(self, send: Callable[..., Any], cmd: Mapping[str, Any], inbuf: bytes) -> Any:
        if self._rados is None:
            raise RuntimeError("the cluster is not connected (start() first)")
        body = {"format": "json", **cmd}
        ret, out, outs = send(json.dumps(body), inbuf)
        if ret != 0:
            raise CephCommandError(cmd, -ret, outs)
        if out:
            try:
                return json.loads(out)
            except ValueError:
                return out.decode(errors="replace")
        return outs

    # --- bring-up ------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> float:
        """Build and start everything; returns the bring-up time in seconds."""
        began = time.monotonic()
        deadline = began + timeout
        for d in (self.log_dir, self.run_dir, self.base_dir / "crash"):
            d.mkdir(parents=True, exist_ok=True)
        modules = self.base_dir / "mgr-modules"
        modules.mkdir(exist_ok=True)
        for lib in ("mgr_module.py", "mgr_util.py"):  # what the mgr imports at start
            with contextlib.suppress(FileExistsError):
                (modules / lib).symlink_to(Path("/usr/share/ceph/mgr") / lib)
        self.conf_path.write_text(self._conf_text())
        mon_keyring = self._write_keys()
        # The OSDs' bluestore mkfs (the slowest step) runs while the mons form a quorum.
        osd_mkfs: dict[str, Any] = {}

        def mkfs_osds() -> None:
            try:
                osd_mkfs["uuids"] = self._mkfs_osds()
            except BaseException as exc:
                osd_mkfs["error"] = exc

        worker = threading.Thread(target=mkfs_osds, name="osd-mkfs", daemon=True)
        worker.start()
        try:
            self._mkfs_mons(mon_keyring)
            for mon in self.mons:
                self._start_daemon(mon)
            self._connect(max(1.0, deadline - time.monotonic()))
            for mgr in self.mgrs:
                self._start_daemon(mgr)
            for mds in self.mdss:
                self._start_daemon(mds)
            worker.join(max(1.0, deadline - time.monotonic()))
            if "error" in osd_mkfs:
                raise osd_mkfs["error"]
            if "uuids" not in osd_mkfs:
                raise TimeoutError("ceph-osd --mkfs did not finish")
            for osd in self.osds:
                self.mon_command(
                    {
                        "prefix": "osd new",
                        "uuid": osd_mkfs["uuids"][osd.ident],
                        "id": int(osd.ident),
                    }
                )
                self._start_daemon(osd)
            for pool in (self.metadata_pool, self.data_pool):
                self.mon_command({"prefix": "osd pool create", "pool": pool, "pg_num": 8})
            self.mon_command(
                {
                    "prefix": "fs new",
                    "fs_name": self.fs_name,
                    "metadata": self.metadata_pool,
                    "data": self.data_pool,
                }
            )
            # The mgr runs without its python modules (see _conf_text): say so once.
            mute = {"prefix": "health mute", "code": "MGR_MODULE_ERROR", "sticky": True}
            self.mon_command(mute)
            self.wait_healthy(max(1.0, deadline - time.monotonic()))
            fs = self.admin_fs()
            fs.mkdirs(DATA_ROOT.encode(), 0o755)
            fs.setxattr(
                DATA_ROOT.encode(), "ceph.dir.layout.pool_namespace", DATA_NAMESPACE.encode(), 0
            )
        except BaseException:
            self.stop()
            raise
        self.bringup_seconds = time.monotonic() - began
        return self.bringup_seconds

    def admin_fs(self) -> Any:
        """A libcephfs handle mounted at ``/`` as client.admin (for set-up and checks)."""
        with self._lock:
            if self._admin_fs is None:
                import cephfs  # type: ignore[import-not-found]

                fs = cephfs.LibCephFS(rados_inst=self._rados)
                fs.mount(filesystem_name=self.fs_name.encode())
                self._admin_fs = fs
            return self._admin_fs

    # --- state ---------------------------------------------------------------------------
    def osds_up(self) -> int:
        return int(self.mon_command({"prefix": "osd stat"})["num_up_osds"])

    def mds_state(self) -> dict[str, str]:
        """MDS name -> state (``up:active``, ``up:standby``, ``up:replay``...) of the fs and the
        standby pool."""
        dump = self.mon_command({"prefix": "fs dump"})
        states = {s["name"]: s["state"] for s in dump.get("standbys", [])}
        for fs in dump["filesystems"]:
            if fs["mdsmap"]["fs_name"] == self.fs_name:
                states.update({i["name"]: i["state"] for i in fs["mdsmap"]["info"].values()})
        return states

    def active_mds(self) -> str | None:
        """The name (``a``/``b``) of the active MDS, or None while there is none."""
        active = [n for n, s in self.mds_state().items() if s == "up:active"]
        return active[0] if active else None

    def pgs_clean(self) -> bool:
        stat = self.mgr_command({"prefix": "pg stat"})
        stat = stat.get("pg_summary", stat)
        states = {s["name"]: s["num"] for s in stat.get("num_pg_by_state", [])}
        return stat.get("num_pgs", 0) > 0 and states.get("active+clean", 0) == stat["num_pgs"]

    def healthy(self) -> bool:
        """All OSDs up, one MDS active and the others standby, all PGs active+clean."""
        if self.osds_up() != len(self.osds):
            return False
        states = sorted(self.mds_state().values())
        want = sorted(["up:active"] + ["up:standby"] * (len(self.mdss) - 1))
        return states == want and self.pgs_clean()

    def wait_healthy(self, timeout: float = 120.0) -> None:
        wait_until(self.healthy, timeout, interval=0.2, what="ceph cluster healthy")

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes of every running daemon and ceph-fuse."""
        procs = [(d.name, d.process) for d in self.daemons]
        procs += [(f"ceph-fuse.{m.name}", m.process) for m in self.mounts]
        out: dict[str, int] = {}
        for name, proc in procs:
            if proc is not None and proc.running():
                with contextlib.suppress(psutil.Error):
                    out[name] = psutil.Process(proc.pid).memory_info().rss
        return out

    # --- faults --------------------------------------------------------------------------
    def daemon(self, name: str) -> CephDaemon:
        for d in self.daemons:
            if d.name == name:
                return d
        raise KeyError(name)

    def kill_osd(self, ident: int | str) -> None:
        """SIGKILL one OSD (its data stays, so :meth:`restart_osd` brings it back)."""
        osd = self.daemon(f"osd.{ident}")
        assert osd.process is not None
        osd.process.kill()

    def restart_osd(self, ident: int | str, timeout: float = 60.0) -> None:
        """Start a stopped OSD and wait until the mons see it up."""
        osd = self.daemon(f"osd.{ident}")
        self._start_daemon(osd)

        def up() -> bool:
            tree = self.mon_command({"prefix": "osd dump"})
            return any(o["osd"] == int(osd.ident) and o["up"] == 1 for o in tree["osds"])

        wait_until(up, timeout, interval=0.2, what=f"{osd.name} up")

    def kill_mds(self, ident: str) -> None:
        mds = self.daemon(f"mds.{ident}")
        assert mds.process is not None
        mds.process.kill()

    def kill_active_mds(self) -> str:
        """SIGKILL the active MDS; returns its name. The standby takes over after the mons
        miss its beacons (``mds_beacon_grace``, 15 s)."""
        name = self.active_mds()
        if name is None:
            raise RuntimeError("no active MDS to kill")
        self.kill_mds(name)
        return name

    def restart_mds(self, ident: str) -> None:
        self._start_daemon(self.daemon(f"mds.{ident}"))

    def wait_active_mds(self, timeout: float = 90.0, *, other_than: str | None = None) -> str:
        """Wait for an active MDS (other than ``other_than``) and return its name."""
        found: list[str] = []

        def active() -> bool:
            name = self.active_mds()
            if name is not None and name != other_than:
                found.append(name)
                return True
            return False

        wait_until(active, timeout, interval=0.1, what="an active MDS")
        return found[-1]

    def heal(self, timeout: float = 120.0) -> None:
        """Thaw and restart whatever a test froze or killed; wait until healthy again."""
        for d in self.daemons:
            if d.process is not None:
                d.process.thaw()
                if not d.process.running():
                    self._start_daemon(d)
        self.wait_healthy(timeout)

    # --- clients -------------------------------------------------------------------------
    def mds_command(self, cmd: Mapping[str, Any]) -> Any:
        """Run an MDS command on the active MDS as client.admin (parsed JSON output)."""
        name = self.active_mds()
        if name is None:
            raise RuntimeError("no active MDS")
        ret, out, outs = self.admin_fs().mds_command(
            name, json.dumps({"format": "json", **cmd}), b""
        )
        if ret != 0:
            raise CephCommandError(cmd, -ret, outs)
        return json.loads(out) if out else outs

    def evict_sessions(self, entity: str) -> None:
        """Evict (and blocklist) every MDS session of ``entity`` as client.admin: frees the
        capabilities a killed or frozen mount still holds."""
        self.mds_command({"prefix": "client evict", "filters": [f"auth_name={entity[7:]}"]})

    def authorize(self, entity: str, caps: Mapping[str, str]) -> Path:
        """Create ``entity`` with ``caps`` (or check it has them) and write its keyring."""
        flat: list[str] = []
        for svc, cap in caps.items():
            flat += [svc, cap]
        self.mon_command({"prefix": "auth get-or-create", "entity": entity, "caps": flat})
        out = self._rados.mon_command(json.dumps({"prefix": "auth get", "entity": entity}), b"")
        if out[0] != 0:
            raise CephCommandError({"prefix": "auth get"}, -out[0], out[2])
        path = self.keyring_path(entity)
        path.write_bytes(out[1])
        path.chmod(0o600)
        return path

    def next_mount_serial(self) -> int:
        with self._lock:
            self._mount_serial += 1
            return self._mount_serial

    def node_keyring(self, name: str) -> Path:
        """The keyring of ``client.<name>`` with :func:`node_caps` (created on first use)."""
        return self.authorize(f"client.{name}", node_caps(self.fs_name))

    def fencer_keyring(self, name: str = "fence") -> Path:
        """The keyring of ``client.<name>`` with :func:`fencer_caps` (created on first use)."""
        return self.authorize(f"client.{name}", fencer_caps(self.fs_name))

    def blocklister_keyring(self, name: str = "blocklister") -> Path:
        """The keyring of ``client.<name>`` with :func:`blocklister_caps`."""
        return self.authorize(f"client.{name}", blocklister_caps(self.fs_name))

    def supervisor_storage(self, name: str, root: str, **overrides: Any) -> dict[str, Any]:
        """A supervisor's ``storage`` section: a managed ceph-fuse mount of ``root`` (created
        here, below :data:`DATA_ROOT`) as ``client.<name>`` with its own node key, and the
        fencer key for takeovers. Fast probes for tests; ``overrides`` replace fields."""
        if not root.startswith(DATA_ROOT + "/"):
            raise ValueError(f"root {root!r} is not below {DATA_ROOT}")
        self.admin_fs().mkdirs(root.encode(), 0o755)
        section: dict[str, Any] = {
            "kind": "cephfs",
            "probe_interval": 1.0,
            "probe_timeout": 3.0,
            "cephfs": {
                "conf": str(self.conf_path),
                "fs_name": self.fs_name,
                "entity": f"client.{name}",
                "keyring": str(self.node_keyring(name)),
                "root": root,
                "mount": "managed",
                "fencer_entity": "client.fence",
                "fencer_keyring": str(self.fencer_keyring("fence")),
                "evict_timeout": 10.0,
            },
        }
        section.update(overrides)
        return section

    def mount(
        self, name: str, path: Path, *, root: str = DATA_ROOT, timeout: float = 60.0
    ) -> Mount:
        """Mount ``root`` of the fs at ``path`` with ceph-fuse as ``client.<name>`` (its own
        node key, see :func:`node_caps`)."""
        m = Mount(self, name, path.resolve(), root, self.node_keyring(name))
        self.mounts.append(m)
        m.start(timeout)
        return m

    # --- shutdown ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything by PID in order: mounts, MDS and mgr, OSDs, mons."""
        for m in self.mounts:
            with contextlib.suppress(Exception):
                m.unmount()
        # The admin handles, in a thread: an unmount may wait for an MDS that is gone.
        handles = [h for h in (self._admin_fs, self._rados) if h is not None]
        self._admin_fs = self._rados = None

        def shutdown() -> None:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.shutdown()

        closer = threading.Thread(target=shutdown, name="ceph-admin-shutdown", daemon=True)
        closer.start()
        closer.join(10)
        # The active MDS may ignore SIGTERM for > 15 s: a short grace, then SIGKILL.
        self._stop_all([*self.mdss, *self.mgrs], grace=2.0)
        self._stop_all(self.osds, grace=5.0)
        self._stop_all(self.mons, grace=5.0)

    @staticmethod
    def _stop_all(daemons: list[CephDaemon], grace: float) -> None:
        threads = [
            threading.Thread(target=d.process.stop, args=(grace,), daemon=True)
            for d in daemons
            if d.process is not None
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(grace + 15)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for d in self.daemons:
            if d.process is not None:
                log = self.log_dir / f"ceph-{d.name}.log"
                parts.append(f"--- {d.name} ---\n{_file_tail(log, lines)}\n{d.process.log_tail(5)}")
        for m in self.mounts:
            parts.append(f"--- ceph-fuse {m.entity} at {m.path} ---\n{m.log_tail(lines)}")
        parts.append(f"--- cluster log ---\n{_file_tail(self.log_dir / 'ceph.log', lines)}")
        return "\n".join(parts)


class CephSpace:
    """One test's own directory below :data:`DATA_ROOT`, and its nodes' mounts.

    Node ``a1`` of this space mounts as ``client.a1-<token>`` (a fresh entity per test, so no
    test sees another one's sessions) at ``<mount_dir>/a1``; :meth:`dir` is the test's
    directory on a mount. :meth:`close` unmounts everything and evicts what is left.
    """

    def __init__(self, cluster: CephCluster, name: str, mount_dir: Path) -> None:
        self.cluster = cluster
        self.token = uuid.uuid4().hex[:6]
        self.subdir = f"{name}-{self.token}"
        self.mount_dir = mount_dir
        self.mounts: dict[str, Mount] = {}
        cluster.admin_fs().mkdirs(f"{DATA_ROOT}/{self.subdir}".encode(), 0o755)

    def entity_name(self, node: str) -> str:
        """The cephx id (without ``client.``) node ``node`` uses in this test."""
        return f"{node}-{self.token}"

    def mount(self, node: str, *, timeout: float = 60.0) -> Mount:
        """Mount :data:`DATA_ROOT` for ``node`` with its own key at ``<mount_dir>/<node>``."""
        if node in self.mounts:
            raise ValueError(f"{node} is mounted already (use its Mount.remount())")
        m = self.cluster.mount(self.entity_name(node), self.mount_dir / node, timeout=timeout)
        self.mounts[node] = m
        return m

    def dir(self, m: Mount) -> Path:
        """This test's directory as seen through mount ``m``."""
        return m.path / self.subdir

    def close(self) -> None:
        for m in self.mounts.values():
            with contextlib.suppress(Exception):
                m.unmount()
        for m in self.mounts.values():
            with contextlib.suppress(Exception):
                self.cluster.evict_sessions(m.entity)


@contextlib.contextmanager
def running_cluster(base_dir: Path, **options: Any) -> Iterator[CephCluster]:
    """A started :class:`CephCluster`, stopped (by PID) on exit."""
    cluster = CephCluster(base_dir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
