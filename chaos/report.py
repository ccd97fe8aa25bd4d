"""The run report: JSON (everything the checker saw and said) and a PNG timeline."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chaos.checker import FaultRecord, Instance, Verdict


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def plot_timeline(
    path: Path,
    instances: Sequence[Instance],
    faults: Sequence[FaultRecord],
    verdict: Verdict,
    t0: float,
    t_end: float,
    title: str,
) -> None:
    """One row per atSign: a bar per atServer instance coloured by node, labelled with its
    token; faults as vertical lines (shaded while held); violations in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atsigns = sorted({i.atsign for i in instances})
    nodes = sorted({i.node for i in instances})
    cmap = plt.get_cmap("tab10")
    colour = {n: cmap(k % 10) for k, n in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(max(10, (t_end - t0) / 20), 1 + 0.5 * len(atsigns)))
    for row, atsign in enumerate(atsigns):
        for i in (x for x in instances if x.atsign == atsign):
            end = i.end if i.end is not None else t_end
            ax.barh(row, end - i.start, left=i.start - t0, height=0.6, color=colour[i.node],
                    edgecolor="black", linewidth=0.3)  # fmt: skip
            if end - i.start > (t_end - t0) / 80:
                ax.text(i.start - t0 + 0.2, row, str(i.token), va="center", fontsize=6)
    for f in faults:
        ax.axvline(f.start - t0, color="grey", linestyle="--", linewidth=0.6)
        if f.healed > f.start:
            ax.axvspan(f.start - t0, f.healed - t0, color="grey", alpha=0.12)
        ax.text(f.start - t0, len(atsigns) - 0.4, f.kind, rotation=90, fontsize=6,
                va="bottom", color="dimgrey")  # fmt: skip
    bad = {v.atsign for v in verdict.violations}
    ax.set_yticks(range(len(atsigns)))
    ax.set_yticklabels(atsigns)
    for label in ax.get_yticklabels():
        if label.get_text() in bad:
            label.set_color("red")
    ax.set_xlabel("seconds since start")
    ax.set_xlim(0, t_end - t0)
    ax.set_ylim(-0.6, len(atsigns) + 1.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in nodes]
    ax.legend(handles, nodes, loc="upper right", fontsize=7, ncol=len(nodes))
    verdict_text = "OK" if verdict.ok else f"{len(verdict.violations)} VIOLATIONS"
    ax.set_title(f"{title} — {verdict_text}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def instances_json(instances: Sequence[Instance]) -> list[dict[str, Any]]:
    return [asdict(i) for i in instances]
