"""The chaos timeline PNG: a long run stays readable (stacked panels, bounded width)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from chaos.checker import FaultRecord, Instance, Verdict
from chaos.report import PANEL_SECONDS, plot_timeline

DPI = 110  # what plot_timeline saves with


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def _history(seconds: float) -> tuple[list[Instance], list[FaultRecord]]:
    """Two atSigns moving between two nodes every 40 s, a fault every 40 s."""
    instances, faults = [], []
    t, token = 0.0, 1
    while t < seconds:
        for k, atsign in enumerate(("@alice", "@bob")):
            node = ("a1", "b1")[(token + k) % 2]
            end = min(t + 38.0, seconds) if t + 40.0 < seconds else None
            instances.append(Instance(atsign, node, token + k, t, end))
        faults.append(FaultRecord("kill-supervisor", "a1", t + 38.0, t + 39.0))
        t += 40.0
        token += 2
    return instances, faults


def _plot(tmp_path: Path, seconds: float) -> tuple[int, int]:
    instances, faults = _history(seconds)
    out = tmp_path / f"timeline-{seconds:g}.png"
    plot_timeline(
        out,
        instances,
        faults,
        Verdict([], [], 0, 0),
        t0=0.0,
        t_end=seconds,
        title=f"{seconds:g} s",
    )
    return _png_size(out)


def test_short_run_is_one_panel(tmp_path: Path) -> None:
    width, height = _plot(tmp_path, 180.0)
    assert width == pytest.approx(10 * DPI, abs=40)  # the 10-inch minimum, tight layout
    assert height < 4 * DPI


@pytest.mark.parametrize("seconds", [1000.0, 3300.0])
def test_long_run_is_stacked_panels_of_bounded_width(tmp_path: Path, seconds: float) -> None:
    one_width, one_height = _plot(tmp_path, PANEL_SECONDS)
    width, height = _plot(tmp_path, seconds)
    panels = -(-seconds // PANEL_SECONDS)
    assert width <= one_width * 1.05, "a long run must not widen the picture"
    assert height == pytest.approx(panels * one_height, rel=0.1)
