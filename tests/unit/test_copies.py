"""The observer's pure logic: answering intervals, double-owner spans, coverage, percentiles."""

from __future__ import annotations

from testbed.copies import (
    Interval,
    Sample,
    answer_intervals,
    covered,
    overlaps,
    percentile,
    ratio,
    summary,
)


def _samples(node: str, times: list[float], atsign: str = "@a") -> list[Sample]:
    return [Sample(t, node, 31000, atsign, 1) for t in times]


def test_intervals_split_on_gaps() -> None:
    got = answer_intervals(_samples("n1", [0.0, 0.2, 0.4, 2.0, 2.2]), max_gap=1.0)
    assert got == [Interval("@a", "n1", 0.0, 0.4), Interval("@a", "n1", 2.0, 2.2)]


def test_overlap_of_two_nodes() -> None:
    iv = [Interval("@a", "n1", 0.0, 10.0), Interval("@a", "n2", 4.0, 20.0)]
    (o,) = overlaps(iv)
    assert (o.start, o.end, o.nodes, o.duration) == (4.0, 10.0, ("n1", "n2"), 6.0)


def test_touching_or_other_atsign_is_no_overlap() -> None:
    iv = [
        Interval("@a", "n1", 0.0, 4.0),
        Interval("@a", "n2", 4.0, 8.0),
        Interval("@b", "n3", 0.0, 8.0),
    ]
    assert overlaps(iv) == []


def test_three_copies_one_span() -> None:
    iv = [
        Interval("@a", "n1", 0.0, 10.0),
        Interval("@a", "n2", 2.0, 5.0),
        Interval("@a", "n3", 4.0, 12.0),
    ]
    (o,) = overlaps(iv)
    assert (o.start, o.end, o.nodes) == (2.0, 10.0, ("n1", "n2", "n3"))


def test_covered_merges_and_clips() -> None:
    iv = [Interval("@a", "n1", 0.0, 3.0), Interval("@a", "n2", 2.0, 5.0)]
    assert covered(iv, "@a", 1.0, 10.0) == 4.0
    assert covered(iv, "@b", 0.0, 10.0) == 0.0


def test_percentiles_and_ratio() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None
    assert summary([2.0, 1.0]) == {"n": 2, "p50": 1.0, "p99": 2.0, "max": 2.0}
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 1.0) is None
