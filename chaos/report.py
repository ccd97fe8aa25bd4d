"""The run report: JSON (everything the checker saw and said) and a PNG timeline."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chaos.checker import FaultRecord, Instance, Verdict


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


PANEL_SECONDS = 300.0
"""A long run is drawn as stacked panels of at most this many seconds each (a 200-fault run
drawn as one strip was 17,863 pixels wide and could not be read)."""


def plot_timeline(
    path: Path,
    instances: Sequence[Instance],
    faults: Sequence[FaultRecord],
    verdict: Verdict,
    t0: float,
    t_end: float,
    title: str,
    panel_seconds: float = PANEL_SECONDS,
) -> None:
    """One row per atSign: a bar per atServer instance coloured by node, labelled with its
    token; faults as vertical lines (shaded while held); violations in red. Runs longer than
    ``panel_seconds`` continue in further panels below, on one shared time scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atsigns = sorted({i.atsign for i in instances})
    nodes = sorted({i.node for i in instances})
    cmap = plt.get_cmap("tab10")
    colour = {n: cmap(k % 10) for k, n in enumerate(nodes)}
    duration = max(t_end - t0, 1e-3)
    panels = max(1, math.ceil(duration / panel_seconds))
    span = duration if panels == 1 else panel_seconds
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(max(10.0, span / 20), panels * (1 + 0.5 * len(atsigns))),
        squeeze=False,
    )
    bad = {v.atsign for v in verdict.violations}
    for k, ax in enumerate(axes[:, 0]):
        lo = k * span
        _draw_panel(ax, instances, faults, atsigns, colour, bad, t0, t_end, span)
        ax.set_xlim(lo, lo + span)
    first, last = axes[0, 0], axes[-1, 0]
    last.set_xlabel("seconds since start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in nodes]
    first.legend(handles, nodes, loc="upper right", fontsize=7, ncol=len(nodes))
    verdict_text = "OK" if verdict.ok else f"{len(verdict.violations)} VIOLATIONS"
    first.set_title(f"{title} — {verdict_text}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_panel(
    ax: Any,
    instances: Sequence[Instance],
    faults: Sequence[FaultRecord],
    atsigns: list[str],
    colour: dict[str, Any],
    bad: set[str],
    t0: float,
    t_end: float,
    span: float,
) -> None:
    """Everything on one panel; the caller's x limits pick the part shown. Text is clipped to
    the panel (matplotlib draws text outside the axes otherwise)."""
    for row, atsign in enumerate(atsigns):
        for i in (x for x in instances if x.atsign == atsign):
            end = i.end if i.end is not None else t_end
            ax.barh(row, end - i.start, left=i.start - t0, height=0.6, color=colour[i.node],
                    edgecolor="black", linewidth=0.3)  # fmt: skip
            if end - i.start > span / 80:
                ax.text(i.start - t0 + 0.2, row, str(i.token), va="center", fontsize=6,
                        clip_on=True)  # fmt: skip
    for f in faults:
        ax.axvline(f.start - t0, color="grey", linestyle="--", linewidth=0.6)
        if f.healed > f.start:
            ax.axvspan(f.start - t0, f.healed - t0, color="grey", alpha=0.12)
        ax.text(f.start - t0, len(atsigns) - 0.4, f.kind, rotation=90, fontsize=6,
                va="bottom", color="dimgrey", clip_on=True)  # fmt: skip
    ax.set_yticks(range(len(atsigns)))
    ax.set_yticklabels(atsigns)
    for label in ax.get_yticklabels():
        if label.get_text() in bad:
            label.set_color("red")
    ax.set_ylim(-0.6, len(atsigns) + 1.5)


def instances_json(instances: Sequence[Instance]) -> list[dict[str, Any]]:
    return [asdict(i) for i in instances]
