"""The shipped rules and dashboard against a real Prometheus scraping a real cluster.

Two ``supervisor run`` nodes (clouds A and B, etcd) and an ``atdirectory`` replica come from
the supervisor and directory fixtures; Debian's ``prometheus`` scrapes them every second with
the example scrape config's jobs and labels (``configs/prometheus/prometheus.yml``) and the
shipped rules (the session alert's ``for:`` shortened to 2 s). Every dashboard panel's every
query is evaluated through the HTTP API and must return data and read only metrics that
arrived from the scrapes; a SIGKILLed node must fire the session alert.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.prometheus import (
    DIRECTORY_JOB,
    NODE_JOB,
    Prometheus,
    Target,
    dashboard_queries,
    metric_names,
    prometheus_binary,
    rules,
    rules_with_for,
    scrape_config,
)
from testbed.tls import TestCA
from tests.integration.directory.conftest import DirectoryProcess, TlsLineClient, client_context
from tests.integration.supervisor.cluster import Cluster

ATSIGNS = ("@alice", "@bob", "@carol", "@dave")
SCRAPE_INTERVAL = 1.0
SESSION_ALERT = "AtfailoverNodeWithoutSession"
UNSEEN = {"atfailover_api_refusals_total"}
"""Labelled counters with no sample until the first event (a refused API call): tests/unit
checks that the code exports them."""


@dataclass
class Observed:
    cluster: Cluster
    directory: DirectoryProcess
    prometheus: Prometheus

    def targets_up(self) -> bool:
        targets = self.prometheus.targets()
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    def firing(self) -> list[dict[str, Any]]:
        return self.prometheus.alerts("firing")


@pytest.fixture
def observed(
    make_cluster: Any, start_directory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Observed]:
    if prometheus_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is missing (Debian package prometheus; scripts/bootstrap.sh)")
        pytest.skip("prometheus is missing: run scripts/bootstrap.sh")
    cluster: Cluster = make_cluster(
        "etcd", nodes=(("a1", "A"), ("b1", "B")), atsigns=ATSIGNS, storage="local"
    )
    directory: DirectoryProcess = start_directory("--service", cluster.service, "--shards", "256")
    config = scrape_config(
        [
            Target(f"127.0.0.1:{n.http_port}", {"node": n.name, "cloud": n.cloud})
            for n in cluster.nodes.values()
        ],
        [Target(f"127.0.0.1:{directory.metrics_port}", {"replica": "dir0", "cloud": "A"})],
        interval=SCRAPE_INTERVAL,
    )
    prometheus = Prometheus(
        tmp_path / "prometheus", config, rules={"rules.yml": rules_with_for({SESSION_ALERT: "2s"})}
    )
    prometheus.start()
    try:
        yield Observed(cluster, directory, prometheus)
    finally:
        prometheus.stop()
        if getattr(getattr(request.node, "rep_call", None), "failed", False):
            print(f"===== prometheus log =====\n{prometheus.process.log_tail(40)}")


def serve_and_look_up(o: Observed, test_ca: TestCA) -> None:
    """Wait until every atSign runs once and the directory answers it; ask for each and for
    one nobody has (a miss)."""
    o.cluster.wait_stable(quiet=1.0, timeout=60)
    o.cluster.wait(
        lambda: o.directory.metrics().get("atdirectory_map_atsigns") == len(ATSIGNS),
        30,
        "the directory answering every atSign",
    )
    client = TlsLineClient(o.directory.port, client_context(test_ca))
    try:
        for atsign in ATSIGNS:
            assert not client.ask(atsign.lstrip("@").encode()).startswith(b"null")
        assert client.ask(b"nobodyhere").startswith(b"null")
    finally:
        client.close()


def test_every_dashboard_panel_has_data_and_reads_exported_metrics(
    observed: Observed, test_ca: TestCA
) -> None:
    o, prom = observed, observed.prometheus
    t0 = time.monotonic()
    serve_and_look_up(o, test_ca)
    prom.wait(o.targets_up, 30, "every target up")
    queries = dashboard_queries()
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [f"{q.panel} ({q.ref}): {q.expr}" for q in queries if not prom.query(q.expr)]
        return not empty

    # A rate needs two scrapes inside its window, the lookups one scrape after they happened.
    try:
        took = prom.wait(all_have_data, 45, "every panel query returning data")
    except TimeoutError:
        pytest.fail("panels without data:\n" + "\n".join(empty))
    # Every name a panel or a rule reads arrived from the scrapes (or is Prometheus's own).
    received = prom.series_names(f'{{job=~"{NODE_JOB}|{DIRECTORY_JOB}"}}') | {"up"}
    for q in queries:
        unknown = metric_names(q.expr) - received
        assert not unknown, f"panel {q.panel!r} reads {unknown}, not exported: {q.expr}"
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - received - recorded - UNSEEN
        assert not unknown, f"rule {rule.get('alert') or rule.get('record')} reads {unknown}"
    for name in recorded:
        assert prom.query(name), f"recording rule {name} has no data"
    assert prom.query("atfailover:atsigns_unserved")[0]["value"][1] == "0"
    # A healthy cluster fires nothing.
    assert o.firing() == [], o.firing()
    print(
        f"\n{len(queries)} panel queries with data {took:.1f}s after the cluster served; "
        f"{time.monotonic() - t0:.1f}s in all"
    )


def test_sigkilled_node_fires_the_session_alert(observed: Observed, test_ca: TestCA) -> None:
    o, prom = observed, observed.prometheus
    o.cluster.wait_stable(quiet=1.0, timeout=60)
    prom.wait(o.targets_up, 30, "every target up")
    prom.wait(lambda: bool(prom.query("atfailover_session_alive == 1")), 20, "scraped sessions")
    assert [a for a in o.firing() if a["labels"]["alertname"] == SESSION_ALERT] == []
    killed = o.cluster.nodes["b1"]
    t_kill = time.monotonic()
    killed.proc.kill()

    def session_alert() -> list[dict[str, str]]:
        return [a["labels"] for a in o.firing() if a["labels"]["alertname"] == SESSION_ALERT]

    prom.wait(lambda: bool(session_alert()), 30, f"{SESSION_ALERT} for b1")
    fired = time.monotonic() - t_kill
    labels = session_alert()
    assert [(a["node"], a["cloud"], a["severity"]) for a in labels] == [("b1", "B", "critical")]
    # The survivor keeps its session: the alert names only the dead node.
    assert prom.query('atfailover_session_alive{node="a1"} == 1')
    print(f"\n{SESSION_ALERT} fired {fired:.1f}s after the SIGKILL (scrape 1s, for: 2s)")
