"""A real Prometheus (Debian's ``prometheus`` package) for tests and the demo.

:class:`Prometheus` runs the server as a :class:`~testbed.process.ManagedProcess` on a free
loopback port with its data in a directory of the caller, and stops it by PID.
:func:`scrape_config` turns the example ``configs/prometheus/prometheus.yml`` into one for
given targets, so what is tested is the shipped config's jobs and labels. The rest reads the
shipped rules and dashboard: :func:`rules_with_for` (a copy with shorter ``for:``),
:func:`dashboard_queries` (every panel target's PromQL, Grafana variables filled in) and
:func:`metric_names` (the metric names a PromQL expression reads).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.ports import free_port
from testbed.process import ManagedProcess, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "prometheus"
SCRAPE_CONFIG = CONFIG_DIR / "prometheus.yml"
RULES = CONFIG_DIR / "rules.yml"
RULES_TESTS = CONFIG_DIR / "rules.test.yml"
DASHBOARD = REPO_ROOT / "configs" / "grafana" / "atfailover.json"
NODE_JOB = "atfailover-node"
DIRECTORY_JOB = "atdirectory"

GRAFANA_VARIABLES = {
    # Longest first: "$__range" must not eat the start of a longer name.
    "${__rate_interval}": "15s",
    "$__rate_interval": "15s",
    "${__interval}": "5s",
    "$__interval": "5s",
    "${__range}": "10m",
    "$__range": "10m",
}
"""What the tests put for Grafana's built-in variables (the test Prometheus scrapes every
second); the dashboard's own variables (node, replica) become ``.*`` (all)."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


@dataclass(frozen=True)
class Target:
    """One scrape target: ``host:port`` and its target labels (node and cloud of a node)."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def scrape_config(
    nodes: Sequence[Target],
    directories: Sequence[Target],
    *,
    interval: float,
    rule_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """The example scrape config with these targets, intervals and rule files."""
    doc: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    doc["global"]["scrape_interval"] = f"{interval:g}s"
    doc["global"]["evaluation_interval"] = f"{interval:g}s"
    doc["global"]["scrape_timeout"] = f"{interval:g}s"
    doc["rule_files"] = [str(p) for p in rule_files]
    by_job = {NODE_JOB: nodes, DIRECTORY_JOB: directories}
    for job in doc["scrape_configs"]:
        targets = by_job.pop(job["job_name"])
        job["static_configs"] = [
            {"targets": [t.address], "labels": dict(t.labels)} for t in targets
        ]
    if by_job:
        raise ValueError(f"{SCRAPE_CONFIG} has no job {sorted(by_job)}")
    return doc


def rules_with_for(overrides: Mapping[str, str]) -> dict[str, Any]:
    """The shipped rules with ``for:`` of the named alerts replaced (e.g. ``{"X": "2s"}``)."""
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    left = dict(overrides)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in left:
                rule["for"] = left.pop(rule["alert"])
    if left:
        raise ValueError(f"no such alerts in {RULES}: {sorted(left)}")
    return doc


def rules() -> Iterator[dict[str, Any]]:
    """Every rule of the shipped rules file."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        yield from group["rules"]


# --- the dashboard --------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str
    """With Grafana's variables filled in (see :data:`GRAFANA_VARIABLES`)."""


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including those inside collapsed rows."""
    for p in (doc or dashboard())["panels"]:
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def dashboard_queries(doc: Mapping[str, Any] | None = None) -> list[PanelQuery]:
    doc = doc or dashboard()
    own = [v["name"] for v in doc.get("templating", {}).get("list", []) if v["type"] == "query"]
    out = []
    for p in panels(doc):
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            for name in own:
                expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
            if "$" in expr:
                raise ValueError(f"panel {p['title']!r}: unknown variable in {t['expr']!r}")
            out.append(PanelQuery(p["title"], t.get("refId", "?"), expr))
    return out


# --- PromQL ---------------------------------------------------------------------------------

PROMQL_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ]
)


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names ``expr`` reads: identifiers outside label
    matchers, ranges, strings and grouping clauses that are not a function or a keyword."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isalnum() or before == ".":  # the exponent or unit of a number: 1e3, 5m
            continue
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def exported_names(families: Sequence[Any]) -> set[str]:
    """Sample names of ``prometheus_client`` metric families (from ``registry.collect()``),
    also for labelled families that have no child yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    out: set[str] = set()
    for fam in families:
        out.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        out.update(s.name for s in fam.samples)
    return out


# --- the server -----------------------------------------------------------------------------


class PrometheusError(Exception):
    """The server did not start, or its API answered with an error."""


class Prometheus:
    """``prometheus`` on ``127.0.0.1:<free port>`` with ``config`` (a dict, written as YAML) and
    rule files copied beside it; data in ``base_dir/data``."""

    def __init__(
        self,
        base_dir: Path,
        config: Mapping[str, Any],
        *,
        rules: Mapping[str, Mapping[str, Any]] | None = None,
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.port = port or free_port()
        self.config_path = base_dir / "prometheus.yml"
        self.data_dir = base_dir / "data"
        base_dir.mkdir(parents=True, exist_ok=True)
        doc = dict(config)
        files = []
        for name, content in (rules or {}).items():
            path = base_dir / name
            path.write_text(yaml.safe_dump(dict(content), sort_keys=False))
            files.append(str(path))
        if files:
            doc["rule_files"] = files
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        exe = binary or prometheus_binary()
        if exe is None:
            raise PrometheusError("no prometheus binary (Debian package prometheus)")
        self.process = ManagedProcess(
            "prometheus",
            [
                exe,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            base_dir / "prometheus.log",
            cwd=base_dir,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()

        def ready() -> bool:
            if not self.process.running():
                raise PrometheusError(f"prometheus exited:\n{self.process.log_tail(30)}")
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(ready, timeout, interval=0.2, what=f"prometheus on {self.port}")
        except (TimeoutError, PrometheusError):
            self.stop()
            raise

    def stop(self) -> None:
        self.process.stop(timeout=10)

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result's samples (``metric``, ``value``)."""
        data = self.api("query", query=expr)
        if data["resultType"] not in ("vector", "matrix"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["state"] == state]

    def series_names(self, match: str) -> set[str]:
        """Names of every series matching ``match`` that Prometheus has received."""
        return {str(v) for v in self.api("label/__name__/values", **{"match[]": match})}

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``predicate`` (bounded by ``timeout``); return the seconds it took."""
        start = time.monotonic()
        wait_until(predicate, timeout, interval=0.25, what=what)
        return time.monotonic() - start
