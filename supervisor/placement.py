"""Who should run an atSign: a deterministic standby order every node computes alike.

Order of candidate nodes for one atSign (the lost owner excluded):
1. nodes in the atSign's ``prefer_nodes``;
2. nodes in its ``prefer_clouds``;
3. with ``prefer_other_cloud``, nodes in another cloud than the lost owner's;
4. rendezvous (highest-random-weight) hash of (atSign, node), which spreads
   atSigns evenly and moves few when a node joins or leaves.

A node's *rank* is its index in that order; it waits ``rank * rank_delay``
after it first saw the atSign vacant before claiming, so the first-ranked
standby usually wins without a stampede (the claim itself stays atomic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeRef:
    """A node as the inventory names it."""

    name: str
    cloud: str


@dataclass(frozen=True)
class AtSignPolicy:
    """Placement wishes of one atSign."""

    atsign: str
    prefer_nodes: tuple[str, ...] = ()
    prefer_clouds: tuple[str, ...] = ()


def _weight(atsign: str, node: str) -> int:
    digest = hashlib.blake2b(f"{atsign}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def standby_order(
    policy: AtSignPolicy,
    nodes: Sequence[NodeRef],
    *,
    lost_node: str | None = None,
    lost_cloud: str | None = None,
    prefer_other_cloud: bool = True,
) -> list[NodeRef]:
    """Candidate nodes for ``policy.atsign``, best first; ``lost_node`` is left out."""

    def key(n: NodeRef) -> tuple[int, int, int, int]:
        return (
            0 if n.name in policy.prefer_nodes else 1,
            0 if n.cloud in policy.prefer_clouds else 1,
            0 if prefer_other_cloud and lost_cloud and n.cloud != lost_cloud else 1,
            -_weight(policy.atsign, n.name),
        )

    return sorted((n for n in nodes if n.name != lost_node), key=key)


def rank_of(
    me: str,
    policy: AtSignPolicy,
    nodes: Sequence[NodeRef],
    *,
    lost_node: str | None = None,
    lost_cloud: str | None = None,
    prefer_other_cloud: bool = True,
) -> int:
    """This node's rank for the atSign (0 = first); a node missing from the list ranks last."""
    order = standby_order(
        policy,
        nodes,
        lost_node=lost_node,
        lost_cloud=lost_cloud,
        prefer_other_cloud=prefer_other_cloud,
    )
    for i, n in enumerate(order):
        if n.name == me:
            return i
    return len(order)


def is_preferred(node: NodeRef, policy: AtSignPolicy) -> bool:
    """True when the atSign explicitly prefers this node or its cloud (used for failback)."""
    return node.name in policy.prefer_nodes or (
        not policy.prefer_nodes and node.cloud in policy.prefer_clouds
    )


def better_placed(candidate: NodeRef, owner: NodeRef, policy: AtSignPolicy) -> bool:
    """True when ``candidate`` is explicitly preferred over the current ``owner``."""
    if not is_preferred(candidate, policy):
        return False
    if policy.prefer_nodes:
        return owner.name not in policy.prefer_nodes or (
            policy.prefer_nodes.index(candidate.name) < policy.prefer_nodes.index(owner.name)
        )
    return owner.cloud not in policy.prefer_clouds
