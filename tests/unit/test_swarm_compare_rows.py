"""bench/swarm_compare.py's per-fault rows from fake histories (no engines, no network)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from chaos.workload import OpRecord
from testbed.copies import Sample

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("swarm_compare", ROOT / "bench/swarm_compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["swarm_compare"] = mod
    spec.loader.exec_module(mod)
    return mod


def _samples(node: str, start: float, end: float) -> list[Sample]:
    out, t = [], start
    while t <= end + 1e-9:
        out.append(Sample(round(t, 3), node, 31000, "@a", 1))
        t += 0.2
    return out


def _write(start: float, server: str, ok: bool = True) -> OpRecord:
    return OpRecord("@a", "write", f"k{start}", "v", start, start + 0.01, ok, server)


def test_partition_with_a_double_owner() -> None:
    sc = _bench()
    phase = sc.Phase("swarm-default")
    # n1 answers throughout (partitioned at 10, healed at 40, stopped at 50); n2 from 26
    phase.samples = _samples("n1", 0, 50) + _samples("n2", 26, 80)
    phase.ops = [_write(9.0, "n1"), _write(12.0, "n1"), _write(27.0, "n2"), _write(30.0, "n1")]
    phase.faults = [sc.Fault("swarm-default", "partition", "n1", 10.0, 40.0, ["@a"])]
    phase.faults[0].next_start = 90.0
    phase.lost = [{"atsign": "@a", "key": "k30.0", "start": 30.0}]
    (row,) = sc.fault_rows(phase)
    assert row["served_s"] == 17.01  # the first write acknowledged by another node
    assert row["no_answer_s"] == 0.0  # the partitioned copy kept answering
    assert row["double_owner_s"] == 24.0  # 26 .. 50
    assert row["back_to_one_after_heal_s"] == 10.0
    assert (row["acked"], row["lost"]) == (3, 1)


def test_crash_served_again_on_the_same_node() -> None:
    sc = _bench()
    phase = sc.Phase("ours")
    phase.samples = _samples("n1", 0, 10) + _samples("n1", 12, 20)
    phase.ops = [_write(10.5, "n1", ok=False), _write(12.2, "n1")]
    phase.faults = [sc.Fault("ours", "crash", "n1", 10.1, 10.1, ["@a"])]
    phase.faults[0].next_start = 30.0
    (row,) = sc.fault_rows(phase)
    assert row["served_s"] == 2.11
    assert 1.9 <= row["no_answer_s"] <= 2.11
    assert row["double_owner_s"] == 0
    agg = sc.aggregate([row], phase.faults)
    assert agg["crash"]["served_s"]["p50"] == 2.11
