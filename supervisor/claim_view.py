"""The claims as this node reads them: its own (``held``) and the vacant atSigns.

Fed by :class:`supervisor.claim_cache.ClaimCache` one change at a time, so both stay
current without a scan; only a new session (another id owns the claims) rebuilds ``held``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from leases.base import Claim
from supervisor.claim_cache import Changes
from supervisor.cycle import Vacancy
from supervisor.placement import AtSignPolicy, NodeRef
from supervisor.state import State


class ClaimView:
    """Held claims and vacancies, kept from the cache's changes."""

    def __init__(
        self,
        *,
        inventory: Mapping[str, AtSignPolicy],
        nodes: Sequence[NodeRef],
        state: State,
        session_id: Callable[[], str | None],
        clock: Callable[[], float],
        mark: Callable[[Iterable[str] | None], None],
        own_claim_gone: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.inventory = inventory
        self.nodes = nodes
        self.state = state
        self.session_id = session_id
        self.clock = clock
        self.mark = mark
        self.own_claim_gone = own_claim_gone
        """Called with the atSign when a claim of this session disappears but this node did
        not release it (``state.releasing``): the session may have been revoked behind its
        back."""
        self.held: dict[str, Claim] = {}
        self._listed = False

    def rebuild(self, claims: Mapping[str, Claim]) -> None:
        """``held`` for the current session (after it changed)."""
        sid = self.session_id()
        self.held.clear()
        self.held.update({a: c for a, c in claims.items() if c.session_id == sid})

    def _cloud_of(self, node: str) -> str | None:
        return next((n.cloud for n in self.nodes if n.name == node), None)

    def changed(self, claims: Mapping[str, Claim], changed: Changes, synced: bool) -> None:
        """Apply the cache's changes (``claims`` is the cache after them)."""
        sid = self.session_id()
        now = self.clock()
        vacancies = self.state.vacancies
        for atsign, old in changed.items():
            new = claims.get(atsign)
            if new is not None and new.session_id == sid:
                self.held[atsign] = new
            else:
                ours = old is not None and sid is not None and old.session_id == sid
                if new is None and ours and atsign not in self.state.releasing:
                    self.own_claim_gone(atsign)
                self.state.releasing.discard(atsign)
                self.held.pop(atsign, None)
                self.state.handoffs.discard(atsign)  # a request dies with its claim
            if atsign not in self.inventory:
                continue
            if new is not None:
                vacancies.pop(atsign, None)
            elif atsign not in vacancies:
                last = old.info if old is not None else None
                cloud = (last.cloud or self._cloud_of(last.node)) if last else None
                vacancies[atsign] = Vacancy(
                    since=now,
                    last_node=last.node if last else None,
                    last_cloud=cloud,
                    last_session=old.session_id if old is not None else None,
                )
        if synced and not self._listed:
            # The first list: every atSign never seen claimed is vacant since now.
            self._listed = True
            for atsign in self.inventory:
                if atsign not in claims and atsign not in vacancies:
                    vacancies[atsign] = Vacancy(since=now)
            self.mark(None)
        self.mark(changed)
