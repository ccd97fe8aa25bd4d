"""The shipped Prometheus rules, scrape config and Grafana dashboard, checked without servers.

``promtool`` (Debian's ``prometheus`` package, installed by scripts/bootstrap.sh) checks the
rules and the config and runs the rules' unit tests (configs/prometheus/rules.test.yml). The
metric names the rules and the dashboard read must be ones the code exports.
tests/integration/observability runs them against a real Prometheus and cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from directory.metrics import DirectoryMetrics
from supervisor.metrics import SupervisorMetrics
from testbed.prometheus import (
    DASHBOARD,
    RULES,
    RULES_TESTS,
    SCRAPE_CONFIG,
    dashboard,
    dashboard_queries,
    exported_names,
    metric_names,
    panels,
    promtool_binary,
    rules,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "observability.md"

PROMETHEUS_SERIES = {"up", "ALERTS", "scrape_duration_seconds"}


def promtool() -> str:
    exe = promtool_binary()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian package prometheus; scripts/bootstrap.sh)")
        pytest.skip("promtool is missing: run scripts/bootstrap.sh (Debian package prometheus)")
    return exe


def run_promtool(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def code_exports() -> set[str]:
    """Every sample name a supervisor's and a directory replica's registry can export."""
    sup = CollectorRegistry()
    SupervisorMetrics(
        sup,
        claims_held=lambda: 0.0,
        workloads_running=lambda: 0.0,
        session_alive=lambda: 0.0,
        draining=lambda: 0.0,
    )
    d = CollectorRegistry()
    DirectoryMetrics(d)
    return exported_names([*sup.collect(), *d.collect()])


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def test_promtool_checks_the_rules() -> None:
    out = run_promtool("check", "rules", str(RULES), cwd=REPO_ROOT)
    assert "SUCCESS" in out


def test_promtool_checks_the_scrape_config() -> None:
    out = run_promtool("check", "config", str(SCRAPE_CONFIG), cwd=REPO_ROOT)
    assert "SUCCESS" in out


def test_promtool_runs_the_rules_unit_tests() -> None:
    out = run_promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert "SUCCESS" in out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULES_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def doc_anchors() -> set[str]:
    """GitHub's anchors of the headings of docs/observability.md."""
    out = set()
    for line in DOCS.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_alert_has_a_summary_and_a_runbook_into_the_docs() -> None:
    anchors = doc_anchors()
    for rule in rules():
        if "alert" not in rule:
            continue
        ann = rule.get("annotations", {})
        assert ann.get("summary"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), rule["alert"]
        path, _, anchor = ann.get("runbook", "").partition("#")
        assert path == "docs/observability.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in {DOCS}"


def test_rules_read_only_metrics_the_code_exports() -> None:
    known = code_exports() | PROMETHEUS_SERIES | recorded()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads {unknown}"


def test_dashboard_reads_only_metrics_the_code_exports() -> None:
    known = code_exports() | PROMETHEUS_SERIES
    queries = dashboard_queries()
    assert len(queries) >= 30
    for q in queries:
        unknown = metric_names(q.expr) - known
        assert not unknown, f"panel {q.panel!r} ({q.ref}) reads {unknown}: {q.expr}"


def test_dashboard_model() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Nodes", "Directory", "Storage"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(doc):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    assert DASHBOARD.name == "atfailover.json"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (node, le) (rate(a_bucket{node=~"$x", le="1"}[5m]))', {"a_bucket"}),
        ("x > on (instance) group_left 0.5 * max by (instance) (y)", {"x", "y"}),
        ("histogram_quantile(0.9, b) > 1e3 or c offset 5m", {"b", "c"}),
        ("rate(d[5m]) / 2^20 - atfailover:rec", {"d", "atfailover:rec"}),
        ('up{job="j"} == 0 unless bool e', {"up", "e"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
