"""Benchmark ``inventory.source: dcs`` with 10,000 and 100,000 atSign records.

For each size N, on a real 3-member etcd and a real Consul (stopped by PID at the end, also
on errors and SIGTERM; the servers and helpers are ``bench/node_scale_bench.py``'s):

1. N atSign records are written (``write_atsign_records``: 64 per transaction);
2. light simulated nodes claim N - 100 of them (leases and claim keys in bulk, no
   workloads), as if the rest of a big cluster held them;
3. node a1 (``supervisor run``, stand-in atServers, ttl 6) starts with ``source: dcs``: the
   time until ``/readyz`` (records and members listed, a cycle ran) and until it serves the
   100 vacant atSigns; its RSS then;
4. ``--adds`` times: one record added (``supervisor atsigns add``, the CLI a registrar would
   run) and the time until its instance passes in Consul; then the same record removed and
   the time until it is gone from Consul.

Writes ``bench/results/inventory.json`` and ``bench/results/inventory.png``.
Run: ``.venv/bin/python bench/inventory_bench.py`` (about 10 minutes on 2 cores);
``--sizes 10000 --adds 5`` for a short run; ``--replot``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_scale_bench import (
    REPO,
    RESULTS,
    Bench,
    bulk_claims,
    passing,
    pct,
    prepare,
    ready,
    wait,
)

from leases.etcd import EtcdBackend
from leases.records import make_record

OWN = 100
"""Vacant records the node under test serves (the others are claimed elsewhere)."""


async def write_records(b: Bench, prefix: str, atsigns: list[str]) -> float:
    backend = EtcdBackend(b.etcd.endpoints, prefix, request_timeout=30)
    try:
        t = time.monotonic()
        await backend.write_atsign_records([make_record(a, {}) for a in atsigns])
        return time.monotonic() - t
    finally:
        await backend.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def run_size(b: Bench, n: int, adds: int) -> dict[str, Any]:
    tag = f"r{n}-{int(time.time())}"
    service = f"atserver-{tag}"
    atsigns = [f"@inv{tag.replace('-', '')}x{i:06d}" for i in range(n)]
    print(f"== {n} records, {n - OWN} claimed elsewhere, a1 serves {OWN}", flush=True)
    loop = asyncio.new_event_loop()
    try:
        written = loop.run_until_complete(write_records(b, tag, atsigns))
        print(f"   {n} records written in {written:.1f}s", flush=True)
        t = time.monotonic()
        loop.run_until_complete(bulk_claims(b, tag, atsigns[OWN:], 10))
        print(f"   {n - OWN} claims elsewhere written in {time.monotonic() - t:.1f}s", flush=True)
        cfg_path = b.node_config("a1", "A", tag, service, [], 20000, False, OWN)
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["inventory"] = {"source": "dcs"}
        cfg_path.write_text(yaml.safe_dump(cfg))
        api = f"http://{cfg['http']['listen']}"
        a1, _ = b.start_node("a1", cfg_path)
        started = time.monotonic()
        ready_s = wait(lambda: ready(api), 600, "a1 ready", 0.2)
        wait(lambda: passing(b.consul, service) == OWN, 600, f"{OWN} passing", 0.5)
        serving_s = time.monotonic() - started
        rss = psutil.Process(a1.pid).memory_info().rss
        print(
            f"   a1 ready {ready_s:.1f}s after start, its {OWN} passing after {serving_s:.1f}s, "
            f"RSS {rss / 2**20:.0f} MiB",
            flush=True,
        )
        added: list[float] = []
        removed: list[float] = []
        for k in range(adds):
            name = f"@new{tag.replace('-', '')}x{k:03d}"
            t = time.monotonic()
            r = cli("atsigns", "add", name, "--config", str(cfg_path))
            if r.returncode != 0:
                raise RuntimeError(f"atsigns add: {r.stderr}")
            wait(lambda: passing(b.consul, service) == OWN + 1, 60, "new", 0.05)
            added.append(time.monotonic() - t)
            t = time.monotonic()
            cli("atsigns", "remove", name, "--config", str(cfg_path))
            wait(lambda: passing(b.consul, service) == OWN, 60, "gone", 0.05)
            removed.append(time.monotonic() - t)
        print(
            f"   add -> passing p50 {pct(added, 0.5):.2f}s max {max(added):.2f}s; "
            f"remove -> gone p50 {pct(removed, 0.5):.2f}s (CLI start included)",
            flush=True,
        )
        rss_end = psutil.Process(a1.pid).memory_info().rss
        a1.stop(timeout=120)
        for s in b.sim_sessions:  # type: ignore[attr-defined]
            loop.run_until_complete(s.close())
        loop.run_until_complete(b.sim_backend.close())  # type: ignore[attr-defined]
    finally:
        loop.close()
    return {
        "records": n,
        "claimed_elsewhere": n - OWN,
        "records_write_s": round(written, 1),
        "ready_s": round(ready_s, 2),
        "own_passing_s": round(serving_s, 2),
        "rss_mib": round(rss / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "add_to_passing_s": [round(x, 3) for x in added],
        "add_to_passing_p50_s": round(pct(added, 0.5), 3),
        "add_to_passing_max_s": round(max(added), 3),
        "remove_to_gone_p50_s": round(pct(removed, 0.5), 3),
        "remove_to_gone_max_s": round(max(removed), 3),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    n = [r["records"] for r in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].plot(n, [r["ready_s"] for r in sizes], "o-", label="ready")
    axes[0].plot(n, [r["own_passing_s"] for r in sizes], "s-", label=f"its {OWN} passing")
    axes[0].set(xlabel="atSign records", ylabel="seconds after start", title="node start")
    axes[0].legend()
    axes[1].plot(n, [r["rss_mib"] for r in sizes], "o-")
    axes[1].set(xlabel="atSign records", ylabel="MiB", title="supervisor RSS")
    axes[2].plot(n, [r["add_to_passing_p50_s"] for r in sizes], "o-", label="add p50")
    axes[2].plot(n, [r["add_to_passing_max_s"] for r in sizes], "^--", label="add max")
    axes[2].plot(n, [r["remove_to_gone_p50_s"] for r in sizes], "s-", label="remove p50")
    axes[2].set(xlabel="atSign records", ylabel="seconds (CLI included)", title="a change")
    axes[2].legend()
    for ax in axes:
        ax.set_xscale("log")
    fig.suptitle(f"inventory.source dcs, etcd, 2 cores - {result['machine']['node']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--adds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args()
    paths = prepare(args.out, "inventory", plot, args.replot)
    if isinstance(paths, int):
        return paths
    json_path, png_path = paths
    b = Bench(Path(tempfile.mkdtemp(prefix="inventory-bench-")))
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "params": vars(args) | {"out": str(args.out)},
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "sizes": [],
    }
    try:
        b.start()
        for n in args.sizes:
            result["sizes"].append(run_size(b, n, args.adds))
            json_path.write_text(json.dumps(result, indent=1))
    finally:
        b.close()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
