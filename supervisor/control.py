"""The node's view and its operator commands (the HTTP API and the CLI use these)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from leases.base import Claim
from supervisor.context import NodeContext
from supervisor.handoffs import STATUS_REPORTS
from supervisor.placement import AtSignPolicy, NodeRef, better_placed


class Control:
    """Status, node record, drain/resume/handoff requests of one node."""

    def __init__(
        self,
        ctx: NodeContext,
        held: Mapping[str, Claim],
        ready: Callable[[], bool],
        last_sentence: Callable[[], str],
        *,
        inventory: Mapping[str, AtSignPolicy] | None = None,
        nodes: Sequence[NodeRef] = (),
    ) -> None:
        self.ctx = ctx
        self._held = held
        self._ready = ready
        self._last_sentence = last_sentence
        self._inventory = inventory if inventory is not None else {}
        self._nodes = nodes  # live: the membership feed updates it in place

    def held(self) -> list[str]:
        return sorted(self._held) if self.ctx.session is not None else []

    def request_drain(self) -> str:
        st = self.ctx.state
        st.draining = True
        st.node_record_dirty = True
        self.ctx.mark(None)
        return (
            f"draining: handing off every atSign, {self.ctx.cfg.placement.drain_concurrency} "
            "at a time"
        )

    def request_resume(self) -> str:
        st = self.ctx.state
        st.draining = False
        st.excluded.clear()
        st.refused.clear()  # an operator acted: check the data dirs again
        st.node_record_dirty = True
        self.ctx.mark(None)
        return "resumed: claiming again"

    def request_handoff(self, atsign: str) -> str:
        c = self._held.get(atsign)
        s = self.ctx.session
        if c is None or s is None or c.session_id != s.session_id:
            raise LookupError(f"{atsign} is not held by this node ({self.ctx.me.name})")
        self.ctx.state.handoffs.add(atsign)
        self.ctx.mark([atsign])
        return f"handing off {atsign}"

    def request_failback(self, atsign: str, for_node: str) -> str:
        """A peer node's handoff request: only a failback to ``for_node`` that the atSign's
        placement policy prefers over this node (what ``failback: auto`` would ask for).
        Raises PermissionError otherwise, LookupError when the atSign is not held here."""
        wish = self._inventory.get(atsign)
        target = next((n for n in self._nodes if n.name == for_node), None)
        if target is None:
            raise PermissionError(f"{for_node} is not a node of this node's inventory")
        if wish is None or not better_placed(target, self.ctx.me, wish):
            raise PermissionError(
                f"{atsign} does not prefer {for_node} over {self.ctx.me.name}: a peer node may "
                "only ask for a failback its placement policy allows"
            )
        return self.request_handoff(atsign)

    def node_record(self) -> dict[str, Any]:
        """What this node publishes about itself in the DCS (bound to its session)."""
        ctx = self.ctx
        return {
            "name": ctx.me.name,
            "cloud": ctx.me.cloud,
            "zone": ctx.cfg.node.zone,
            "address": ctx.cfg.node.address,
            "api": ctx.api_url,
            "capacity": ctx.cfg.placement.capacity,
            "draining": ctx.state.draining,
            "refused": {a: r.reason for a, r in sorted(ctx.state.refused.items())},
            "session": ctx.session.session_id if ctx.session is not None else None,
            "storage": ctx.storage.record(),
        }

    def status(self, reports: int = STATUS_REPORTS) -> dict[str, Any]:
        """This node's view: session, claims, workloads, health, handoffs, last sentence.

        ``reports``: how many of the latest finished handoff reports to include (at most
        :data:`supervisor.handoffs.REPORTS_KEPT` are kept); ``handoff_reports_total``
        counts all of them.
        """
        ctx = self.ctx
        s = ctx.session
        now = ctx.clock()
        claims = ctx.claims.claims
        workloads = []
        for atsign, w in sorted(ctx.workloads.items.items()):
            h = ctx.prober.health.get(atsign)
            c = claims.get(atsign)
            workloads.append(
                {
                    "atsign": atsign,
                    "fencing_token": w.fencing_token,
                    "claim_token": c.token if c else None,
                    "owner": c.info.node if c else None,
                    "port": w.port,
                    "state": w.state.value,
                    "registered": atsign in ctx.registrar.registered,
                    "healthy": h.healthy if h else None,
                    "detail": h.detail if h else "",
                    "since": ctx.state.since.get(atsign, w.started_at),
                }
            )
        drained = ctx.state.draining and not self._held and not ctx.handoffs.in_flight
        return {
            "node": ctx.me.name,
            "cloud": ctx.me.cloud,
            "ready": self._ready(),
            "session": {
                "id": s.session_id if s else None,
                "state": s.state.value if s else "none",
                "deadline_in_s": round(s.renew_deadline - now, 3) if s else None,
            },
            "draining": ctx.state.draining,
            "drained": drained,
            "storage": ctx.storage.record(),
            "claims_held": self.held(),
            "workloads": workloads,
            "handoffs_in_flight": [r.to_json() for r in ctx.handoffs.in_flight.values()],
            "handoff_reports": ctx.handoffs.latest(reports),
            "handoff_reports_total": ctx.handoffs.total,
            "stale_tokens_refused": dict(ctx.state.stale_tokens),
            "stale_data_refused": {
                a: {"reason": r.reason, "since": round(r.since, 3)}
                for a, r in sorted(ctx.state.refused.items())
            },
            "last_cycle": self._last_sentence(),
            "cycles": ctx.state.cycles,
            "inventory": {"source": ctx.cfg.inventory.source, "atsigns": len(self._inventory)},
            "members": [{"name": n.name, "cloud": n.cloud} for n in self._nodes],
        }
