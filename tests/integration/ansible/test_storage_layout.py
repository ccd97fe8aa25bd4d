"""site.yml refuses an inventory whose Ceph does not span both clouds plus the witness.

Each case is the local inventory with one change; the first play's checks stop the run
before anything is started (a few seconds each).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.ansible.local_cluster import INVENTORY, run_playbook

Hosts = dict[str, Any]


def _groups(inv: Hosts) -> dict[str, Any]:
    groups: dict[str, Any] = inv["all"]["children"]
    return groups


def _no_tiebreaker(inv: Hosts) -> None:
    del _groups(inv)["ceph_mons"]["hosts"]["witness-1"]


def _osds_in_one_cloud(inv: Hosts) -> None:
    osds = _groups(inv)["ceph_osds"]["hosts"]
    del osds["gcp-1"], osds["gcp-2"]


def _one_mon_in_gcp(inv: Hosts) -> None:
    del _groups(inv)["ceph_mons"]["hosts"]["gcp-2"]


def _no_mds_in_aws(inv: Hosts) -> None:
    del _groups(inv)["ceph_mdss"]["hosts"]["aws-2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_no_tiebreaker, "does not span both clouds plus the witness tiebreaker"),
        (_osds_in_one_cloud, "does not span both clouds plus the witness tiebreaker"),
        (_one_mon_in_gcp, "cloud gcp does not hold its share of the storage"),
        (_no_mds_in_aws, "cloud aws does not hold its share of the storage"),
    ],
    ids=["no-tiebreaker", "osds-in-one-cloud", "one-mon-in-gcp", "no-mds-in-aws"],
)
def test_site_refuses_storage_that_does_not_span_both_clouds_and_the_witness(
    tmp_path: Path, change: Callable[[Hosts], None], message: str
) -> None:
    inv: Hosts = yaml.safe_load(INVENTORY.read_text())
    change(inv)
    inv_dir = tmp_path / "inventory"
    inv_dir.mkdir()
    (inv_dir / "hosts.yml").write_text(yaml.safe_dump(inv))
    (inv_dir / "group_vars").symlink_to(INVENTORY.parent / "group_vars")
    run = run_playbook(tmp_path, "site.yml", inventory=inv_dir / "hosts.yml")
    assert run.rc != 0, f"site.yml accepted the inventory:\n{run.tail()}"
    assert message in " ".join(run.output.split()), run.tail()
    assert "Run the etcd cluster" not in run.output, "site.yml went on after the check"
    assert not (tmp_path / "hosts").exists(), "site.yml wrote host files before refusing"
