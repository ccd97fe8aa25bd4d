"""``chaos demo --prometheus``: a real Prometheus scraping the demo cluster.

The example scrape config's jobs and labels (``configs/prometheus/prometheus.yml``) with the
demo's nodes and directory as targets, the shipped rules with the session alert's ``for:``
shortened so the tour's kill shows it fire, data in the demo's directory; stopped by PID.
"""

from __future__ import annotations

from chaos.cluster import Cluster
from testbed.prometheus import Prometheus, Target, rules_with_for, scrape_config

SCRAPE_INTERVAL = 2.0
SESSION_ALERT_FOR = "5s"


def start_prometheus(cluster: Cluster) -> Prometheus:
    """Start it (bounded wait for ready); the caller stops it."""
    config = scrape_config(
        [
            Target(f"127.0.0.1:{n.http_port}", {"node": n.name, "cloud": n.cloud})
            for n in cluster.nodes
        ],
        [Target(f"127.0.0.1:{cluster.directory_metrics_port}", {"replica": "demo", "cloud": "A"})],
        interval=SCRAPE_INTERVAL,
    )
    rules = rules_with_for({"AtfailoverNodeWithoutSession": SESSION_ALERT_FOR})
    prometheus = Prometheus(cluster.base / "prometheus", config, rules={"rules.yml": rules})
    prometheus.start()
    return prometheus
