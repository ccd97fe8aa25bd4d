"""What the daemon remembers between cycles (the cycle itself stays pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor import cycle
from supervisor.data_guard import UnstampedClaim


@dataclass
class Health:
    """The last probe of one atServer."""

    healthy: bool
    detail: str
    at: float


@dataclass(frozen=True)
class Refusal:
    """The data guard refused an atSign here: why, and the marker it judged."""

    reason: str
    fingerprint: tuple[int, int, int, int] | None
    since: float


@dataclass
class State:
    """The daemon's memory; every field is kept up to date by events, never rebuilt."""

    vacancies: dict[str, cycle.Vacancy] = field(default_factory=dict)
    """Inventory atSigns without a claim: since when, and who held them last."""
    draining: bool = False
    handoffs: set[str] = field(default_factory=set)
    """atSigns an operator (or a failback request) asked this node to hand off."""
    excluded: dict[str, float] = field(default_factory=dict)
    """atSign -> until when this node leaves it alone (it just handed it off)."""
    stale_tokens: dict[str, int] = field(default_factory=dict)
    """atSign -> the last token its data directory refused (shown in /status)."""
    refused: dict[str, Refusal] = field(default_factory=dict)
    """atSign -> why the data guard refused it here (kept until its data dir changes)."""
    unstamped: dict[str, set[UnstampedClaim]] = field(default_factory=dict)
    """atSign -> claims made here whose start has not stamped its marker yet (the data
    guard lets this process build on them; dropped once a marker is stamped)."""
    releasing: set[str] = field(default_factory=set)
    """Claims this node is releasing itself: their deletion is no sign of a lost session."""
    failback_asked: dict[str, float] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    """atSign -> wall time its atServer was started here."""
    storage_leave: bool = False
    """This node's storage fails while other nodes' works: hand everything off."""
    node_record_dirty: bool = True
    """The node's record in the DCS must be written again (see ``Control.node_record``)."""
    last_sentence: str = ""
    last_failures: int = 0
    """Actions of the last cycle that failed (each is named in its sentence)."""
    cycles: int = 0
