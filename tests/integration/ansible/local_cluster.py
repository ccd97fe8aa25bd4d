"""The local rollout test's cluster: wheels, TLS, playbook runs, lookups and teardown.

Every "host" of ``ansible/inventories/local`` is a directory under the test's root with its
own loopback address; the playbooks start real etcd, Consul, atDirectory and supervisor
processes there (pid files kept by the managed_service role's svcctl.py). See
ansible/README.md, "The local rollout test".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from atserver_runner.probe import probe_atserver, probe_ssl_context
from directory.shards import layout_services
from testbed.ceph import managed_fuse, reap_managed_mount
from testbed.tls import TestCA

REPO = Path(__file__).resolve().parents[3]
ANSIBLE_DIR = REPO / "ansible"
INVENTORY = ANSIBLE_DIR / "inventories" / "local" / "hosts.yml"
VAULT_PASSWORD_FILE = ANSIBLE_DIR / "inventories" / "local" / "vault-password.txt"
VENV_BIN = Path(sys.executable).parent
# The packages the wheel ships: pyproject.toml's own list (a package missing from a copy
# here would be missing on every node).
PACKAGES = tuple(
    pattern.rstrip("*")
    for pattern in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    if not pattern.endswith(".*")
)
PLAYBOOK_TIMEOUT = 480.0
RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Inventory:
    """What the test needs from the local inventory (read with ``ansible-inventory``)."""

    addresses: dict[str, str]
    groups: dict[str, list[str]]
    atsigns: list[str]
    consul_token: str
    directory_port: int
    ttl: float

    @property
    def directories(self) -> list[tuple[str, int]]:
        return [(self.addresses[h], self.directory_port) for h in self.groups["directory"]]


def read_inventory() -> Inventory:
    """Parse ``ansible-inventory --list`` of the local inventory (vault decrypted)."""
    out = subprocess.run(
        [
            str(VENV_BIN / "ansible-inventory"),
            "-i",
            str(INVENTORY),
            "--vault-password-file",
            str(VAULT_PASSWORD_FILE),
            "--list",
        ],
        cwd=ANSIBLE_DIR,
        env=ansible_env(Path("/nonexistent")),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    hostvars: dict[str, dict[str, Any]] = data["_meta"]["hostvars"]
    groups = {
        name: sorted(_group_hosts(data, name)) for name in ("etcd", "swarm_nodes", "directory")
    }
    anyhost = next(iter(hostvars.values()))
    return Inventory(
        addresses={h: str(v["node_address"]) for h, v in hostvars.items()},
        groups=groups,
        atsigns=[str(a["atsign"]) for a in anyhost["atfailover_atsigns"]],
        consul_token=str(anyhost["vault_consul_atfailover_token"]),
        directory_port=int(anyhost.get("directory_port", 64)),
        ttl=float(anyhost["supervisor_timing"]["ttl"]),
    )


def _group_hosts(data: dict[str, Any], group: str) -> set[str]:
    entry = data.get(group, {})
    hosts = set(entry.get("hosts", []))
    for child in entry.get("children", []):
        hosts |= _group_hosts(data, child)
    return hosts


def ansible_env(root: Path) -> dict[str, str]:
    """Environment for ansible-* commands: the repo's config, the test's root."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ATFAILOVER_LOCAL_ROOT=str(root),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    return env


def build_wheel(workdir: Path, wheelhouse: Path, version: str) -> Path:
    """Build the project's wheel with ``version`` from a copy of the source (no in-tree build)."""
    src = workdir / f"src-{version}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
    shutil.copy(REPO / "README.md", src / "README.md")
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject, count = re.subn(r'(?m)^version = "[^"]*"', f'version = "{version}"', pyproject)
    assert count == 1, "pyproject.toml: [project] version line not found"
    (src / "pyproject.toml").write_text(pyproject)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(VENV_BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheelhouse),
            str(src),
        ],
        check=True,
        timeout=300,
    )
    wheels = sorted(wheelhouse.glob(f"atsign_failover-{version}-*.whl"))
    assert wheels, f"no wheel for version {version} in {wheelhouse}"
    return wheels[0]


