"""Exactly-one-owner claims of atSigns on etcd or Consul, with fencing tokens.

Usage::

    from leases import ClaimInfo, Timing, open_backend

    async with open_backend("etcd", endpoints=["127.0.0.1:2379"], prefix="atfailover") as dcs:
        session = await dcs.open_session("node-a1", Timing.for_ttl(6))
        claim = await session.claim("@alice", ClaimInfo(node="node-a1"))
        ...
        await session.release(claim)
        await session.close()

See :mod:`leases.base` for the contract and ``docs/leases.md`` for timing.
"""

from __future__ import annotations

from typing import Any, Literal

from leases.base import (
    Backend,
    Claim,
    ClaimEvent,
    ClaimEventKind,
    ClaimInfo,
    Clock,
    DCSUnavailable,
    LeaseError,
    Session,
    SessionLost,
    SessionState,
    Timing,
    TimingError,
    normalize_atsign,
)

BackendKind = Literal["etcd", "consul"]


def open_backend(kind: BackendKind, **options: Any) -> Backend:
    """Construct a backend by name: ``etcd`` → :class:`leases.etcd.EtcdBackend`
    (``endpoints=[...]``, ``prefix=...``), ``consul`` → :class:`leases.consul.ConsulBackend`
    (``url=...``, ``prefix=...``); other keyword options go to the constructor.
    """
    if kind == "etcd":
        from leases.etcd import EtcdBackend

        return EtcdBackend(**options)
    if kind == "consul":
        from leases.consul import ConsulBackend

        return ConsulBackend(**options)
    raise ValueError(f"unknown DCS backend {kind!r}: expected 'etcd' or 'consul'")


__all__ = [
    "Backend",
    "BackendKind",
    "Claim",
    "ClaimEvent",
    "ClaimEventKind",
    "ClaimInfo",
    "Clock",
    "DCSUnavailable",
    "LeaseError",
    "Session",
    "SessionLost",
    "SessionState",
    "Timing",
    "TimingError",
    "normalize_atsign",
    "open_backend",
]
