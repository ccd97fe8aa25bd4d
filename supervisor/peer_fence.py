"""Fence the CephFS client of a node that left without unmounting (its session ended).

A node killed whole leaves its ceph-fuse's MDS session behind, and with it the capabilities
of every file that client had cached, until the MDS times the session out (a minute).
Those capabilities block other clients, and not only a takeover of the node's own atSigns
(the takeover fence evicts a lost owner first): also an atServer elsewhere whose files the
dead client had cached, such as an atSign it handed off earlier or a marker it read. In
the chaos runs a kill of a node that ran nothing stalled another node's atServers for
46-63 s. So when a node's record leaves the DCS while its client instance still has an
MDS session, one live node (the first by name) evicts that instance.

Evicting a client that is still writing is not harmless: a write cut off by the blocklist
can leave a file with its new size and no data (zeros: seen in a chaos run, when a node
was evicted 0.6 s after it had re-opened its session and started an atServer). So a node
counts as departed only when its record has been missing for ``min_absence`` (the claim
ttl: a node re-opening its session publishes a new record within a cycle) and it holds no
claim (a node with a claim has a live session and may run atServers, also when its record
could not be written). Its session has then ended and its atServers were stopped before
(its renew deadline comes first): nothing legitimate writes through that client any more.
If the node is alive after all (a partition), its mount answers ESHUTDOWN and it mounts
anew once nothing runs on it, as after a takeover fence.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Departure:
    """A node whose record left the DCS, and the client instance it published last."""

    node: str
    client_ref: str


def published_client(record: Mapping[str, Any]) -> str:
    """``client.a1/4160/127.0.0.1:0/1234`` from a node record, or "" when it names no
    client instance (not on CephFS, or its admin socket had not answered yet)."""
    storage = record.get("storage")
    client = storage.get("client") if isinstance(storage, Mapping) else None
    if not isinstance(client, Mapping):
        return ""
    entity, gid = client.get("entity"), client.get("global_id")
    if not isinstance(entity, str) or not entity or not isinstance(gid, int):
        return ""
    return f"{entity}/{gid}/{client.get('addr') or ''}"


class DepartedNodes:
    """Which departed nodes this node fences, from successive reads of the node records."""

    def __init__(self, me: str, min_absence: float) -> None:
        self.me = me
        self.min_absence = min_absence
        self.known: dict[str, str] = {}
        """node -> the client instance its last record named."""
        self.pending: dict[str, tuple[str, float]] = {}
        """Departed nodes to fence: (client instance, missing since), until done or back."""

    def observe(
        self, records: Mapping[str, Mapping[str, Any]], now: float, holders: Set[str]
    ) -> list[Departure]:
        """The departures this node should fence now (pure bookkeeping); ``holders``: the
        nodes that hold a claim (alive, whatever their record says).

        Nothing while this node's own record is missing: a DCS that ended every session
        at once (a Consul restart) removes every record, and then nobody should fence
        everybody; a node that really left is still missing once the others are back.
        Only the first live node by name fences, so one eviction serves everyone. A node
        whose record is back (a new session) evicted its old instance itself when it
        mounted anew, or still uses it (only its supervisor restarted): it is left alone.
        """
        if self.me not in records:
            return []
        for node, ref in self.known.items():
            if node not in records and node != self.me and ref and node not in self.pending:
                self.pending[node] = (ref, now)
        for node in [n for n in self.pending if n in records]:
            del self.pending[node]
        for node in [n for n in self.pending if n in holders]:
            self.pending[node] = (self.pending[node][0], now)  # alive: start again
        self.known = {node: published_client(rec) for node, rec in records.items()}
        if min(records) != self.me:
            self.pending.clear()
        return [
            Departure(n, ref)
            for n, (ref, since) in sorted(self.pending.items())
            if now - since >= self.min_absence
        ]

    def done(self, d: Departure) -> None:
        """``d`` was fenced (or found with no MDS session left): not again."""
        if self.pending.get(d.node, ("",))[0] == d.client_ref:
            del self.pending[d.node]