def make_tls(root: Path, inv: Inventory) -> TestCA:
    """The CA, a certificate per directory replica, one for every node's atServers, and one
    per swarm node's API."""
    ca = TestCA(root / "tls")
    for host in inv.groups["directory"]:
        ca.issue(host, [inv.addresses[host], "localhost"])
    ca.issue("atserver", [inv.addresses[h] for h in inv.groups["swarm_nodes"]] + ["localhost"])
    for host in inv.groups["swarm_nodes"]:  # each node API's own certificate
        ca.issue(f"{host}-api", [inv.addresses[host], "localhost"])
    return ca


def ceph_json(root: Path, host: str, *command: str, timeout: float = 60.0) -> Any:
    """A ``ceph`` CLI command's JSON answer, as client.admin through ``host``'s ceph.conf
    (a monitor host: the role put the admin keyring next to it)."""
    conf = root / "hosts" / host / "etc/ceph/ceph.conf"
    done = subprocess.run(
        ["ceph", "--conf", str(conf), "--connect-timeout", "20", "--format", "json", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        what = " ".join(command)
        raise RuntimeError(f"ceph {what}: exit {done.returncode}: {done.stderr[-500:]}")
    return json.loads(done.stdout)


def data_root_mount(root: Path, host: str) -> str | None:
    """The file system type mounted at ``host``'s supervisor data root, or None."""
    target = os.path.realpath(root / "hosts" / host / "var/lib/atfailover/atservers")
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == target:
                return fields[2]
    return None


@dataclass
class PlaybookRun:
    """One ansible-playbook run: exit code, duration, per-host recap and the output."""

    rc: int
    seconds: float
    recap: dict[str, dict[str, int]]
    output: str

    @property
    def changed(self) -> int:
        return sum(r["changed"] for r in self.recap.values())

    def _results(self, prefixes: tuple[str, ...]) -> Iterator[tuple[str, int, list[str]]]:
        """(task header, line index, all lines) for each result line starting with a prefix."""
        lines = self.output.splitlines()
        current = ""
        for i, line in enumerate(lines):
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                current = line.rstrip("* ")
            elif line.startswith(prefixes):
                yield current, i, lines

    def changed_tasks(self) -> list[str]:
        """The tasks that reported a change (for assertion messages)."""
        return [
            f"{task} {lines[i].split(']')[0]}]" for task, i, lines in self._results(("changed: [",))
        ]

    def failed_tasks(self, context: int = 12) -> list[str]:
        """Each failed task with the lines Ansible printed for it (the reason)."""
        return [
            "\n".join([task, *lines[i : i + context]])
            for task, i, lines in self._results(("fatal: [", "failed: ["))
        ]

    def tail(self, lines: int = 60) -> str:
        """The failed tasks first (they may be far from the end), then the last lines."""
        failed = self.failed_tasks()
        head = ["failed tasks:", *failed, "", "last lines:"] if failed else []
        return "\n".join([*head, *self.output.splitlines()[-lines:]])


def run_playbook(
    root: Path, playbook: str, *extra: str, inventory: Path = INVENTORY
) -> PlaybookRun:
    """Run a playbook of ansible/ against the local inventory (or ``inventory``, e.g. a
    changed copy of it); bounded in time."""
    argv = [
        str(VENV_BIN / "ansible-playbook"),
        "-i",
        str(inventory),
        "--vault-password-file",
        str(VAULT_PASSWORD_FILE),
        playbook,
        *extra,
    ]
    start = time.monotonic()
    proc = subprocess.run(
        argv,
        cwd=ANSIBLE_DIR,
        env=ansible_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=PLAYBOOK_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - start
    (root / f"{Path(playbook).stem}-{int(time.time())}.log").write_text(proc.stdout)
    recap = {
        m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
        for m in RECAP_LINE.finditer(proc.stdout)
    }
    return PlaybookRun(proc.returncode, seconds, recap, proc.stdout)


# --- lookups ------------------------------------------------------------------------------


async def directory_lookup(
    host: str, port: int, atsign: str, ctx: ssl.SSLContext, timeout: float = 2.0
) -> str | None:
    """Ask an atDirectory (raw protocol over TLS) for ``atsign``: ``host:port`` or None."""

    async def ask() -> str | None:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=host, ssl_handshake_timeout=timeout
        )
        try:
            await reader.readuntil(b"@")
            writer.write(atsign.lstrip("@").encode() + b"\n")
            await writer.drain()
            answer = (await reader.readuntil(b"\n")).decode().strip()
            with contextlib.suppress(OSError):
                writer.write(b"@exit\n")
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        answer = answer.lstrip("@")
        return None if answer in ("null", "") else answer

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return None


async def resolve_and_read(
    directories: list[tuple[str, int]], atsign: str, ctx: ssl.SSLContext
) -> tuple[str | None, str]:
    """Resolve through the first answering replica, then do a read round trip on the atServer
    (``info:brief``, which must name this atSign). Returns (address or None, what happened)."""
    for host, port in directories:
        address = await directory_lookup(host, port, atsign, ctx)
        if address is None:
            continue
        a_host, _, a_port = address.rpartition(":")
        result = await probe_atserver(
            a_host, int(a_port), timeout=2.0, ssl_context=ctx, expect_atsign=atsign
        )
        if result.healthy:
            return address, result.detail
        return None, f"{atsign} -> {address}: {result.detail}"
    return None, f"{atsign}: no directory replica answered with an address"


async def consul_passing(url: str, token: str, service: str = "atserver") -> dict[str, set[str]]:
    """Passing instances in Consul, in every layout of ``service`` (the legacy service and
    its shards ``atserver-3f``, see directory/shards.py): atSign -> {host:port}."""
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {"X-Consul-Token": token}
    out: dict[str, set[str]] = {}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        async with http.get(f"{url}/v1/catalog/services") as resp:
            resp.raise_for_status()
            names = layout_services(service, await resp.json())
        for name in names:
            async with http.get(f"{url}/v1/health/service/{name}", params={"passing": "1"}) as resp:
                resp.raise_for_status()
                entries = await resp.json()
            for entry in entries:
                svc = entry["Service"]
                atsign = (svc.get("Meta") or {}).get("atsign", "")
                out.setdefault(atsign, set()).add(f"{svc['Address']}:{svc['Port']}")
    return out


def atsdk_resolve(root: Path, ca: Path, host: str, port: int, atsigns: list[str]) -> dict[str, str]:
    """Resolve with atsdk's root connection, in a subprocess with a timeout."""
    env = dict(os.environ, SSL_CERT_FILE=str(ca), HOME=str(root / "atsdk-home"))
    driver = Path(__file__).with_name("atsdk_resolve.py")
    out = subprocess.run(
        [sys.executable, str(driver), host, str(port), *atsigns],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answers: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return answers


def tls_context(ca: Path) -> ssl.SSLContext:
    """Verify servers against the test CA (hostname = the loopback address)."""
    return probe_ssl_context(ca)


# --- the client that keeps resolving during the upgrade --------------------------------------


@dataclass
class Availability:
    """Per atSign: when it last resolved and read fine, and the longest gap between two."""

    started: float
    last_ok: dict[str, float] = field(default_factory=dict)
    max_gap: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    failures: list[str] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=dict)
    """Per atSign, the addresses it resolved to, in order (consecutive repeats folded)."""

    def record(self, atsign: str, address: str | None, now: float, detail: str) -> None:
        if address is not None:
            history = self.seen.setdefault(atsign, [])
            if not history or history[-1] != address:
                history.append(address)
            gap = now - self.last_ok.get(atsign, self.started)
            self.max_gap[atsign] = max(self.max_gap.get(atsign, 0.0), gap)
            self.last_ok[atsign] = now
        elif len(self.failures) < 200:
            self.failures.append(f"{now - self.started:7.2f}s {detail}")

    def close(self, now: float) -> None:
        """Count the time since each atSign's last success as a gap too."""
        for atsign, last in self.last_ok.items():
            self.max_gap[atsign] = max(self.max_gap.get(atsign, 0.0), now - last)


async def keep_resolving(
    directories: list[tuple[str, int]],
    atsigns: list[str],
    ca: Path,
    stop: asyncio.Event,
    max_seconds: float,
    pause: float = 0.2,
) -> Availability:
    """Resolve and read every atSign in rounds until ``stop`` (or ``max_seconds``)."""
    ctx = tls_context(ca)
    clock = time.monotonic
    avail = Availability(started=clock())
    deadline = avail.started + max_seconds
    while not stop.is_set() and clock() < deadline:
        results = await asyncio.gather(*(resolve_and_read(directories, a, ctx) for a in atsigns))
        now = clock()
        for atsign, (address, detail) in zip(atsigns, results, strict=True):
            avail.record(atsign, address, now, detail)
        avail.rounds += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
    avail.close(clock())
    for atsign in atsigns:  # never resolved at all: the whole run is one gap
        avail.max_gap.setdefault(atsign, clock() - avail.started)
    return avail


# --- teardown -----------------------------------------------------------------------------


def _alive(pid: int, create_time: float | None) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None  # the pid was recycled: not ours
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:
        return None


def stop_everything(root: Path) -> list[str]:
    """Stop every process the rollout started under ``root``, by pid; return what was left.

    First each host's services through svcctl.py (the supervisor stops its atServers and its
    fence on SIGTERM), the managed ceph-fuse mounts and Ceph in order; then anything still
    recorded in a pid file (fence, atServers) is killed by pid, in its own process group.
    """
    hosts = sorted((root / "hosts").glob("*")) if (root / "hosts").is_dir() else []
    # Supervisors first, so that their atServers stop while the DCS is still up; then the
    # Ceph clients (a managed ceph-fuse outlives its supervisor), then Ceph's daemons in
    # order (MDS, mgr, OSDs, monitors), then everything else.
    killed: list[str] = []
    for pattern in ("atfailover-supervisor", "atdirectory", *CEPH_STOP_ORDER):
        for host in hosts:
            services = host / "var/lib/atfailover/services"
            for spec in sorted(services.glob(f"{pattern}.json")):
                _svcctl(services, "stop", spec)
        if pattern == "atdirectory":
            killed += _reap_mounts(hosts)
    for host in hosts:
        services = host / "var/lib/atfailover/services"
        if (services / "svcctl.py").exists():
            _svcctl(services, "stop-all", services)
    leftovers: list[tuple[int, float | None, str]] = []
    for host in hosts:
        state = host / "var/lib/atfailover/supervisor"
        fence = state / "fence.pid"
        if fence.exists():
            with contextlib.suppress(ValueError):
                leftovers.append((int(fence.read_text().strip()), None, f"{host.name} fence"))
        for rec in sorted((state / "workloads").glob("*.json")):
            with contextlib.suppress(ValueError, KeyError, json.JSONDecodeError):
                data = json.loads(rec.read_text())
                leftovers.append(
                    (int(data["pid"]), data.get("create_time"), f"{host.name} {rec.stem}")
                )
    for pid, created, what in leftovers:
        proc = _alive(pid, created)
        if proc is None or not _is_under(proc, root):
            continue
        killed.append(f"{what} pid {pid}")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.wait(timeout=10)
    return killed


CEPH_STOP_ORDER = (
    "atfailover-ceph-mds",
    "atfailover-ceph-mgr",
    "atfailover-ceph-osd-*",
    "atfailover-ceph-mon",
)
"""The ceph role's services (pid-file spec names), in the order they are stopped."""


def _reap_mounts(hosts: list[Path]) -> list[str]:
    """Kill each supervisor's managed ceph-fuse by its recorded pid and unmount its data root;
    return what was still running."""
    killed = []
    for host in hosts:
        state = host / "var/lib/atfailover/supervisor"
        fuse = managed_fuse(state)
        if fuse is not None:
            killed.append(f"{host.name} ceph-fuse pid {fuse[0]}")
        reap_managed_mount(state, host / "var/lib/atfailover/atservers")
    return killed


def _is_under(proc: psutil.Process, root: Path) -> bool:
    """Only kill processes whose command line names the test's root (never someone else's)."""
    try:
        return any(str(root) in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _svcctl(services: Path, command: str, target: Path) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, str(services / "svcctl.py"), command, str(target)],
            capture_output=True,
            timeout=60,
            check=False,
        )


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a leftover of an earlier run)."""
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
