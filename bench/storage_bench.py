"""Benchmark CephFS as the atServers' storage: fsync latency, takeover with and without the
storage fence, and the data guard's cost on the failover path.

One real Ceph cluster for the whole run (``testbed.ceph.CephCluster``, the tests' cluster: 3
mons, a mgr, 3 bluestore OSDs, 2 MDS, size 3 / min_size 2, all on loopback), stopped by PID at
the end, also on errors and SIGTERM; every phase has a deadline, the run ``--max-minutes``.

1. fsync: ``--fsync-samples`` appends of 200 bytes, each followed by an fsync, to a file held
   open (``O_APPEND``, as an atServer's commit log is), through a ceph-fuse mount and on the
   local disk (the run's temp dir); then ``--dual-samples`` through two mounts at once (two
   ceph-fuse clients, one thread each, each its own file, started together). p50/p99/max.
2. The data guard, timed directly (``supervisor/data_guard.py``; the supervisor does not log
   these steps), ``--guard-samples`` each, on a ceph-fuse mount and on the local disk:
   ``read_marker`` of a marker this client wrote, ``stamp_marker`` (write a temp file, fsync,
   rename, fsync the directory), and on CephFS both after *another* client (a second mount)
   wrote the marker last, as after a planned handoff (the MDS recalls that client's caps
   first). The fence's part comes from phase 3: the new owner's own log line
   ``event=storage-fence ... took=<s>`` of each takeover.
3. Takeover after a whole-node kill, for each ``--backends`` and each of ``--modes``, in a
   chaos cluster (``chaos.cluster``: 2 nodes a1/b1, each its own ceph-fuse and Consul agent,
   one atSign, dev atServers, the directory) on the same Ceph:
   ``evict`` is ``storage.kind: cephfs`` (the default: the new owner evicts and blocklists
   the lost owner's client before it starts); ``noevict`` is ``ClusterSpec(storage=
   "cephfs-noevict")``: the same mounts, but the supervisors have ``storage.kind: shared``
   (readiness only, no eviction). ``--reps`` times: write ``--writes`` keys through the
   directory, SIGKILL the owner whole (``Node.kill_node``: supervisor, fence, atServer,
   ceph-fuse, Consul agent), poll the directory every 0.1 s until it names a port of the
   other node *and* a PKAM login plus an ``llookup`` of the newest key succeeds there
   (``served_s``, from just before the kill; ``directory_s`` when the directory first named
   the other node), read every acknowledged write of the run back through the directory,
   restart the killed node (its mount again) and wait until it is ready; the next
   repetition kills the new owner.

Writes ``bench/results/storage.json`` and ``bench/results/storage.png``.
Run: ``nice -n 5 .venv/bin/python bench/storage_bench.py`` (about 12 minutes on 2 cores);
``--reps 1 --fsync-samples 50 --dual-samples 50 --guard-samples 20`` for a short run;
``--no-ceph`` for a check of the script without Ceph (local disk only); ``--replot``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chaos.atclient import AtConnection, AtError, client_ssl_context, lookup  # noqa: E402
from chaos.cluster import Cluster, ClusterSpec, Node  # noqa: E402
from chaos.readback import read_back, write_keys  # noqa: E402
from supervisor import data_guard  # noqa: E402
from supervisor.storage import mount_of  # noqa: E402
from testbed.ceph import DATA_ROOT, CephCluster, Mount, ceph_binary  # noqa: E402

RESULTS = REPO / "bench" / "results"
RECORD = 200
"""Bytes per append in the fsync phase."""
MODES = {"evict": "cephfs", "noevict": "cephfs-noevict"}
"""Takeover mode -> ClusterSpec.storage."""
FENCE_LINE = re.compile(r"event=storage-fence client=(\S+) ok=(\w+) took=([0-9.]+)s")
T = TypeVar("T")


def stats_ms(seconds: list[float]) -> dict[str, Any]:
    """n, p50, p99, max, mean in milliseconds (nearest-rank percentiles)."""
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"n": 0}

    def rank(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)

    return {"n": len(ms), "p50_ms": rank(0.5), "p99_ms": rank(0.99),
            "max_ms": round(ms[-1], 3), "mean_ms": round(statistics.fmean(ms), 3)}  # fmt: skip


def bounded(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a daemon thread, or TimeoutError after ``seconds`` (a hung mount blocks the
    thread, not the benchmark, whose clean-up then stops everything)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{what}: not done within {seconds:g}s")
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


# --- 1. fsync ----------------------------------------------------------------------------------


def append_fsync(path: Path, count: int, start: threading.Barrier | None = None) -> list[float]:
    """Seconds of each of ``count`` 200-byte appends + fsync to ``path`` (held open)."""
    record = b"x" * (RECORD - 1) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        if start is not None:
            start.wait(30)
        for _ in range(count):
            began = time.perf_counter()
            os.write(fd, record)
            os.fsync(fd)
            took.append(time.perf_counter() - began)
    finally:
        os.close(fd)
    return took


def at_once(paths: list[Path], count: int) -> list[list[float]]:
    """:func:`append_fsync` on every path at the same time, one thread each."""
    barrier = threading.Barrier(len(paths))
    out: list[list[float]] = [[] for _ in paths]

    def one(i: int) -> None:
        out[i] = append_fsync(paths[i], count, barrier)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def fstype(path: Path) -> str:
    found = mount_of(path)
    return f"{found[1]} ({found[0]})" if found else "?"


def measure_fsync(
    local: Path, mounts: list[Path], samples: int, dual: int, limit: float
) -> dict[str, Any]:
    print(f"== fsync: {samples} x {RECORD}-byte append + fsync", flush=True)
    raw: dict[str, list[float]] = {}
    raw["local"] = bounded(lambda: append_fsync(local / "fsync.log", samples), limit, "local")
    if mounts:
        raw["cephfs"] = bounded(
            lambda: append_fsync(mounts[0] / "fsync.log", samples), limit, "cephfs fsync"
        )
        both = bounded(
            lambda: at_once([m / f"fsync-{i}.log" for i, m in enumerate(mounts)], dual),
            limit,
            "two mounts at once",
        )
        raw["two_mounts_a"], raw["two_mounts_b"] = both
    out: dict[str, Any] = {"record_bytes": RECORD, "where": {"local": fstype(local)}}
    if mounts:
        out["where"]["cephfs"] = fstype(mounts[0])
    for name, took in raw.items():
        out[name] = stats_ms(took)
        print(f"   {name}: {fmt(out[name])}", flush=True)
    if mounts:
        out["two_mounts"] = stats_ms(raw["two_mounts_a"] + raw["two_mounts_b"])
    out["samples_ms"] = {k: [round(s * 1000, 3) for s in v] for k, v in raw.items()}
    return out


def fmt(s: dict[str, Any]) -> str:
    return f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.2f} ms"


# --- 2. the data guard's file steps ------------------------------------------------------------


def time_marker(
    mine: Path, samples: int, until: float, theirs: Path | None = None, cross: int = 0
) -> dict[str, list[float]]:
    """Seconds of ``read_marker`` and ``stamp_marker`` on data dir ``mine``; with ``theirs``
    (the same directory through another client) also both right after that client stamped,
    in the first ``cross`` rounds. No new round after ``until`` (monotonic)."""
    atsign = "@benchguard"
    dir_id = data_guard.new_dir_id()
    token = 0

    def stamp(where: Path, node: str) -> float:
        nonlocal token
        token += 1
        began = time.perf_counter()
        data_guard.stamp_marker(where, token, dir_id, node, atsign)
        return time.perf_counter() - began

    def read() -> float:
        began = time.perf_counter()
        marker = data_guard.read_marker(mine)
        took = time.perf_counter() - began
        assert marker is not None and marker.token == token, marker
        return took

    out: dict[str, list[float]] = {"read_marker": [], "stamp_marker": []}
    if theirs is not None:
        out |= {"read_marker_other_client": [], "stamp_marker_other_client": []}
    stamp(mine, "a1")
    for i in range(samples):
        if time.monotonic() > until:
            break
        out["stamp_marker"].append(stamp(mine, "a1"))
        out["read_marker"].append(read())
        if theirs is None or i >= cross:
            continue
        stamp(theirs, "b1")
        out["read_marker_other_client"].append(read())
        stamp(theirs, "b1")
        out["stamp_marker_other_client"].append(stamp(mine, "a1"))
    return out


def measure_guard(
    local: Path, mounts: list[Path], samples: int, cross: int, limit: float
) -> dict[str, Any]:
    print(f"== data guard: marker read and write, {samples} each", flush=True)
    name = "benchguard"
    out: dict[str, Any] = {
        "method": "supervisor/data_guard.py read_marker and stamp_marker timed directly "
        "(the supervisor does not log them); the fence from the supervisors' log lines "
        "(event=storage-fence took=) in the takeover phase",
    }
    where: dict[str, tuple[Path, Path | None]] = {"local": (local / "guard" / name, None)}
    if mounts:
        sub = mounts[0] / "guard" / name
        where["cephfs"] = (sub, mounts[1] / "guard" / name)
    for label, (mine, theirs) in where.items():

        def timed(m: Path = mine, t: Path | None = theirs) -> dict[str, list[float]]:
            return time_marker(m, samples, time.monotonic() + limit / 2, t, cross)

        took = bounded(timed, limit, f"guard {label}")
        out[label] = {k: stats_ms(v) for k, v in took.items()}
        for k, s in out[label].items():
            print(f"   {label} {k}: {fmt(s)}", flush=True)
    return out


# --- 3. takeover ------------------------------------------------------------------------------


def owner_of(c: Cluster, atsign: str) -> Node | None:
    for n in c.nodes:
        if atsign in ((n.status(timeout=2.0) or {}).get("claims_held") or []):
            return n
    return None


def wait_for(predicate: Callable[[], T | None], seconds: float, what: str) -> T:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {seconds:g}s")


async def wait_served(
    c: Cluster, node: Node, key: tuple[str, str], began: float, deadline: float
) -> tuple[float | None, float | None]:
    """Seconds after ``began`` until the directory named ``node`` and until a PKAM login and
    an ``llookup`` of ``key`` succeeded there (``None``: not before ``deadline``)."""
    keys = c.atsigns[0]
    ctx = client_ssl_context(c.ca.cert_path)
    private = keys.load_private()
    low, high = node.port_range
    named: float | None = None
    while time.monotonic() < deadline:
        try:
            where = await lookup(*c.directory_address, keys.atsign, ctx, 2.0)
        except AtError:
            where = None
        if where is not None and low <= where[1] <= high:
            if named is None:
                named = time.monotonic() - began
            conn = AtConnection(keys.atsign, private, ctx, 2.0)
            try:
                await conn.connect(*where)
                if await conn.llookup(key[0]) == key[1]:
                    return named, time.monotonic() - began
            except AtError:
                pass
            finally:
                await conn.close()
        await asyncio.sleep(0.1)
    return named, None


def fences_since(node: Node, offset: int) -> list[dict[str, Any]]:
    """The ``event=storage-fence`` lines ``node`` logged after byte ``offset`` of its log."""
    with open(node.process.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [
        {"client": m.group(1), "ok": m.group(2) == "True", "took_s": float(m.group(3))}
        for m in FENCE_LINE.finditer(text)
    ]


def write_retrying(c: Cluster, count: int, seconds: float = 60.0) -> list[tuple[str, str]]:
    """``count`` acknowledged writes through the directory (tried again until ``seconds``)."""
    ctx = client_ssl_context(c.ca.cert_path)
    end = time.monotonic() + seconds
    while True:
        try:
            write = write_keys(c.atsigns[0], c.directory_address, ctx, count)
            return asyncio.run(asyncio.wait_for(write, 30))
        except (AtError, TimeoutError):
            if time.monotonic() > end:
                raise
            time.sleep(1.0)


def takeover_rep(
    c: Cluster, rep: int, writes: int, written: list[tuple[str, str]], timeout: float
) -> dict[str, Any]:
    keys = c.atsigns[0]
    ctx = client_ssl_context(c.ca.cert_path)
    victim = wait_for(lambda: owner_of(c, keys.atsign), 60, f"an owner of {keys.atsign}")
    other = next(n for n in c.nodes if n is not victim)
    fresh = write_retrying(c, writes)
    written += fresh
    offset = other.process.log_path.stat().st_size
    began = time.monotonic()
    victim.kill_node()
    kill_s = time.monotonic() - began
    named, served = asyncio.run(wait_served(c, other, written[-1], began, began + timeout))
    back = asyncio.run(
        asyncio.wait_for(read_back(keys, c.directory_address, ctx, written), 60 + len(written))
    )
    fences = fences_since(other, offset)
    restarted = time.monotonic()
    victim.start()
    wait_for(lambda: (victim.status(timeout=1.0) or {}).get("ready"), 120, f"{victim.name} ready")
    row = {
        "rep": rep,
        "victim": victim.name,
        "new_owner": other.name,
        "kill_s": round(kill_s, 3),
        "directory_s": None if named is None else round(named, 2),
        "served_s": None if served is None else round(served, 2),
        "fences": fences,
        "written_this_rep": len(fresh),
        "written_total": len(written),
        "read_back": back.found,
        "missing": back.missing[:10],
        "read_back_error": back.error,
        "restart_ready_s": round(time.monotonic() - restarted, 1),
    }
    fence = ", fence " + ", ".join(f"{f['took_s']:.2f}s" for f in fences) if fences else ""
    print(
        f"   rep {rep}: killed {victim.name}; served by {other.name} after {row['served_s']}s "
        f"(directory {row['directory_s']}s){fence}; read back {back.found}/{len(written)}; "
        f"{victim.name} ready again after {row['restart_ready_s']}s",
        flush=True,
    )
    return row


def measure_takeover(
    entry: dict[str, Any], base: Path, ceph: CephCluster, args: argparse.Namespace,
    clusters: list[Cluster],
) -> None:  # fmt: skip
    """Fill ``entry`` (backend, mode) rep by rep: what was done stays there on an error."""
    spec = ClusterSpec(
        base_dir=base / f"{entry['backend']}-{entry['mode']}",
        backend=entry["backend"],
        nodes=2,
        atsigns=1,
        storage=entry["cluster_storage"],
        ceph=ceph,
        prefix=f"sb{entry['mode']}",
        start_timeout=120,
    )
    c = Cluster(spec)
    clusters.append(c)
    entry["ttl"] = c.ttl
    print(f"== takeover, {spec.backend}, {entry['mode']} (storage {spec.storage}, ttl {c.ttl:g})")
    c.start()
    entry["supervisor_storage_kind"] = yaml.safe_load(c.nodes[0].config_path.read_text())[
        "storage"
    ]["kind"]
    entry["all_serving_after_start_s"] = round(c.wait_all_serving(90), 1)
    written: list[tuple[str, str]] = []
    for rep in range(args.reps):
        entry["reps"].append(takeover_rep(c, rep, args.writes, written, args.takeover_timeout))
    c.stop()
    clusters.remove(c)
    entry["leftovers"] = c.leftovers()


def summarize_takeover(entry: dict[str, Any]) -> None:
    reps = entry["reps"]
    served = [r["served_s"] for r in reps if r["served_s"] is not None]
    entry["served_s"] = {
        "n": len(served),
        "not_served": len(reps) - len(served),
        "min": min(served, default=None),
        "median": round(statistics.median(served), 2) if served else None,
        "max": max(served, default=None),
    }
    entry["fence_ms"] = stats_ms([f["took_s"] for r in reps for f in r["fences"] if f["ok"]])
    entry["every_acknowledged_write_read_back"] = bool(reps) and all(
        r["read_back"] == r["written_total"] and not r["read_back_error"] for r in reps
    )


# --- the run ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        ceph = subprocess.run(
            [ceph_binary("ceph-fuse"), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        ceph = "?"
    return {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ceph": ceph,
    }


def load() -> list[float]:
    return [round(x, 2) for x in psutil.getloadavg()]


class RunDeadline(Exception):
    """``--max-minutes`` passed."""


def run(args: argparse.Namespace, base: Path, result: dict[str, Any], save: Callable[[], None]
        ) -> None:  # fmt: skip
    local = base / "local"
    local.mkdir()
    ceph: CephCluster | None = None
    bench_mounts: list[Mount] = []
    clusters: list[Cluster] = []
    try:
        mounts: list[Path] = []
        if not args.no_ceph:
            ceph = CephCluster(base / "ceph")
            print("== starting Ceph", flush=True)
            result["ceph"] = {"bringup_s": round(ceph.start(args.phase_minutes * 60), 1)}
            print(f"   up after {result['ceph']['bringup_s']}s", flush=True)
            root = f"{DATA_ROOT}/bench-{os.getpid()}"
            ceph.admin_fs().mkdirs(root.encode(), 0o755)
            for name in ("bench-a", "bench-b"):
                bench_mounts.append(ceph.mount(name, base / "mnt" / name, root=root))
            mounts = [m.path for m in bench_mounts]
        limit = args.phase_minutes * 60
        result["fsync"] = measure_fsync(local, mounts, args.fsync_samples, args.dual_samples, limit)
        save()
        result["guard"] = measure_guard(
            local, mounts, args.guard_samples, args.cross_samples, limit
        )
        save()
        for m in bench_mounts:
            m.unmount()
        if ceph is None or args.reps == 0:
            return
        for backend in args.backends:
            for mode in args.modes:
                entry: dict[str, Any] = {"backend": backend, "mode": mode,
                                         "cluster_storage": MODES[mode], "reps": []}  # fmt: skip
                result["takeover"].append(entry)
                try:
                    measure_takeover(entry, base, ceph, args, clusters)
                except Exception as exc:  # the other modes still run
                    entry["error"] = repr(exc)
                    print(f"   {backend} {mode} failed: {exc!r}", flush=True)
                    stop_clusters(clusters, result)
                summarize_takeover(entry)
                save()
    finally:
        # Nothing interrupts the clean-up: no run deadline, no second SIGTERM.
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_clusters(clusters, result)
        if ceph is not None:
            ceph.stop()
            result["leftovers"] += [d.name for d in ceph.daemons if d.running()]
            result["leftovers"] += [m.entity for m in ceph.mounts if m.mounted()]
            if not any(d.running() for d in ceph.daemons):  # the OSDs' block files (GiBs)
                shutil.rmtree(ceph.base_dir / "osd", ignore_errors=True)


def stop_clusters(clusters: list[Cluster], result: dict[str, Any]) -> None:
    while clusters:
        c = clusters.pop()
        with contextlib.suppress(Exception):
            c.stop()
        result["leftovers"] += c.leftovers()


def guard_summary(result: dict[str, Any]) -> None:
    """The guard's cost per takeover start on CephFS: fence (from the logs) + marker read +
    marker write, p50s added up."""
    guard = result.get("guard", {})
    ceph = guard.get("cephfs")
    fences = [
        f["took_s"] for t in result.get("takeover", []) for r in t["reps"]
        for f in r["fences"] if f["ok"]
    ]  # fmt: skip
    if not ceph:
        return
    guard["fence_from_logs"] = stats_ms(fences)
    parts = [ceph["read_marker"]["p50_ms"], ceph["stamp_marker"]["p50_ms"]]
    if fences:
        parts.append(guard["fence_from_logs"]["p50_ms"])
    guard["per_takeover_p50_ms"] = round(sum(parts), 2)
    guard["per_takeover_note"] = (
        "p50 of fence (log) + read_marker + stamp_marker on CephFS; a planned handoff has no "
        "fence; the DCS reads of the generation record and the node list are not included"
    )


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for name, samples in result["fsync"]["samples_ms"].items():
        ordered = sorted(samples)
        ax.plot(ordered, [100 * (i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="ms", ylabel="% of appends done within", title=f"{RECORD}-byte append + fsync")
    ax.legend()
    ax = axes[1]
    labels = []
    for i, t in enumerate(result.get("takeover", [])):
        served = [r["served_s"] for r in t["reps"] if r["served_s"] is not None]
        ax.plot([i] * len(served), served, "o", alpha=0.7)
        if served:
            ax.hlines(statistics.median(served), i - 0.3, i + 0.3, color="black")
        labels.append(f"{t['backend']}\n{t['mode']}\n(ttl {t.get('ttl', '?')})")
        if "ttl" in t:
            goal = "ttl + 2 s (the goal)" if i == 0 else None
            ax.hlines(t["ttl"] + 2, i - 0.4, i + 0.4, color="red", ls="--", lw=1, label=goal)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="s from the kill until served elsewhere", title="takeover after a node kill")
    ax.set_ylim(bottom=0)
    if labels:
        ax.legend()
    ax = axes[2]
    guard = result.get("guard", {})
    rows = []
    for where in ("local", "cephfs"):
        for k, s in guard.get(where, {}).items():
            rows.append((f"{k} ({where})", s))
    if guard.get("fence_from_logs", {}).get("n"):
        rows.append(("fence (supervisor log)", guard["fence_from_logs"]))
    y = range(len(rows))
    ax.barh(y, [s["p50_ms"] for _, s in rows], color="tab:blue", label="p50")
    ax.plot([s["p99_ms"] for _, s in rows], y, "k|", ms=12, label="p99")
    ax.set_yticks(y, [r for r, _ in rows])
    ax.set_xscale("log")
    ax.set(xlabel="ms", title="data guard steps")
    ax.legend()
    m = result["machine"]
    fig.suptitle(
        f"CephFS (ceph-fuse, 3 OSDs, size 3) vs local disk - {m['node']}, {m['cpus']} cores, "
        f"load {m.get('load_average_end', '?')}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fsync-samples", type=int, default=500, help="per target (mount, local)")
    ap.add_argument("--dual-samples", type=int, default=300, help="per mount, two at once")
    ap.add_argument("--guard-samples", type=int, default=100, help="per step and target")
    ap.add_argument("--cross-samples", type=int, default=20,
                    help="of those, rounds after another client wrote the marker")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5, help="takeovers per backend and mode (0: none)")
    ap.add_argument("--writes", type=int, default=5, help="keys written before each kill")
    ap.add_argument("--backends", nargs="+", choices=["etcd", "consul"], default=["etcd"])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--takeover-timeout", type=float, default=150.0,
                    help="seconds after a kill before a repetition is 'not served'")  # fmt: skip
    ap.add_argument("--phase-minutes", type=float, default=5.0,
                    help="deadline of Ceph's start and of each fsync/guard phase")  # fmt: skip
    ap.add_argument("--max-minutes", type=float, default=25.0, help="deadline of the run")
    ap.add_argument("--no-ceph", action="store_true",
                    help="local disk only: checks the script (no Ceph, no takeover)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "storage.json", args.out / "storage.png"
    if args.replot:
        plot(json.loads(json_path.read_text()), png_path)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def overdue(*_: Any) -> None:
        raise RunDeadline(f"the run took longer than --max-minutes {args.max_minutes:g}")

    signal.signal(signal.SIGALRM, overdue)
    signal.alarm(int(args.max_minutes * 60))
    started = time.time()
    result: dict[str, Any] = {
        "params": vars(args) | {"out": str(args.out)},
        "machine": machine() | {"load_average_start": load()},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "takeover": [],
        "leftovers": [],
    }

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    ok = False
    base = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        run(args, base, result, save)
        ok = True
    finally:
        signal.alarm(0)
        result["machine"]["load_average_end"] = load()
        result["wall_s"] = round(time.time() - started, 1)
        result["partial"] = not ok
        guard_summary(result)
        save()
        if "fsync" in result:
            plot(result, png_path)
        print(f"wrote {json_path}" + (f" and {png_path}" if "fsync" in result else ""))
        if result["leftovers"]:
            print(f"still running after the clean-up: {result['leftovers']}", file=sys.stderr)
        print(f"logs and configs stay in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
