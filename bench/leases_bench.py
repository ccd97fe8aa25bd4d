"""Benchmark the lease backends: claim latency, handoff latency, failover after SIGKILL.

Starts a real etcd (1 member) and a real Consul dev agent (both stopped by PID at the
end, also on errors), then for each backend:

1. claim latency and claims/s: one node session claims ``--claims`` distinct atSigns
   one after another;
2. renewal cost with 1, 100, ``--claims`` claims held: renewals/s and this process's
   CPU % over ``--hold`` seconds (one lease / session per node, so it should not grow);
3. handoff latency over ``--handoffs`` runs: the holder releases, the standby sees the
   DELETE in its ``watch()`` and claims; measured from the release call to the claim;
4. failover after SIGKILL over ``--kills`` runs: a holder process claims and is
   killed; measured from the kill to the watch's DELETE and to the standby holding
   the claim (etcd ttl 2 s; Consul ttl 10 s with ``--consul-lock-delay``, default 0:
   add the configured lock-delay for production numbers).

Writes ``bench/results/leases.json`` and ``bench/results/leases.png``.
Run: ``.venv/bin/python bench/leases_bench.py`` (about 2 minutes on 2 cores);
``--replot`` redraws the PNG from the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from leases import Backend, ClaimEvent, ClaimEventKind, ClaimInfo, Session, Timing, open_backend  # noqa: E402
from testbed.consul import ConsulAgent  # noqa: E402
from testbed.etcd import EtcdCluster  # noqa: E402
from testbed.process import ManagedProcess  # noqa: E402

RESULTS = REPO / "bench" / "results"
TTL = {"etcd": 2.0, "consul": 10.0}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p99, max, mean."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 0.5), 2),
        "p99_ms": round(pct(ms, 0.99), 2),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }


def make(kind: str, where: list[str], prefix: str, lock_delay: float) -> Backend:
    if kind == "etcd":
        return open_backend("etcd", endpoints=where, prefix=prefix)
    return open_backend("consul", url=where[0], prefix=prefix, lock_delay=lock_delay)


async def bench_claims(kind: str, where: list[str], n: int, hold: float) -> dict[str, Any]:
    backend = make(kind, where, f"bench/claims-{time.time_ns()}", 0)
    timing = Timing.for_ttl(TTL[kind])
    session = await backend.open_session("bench", timing)
    latencies: list[float] = []
    renewal: list[dict[str, float]] = []
    proc = psutil.Process()
    held = 0
    for target in sorted({1, min(100, n), min(1000, n), n}):
        while held < target:
            t0 = time.perf_counter()
            claim = await session.claim(f"@bench{held}", ClaimInfo(node="bench"))
            latencies.append(time.perf_counter() - t0)
            assert claim is not None
            held += 1
        before = session.renewals  # type: ignore[attr-defined]
        cpu0 = proc.cpu_times()
        t0 = time.perf_counter()
        await asyncio.sleep(hold)
        elapsed = time.perf_counter() - t0
        cpu1 = proc.cpu_times()
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed * 100
        renewal.append(
            {
                "claims_held": held,
                "renewals_per_s": round((session.renewals - before) / elapsed, 2),  # type: ignore[attr-defined]
                "client_cpu_percent": round(max(0.0, cpu), 2),
            }
        )
    await session.close()
    await backend.close()
    return {
        "claims": n,
        "claim_latency": summary(latencies),
        "claims_per_s": round(n / sum(latencies), 1),
        "renewal": renewal,
        "claim_latencies_ms": [round(v * 1000, 3) for v in latencies],
    }


class WatchPump:
    """Consumes a backend's ``watch()`` all the time, as a supervisor does, into a queue.

    (Consul's watch is level-triggered: a watch that is not read while a key is
    created and deleted again reports nothing, so it must be read continuously.)
    """

    def __init__(self, backend: Backend) -> None:
        self.queue: asyncio.Queue[tuple[float, ClaimEvent]] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(backend))

    async def _run(self, backend: Backend) -> None:
        async for event in backend.watch():
            self.queue.put_nowait((time.perf_counter(), event))

    async def _get(self) -> tuple[float, ClaimEvent]:
        getter = asyncio.ensure_future(self.queue.get())
        await asyncio.wait([getter, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            raise RuntimeError(f"watch ended: {self._task.exception()!r}")
        return getter.result()

    async def first_resync(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while (await self._get())[1].kind is not ClaimEventKind.RESYNC:
                pass

    async def next_delete(self, atsign: str, timeout: float, after: int = 0) -> float:
        """When the watch reported ``atsign`` gone at a revision/index above ``after``."""
        async with asyncio.timeout(timeout):
            while True:
                at, event = await self._get()
                if event.revision <= after:
                    continue  # an older change
                if event.kind is ClaimEventKind.DELETE and event.atsign == atsign:
                    return at
                if event.kind is ClaimEventKind.RESYNC and atsign not in (event.snapshot or {}):
                    return at

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _claim_retrying(session: Session, atsign: str, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if await session.claim(atsign, ClaimInfo(node=session.node)) is not None:
            return time.perf_counter()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"could not claim {atsign} within {timeout}s")


async def bench_handoffs(kind: str, where: list[str], runs: int) -> dict[str, Any]:
    prefix = f"bench/handoff-{time.time_ns()}"
    timing = Timing.for_ttl(TTL[kind])
    a_backend, b_backend = make(kind, where, prefix, 0), make(kind, where, prefix, 0)
    a = await a_backend.open_session("a", timing)
    b = await b_backend.open_session("b", timing)
    holder, standby = a, b
    atsign = "@handoff"
    claim = await holder.claim(atsign, ClaimInfo(node="a"))
    assert claim is not None
    # The standby learns of the release from its own watch, as a supervisor would.
    watches = {a.node: WatchPump(a_backend), b.node: WatchPump(b_backend)}
    for pump in watches.values():
        await pump.first_resync()
    seen: list[float] = []
    total: list[float] = []
    tokens = [claim.token]
    for _ in range(runs):
        pump = watches[standby.node]
        t0 = time.perf_counter()
        assert await holder.release(claim)
        t_seen = await pump.next_delete(atsign, 10, after=claim.token)
        t_claimed = await _claim_retrying(standby, atsign, 10)
        seen.append(t_seen - t0)
        total.append(t_claimed - t0)
        new = await b_backend.owner(atsign)
        assert new is not None and new.session_id == standby.session_id
        assert new.token > tokens[-1]
        tokens.append(new.token)
        claim = new
        holder, standby = standby, holder
    for pump in watches.values():
        await pump.stop()
    await a.close()
    await b.close()
    await a_backend.close()
    await b_backend.close()
    return {
        "runs": runs,
        "release_to_watch_delete": summary(seen),
        "release_to_standby_holds": summary(total),
        "handoff_ms": [round(v * 1000, 3) for v in total],
        "tokens_strictly_increasing": all(x < y for x, y in itertools.pairwise(tokens)),
    }


async def bench_failover(
    kind: str, where: list[str], runs: int, lock_delay: float, workdir: Path
) -> dict[str, Any]:
    prefix = f"bench/failover-{time.time_ns()}"
    timing = Timing.for_ttl(TTL[kind])
    backend = make(kind, where, prefix, lock_delay)
    standby = await backend.open_session("standby", timing)
    pump = WatchPump(backend)
    await pump.first_resync()
    gone: list[float] = []
    held: list[float] = []
    for run in range(runs):
        atsign = f"@victim{run}"
        argv = [sys.executable, __file__, "--hold", kind, atsign, prefix, str(lock_delay), *where]
        proc = ManagedProcess(f"holder{run}", argv, workdir / f"holder-{kind}-{run}.log")
        proc.start()
        try:
            deadline = time.monotonic() + 30
            while await backend.owner(atsign) is None:
                if not proc.running() or time.monotonic() > deadline:
                    raise RuntimeError(f"holder did not claim: {proc.log_tail()}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # let it settle into its renew rhythm
            t0 = time.perf_counter()
            proc.kill()
            t_gone = await pump.next_delete(atsign, 3 * timing.ttl + 5)
            t_held = await _claim_retrying(standby, atsign, lock_delay + 5)
        finally:
            proc.stop()
        gone.append(t_gone - t0)
        held.append(t_held - t0)
        print(f"  {kind} failover {run}: gone {gone[-1]:.2f}s, standby holds {held[-1]:.2f}s")
    await pump.stop()
    await standby.close()
    await backend.close()
    return {
        "runs": runs,
        "ttl_s": timing.ttl,
        "lock_delay_s": lock_delay if kind == "consul" else None,
        "kill_to_claim_gone_s": [round(v, 3) for v in gone],
        "kill_to_standby_holds_s": [round(v, 3) for v in held],
        "bound_s": backend.failover_bound(timing),
    }


async def hold(kind: str, atsign: str, prefix: str, lock_delay: float, where: list[str]) -> None:
    """The holder process: claim ``atsign`` and keep renewing until killed."""
    backend = make(kind, where, prefix, lock_delay)
    session = await backend.open_session("holder", Timing.for_ttl(TTL[kind]))
    assert await session.claim(atsign, ClaimInfo(node="holder")) is not None
    await session.lost.wait()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("etcd", "consul") if k in result["backends"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind in kinds:
        r = result["backends"][kind]
        lat = sorted(r["claims"]["claim_latencies_ms"])
        axes[0].plot(lat, [i / len(lat) for i in range(len(lat))], label=kind)
        ho = sorted(r["handoff"]["handoff_ms"])
        axes[1].plot(ho, [i / len(ho) for i in range(len(ho))], label=kind)
    axes[0].set(xscale="log", xlabel="claim latency (ms)", ylabel="fraction", title="claim")
    axes[1].set(
        xscale="log", xlabel="release -> standby holds (ms)", ylabel="fraction", title="handoff"
    )
    labels, gone, held = [], [], []
    for kind in kinds:
        f = result["backends"][kind]["failover"]
        if not f["runs"]:
            continue
        suffix = f" (lock_delay {f['lock_delay_s']:g}s)" if kind == "consul" else ""
        labels.append(f"{kind} ttl {f['ttl_s']:g}s{suffix}")
        gone.append(statistics.fmean(f["kill_to_claim_gone_s"]))
        held.append(statistics.fmean(f["kill_to_standby_holds_s"]))
    x = range(len(labels))
    axes[2].bar([i - 0.2 for i in x], gone, width=0.4, label="claim gone")
    axes[2].bar([i + 0.2 for i in x], held, width=0.4, label="standby holds")
    axes[2].set_xticks(list(x), labels, fontsize=8)
    axes[2].set(ylabel="seconds after SIGKILL (mean)", title="failover")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="leases-bench-"))
    etcd = EtcdCluster(workdir / "etcd", size=1, name="etcd")
    agent = ConsulAgent(workdir / "consul")
    result: dict[str, Any] = {
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
        "backends": {},
    }
    try:
        etcd.start()
        agent.start()
        for kind, where in (("etcd", etcd.endpoints), ("consul", [agent.url])):
            if kind not in args.backends:
                continue
            print(f"{kind}: claims", flush=True)
            claims = await bench_claims(kind, where, args.claims, args.hold)
            print(f"  {claims['claim_latency']}, {claims['claims_per_s']}/s, {claims['renewal']}")
            print(f"{kind}: handoffs")
            handoff = await bench_handoffs(kind, where, args.handoffs)
            print(f"  {handoff['release_to_standby_holds']}")
            print(f"{kind}: failover")
            runs = args.kills if kind == "etcd" else args.consul_kills
            failover = await bench_failover(kind, where, runs, args.consul_lock_delay, workdir)
            result["backends"][kind] = {"claims": claims, "handoff": handoff, "failover": failover}
    finally:
        agent.stop()
        etcd.stop()
    return result


def main() -> None:
    # SIGTERM (e.g. from `timeout`) must still run the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        kind, atsign, prefix, lock_delay, *where = sys.argv[2:]
        asyncio.run(hold(kind, atsign, prefix, float(lock_delay), where))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=4.0, help="seconds per renewal sample")
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=8, help="etcd SIGKILL runs")
    parser.add_argument("--consul-kills", type=int, default=2, help="Consul runs (~20 s each)")
    parser.add_argument("--consul-lock-delay", type=float, default=0.0)
    parser.add_argument("--backends", nargs="+", default=["etcd", "consul"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "leases.json", args.out / "leases.png"
    if args.replot:
        plot(json.loads(json_path.read_text()), png_path)
        return
    result = asyncio.run(run(args))
    result["args"]["out"] = str(args.out)
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
