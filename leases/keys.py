"""The key layout shared by every backend.

``<prefix>/claims/<atsign>``       ClaimInfo JSON, bound to the owner's session
``<prefix>/generations/<atsign>``  Generation JSON, no lease: outlives every owner
``<prefix>/nodes/<node>``          a node's own record (JSON), bound to its session
``<prefix>/atsigns/<atsign>``      an atSign record (JSON, :mod:`leases.records`), no lease
"""

from __future__ import annotations

import json
import time
from typing import Any

from leases.base import ClaimInfo, Generation, GenerationStamp, normalize_atsign


def normalize_prefix(prefix: str) -> str:
    """``/atfailover/`` → ``atfailover``; raise ValueError for an empty or odd prefix."""
    cleaned = prefix.strip().strip("/")
    if not cleaned:
        raise ValueError(f"key prefix must not be empty, got {prefix!r}")
    if "//" in cleaned or any(c.isspace() for c in cleaned):
        raise ValueError(f"key prefix must not contain '//' or whitespace, got {prefix!r}")
    return cleaned


class KeyLayout:
    """Where claims live under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = normalize_prefix(prefix)
        self.claims_dir = f"{self.prefix}/claims/"
        self.generations_dir = f"{self.prefix}/generations/"
        self.nodes_dir = f"{self.prefix}/nodes/"
        self.atsigns_dir = f"{self.prefix}/atsigns/"

    def claim_key(self, atsign: str) -> str:
        """The key of one atSign's claim (the atSign is validated and normalized)."""
        return self.claims_dir + normalize_atsign(atsign)

    def generation_key(self, atsign: str) -> str:
        return self.generations_dir + normalize_atsign(atsign)

    def atsign_record_key(self, atsign: str) -> str:
        return self.atsigns_dir + normalize_atsign(atsign)

    def node_key(self, node: str) -> str:
        if not node or "/" in node:
            raise ValueError(f"not a usable node name: {node!r}")
        return self.nodes_dir + node

    def atsign_of(self, key: str, directory: str | None = None) -> str | None:
        """The atSign a key under ``directory`` (default: the claims) names, or None."""
        base = self.claims_dir if directory is None else directory
        if not key.startswith(base):
            return None
        name = key[len(base) :]
        try:
            return normalize_atsign(name)
        except ValueError:
            return None


def encode_info(info: ClaimInfo) -> bytes:
    return json.dumps(info.to_json_dict(), sort_keys=True, separators=(",", ":")).encode()


def decode_info(raw: bytes | str | None) -> ClaimInfo:
    """Parse a stored ClaimInfo; a damaged value yields an info naming only the damage."""
    if raw is None or raw in (b"", ""):
        return ClaimInfo(node="")
    try:
        data = json.loads(raw)
    except ValueError:
        return ClaimInfo(node="", extra={"error": "claim value is not JSON"})
    if not isinstance(data, dict):
        return ClaimInfo(node="", extra={"error": "claim value is not a JSON object"})
    try:
        return ClaimInfo.from_json_dict(data)
    except (TypeError, ValueError):
        return ClaimInfo(node="", extra={"error": "claim value has invalid fields"})


def encode_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_json(raw: bytes | str | None) -> dict[str, Any]:
    """A stored JSON object; ``{}`` for an empty or damaged value."""
    if raw is None or raw in (b"", ""):
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def decode_generation(atsign: str, token: int, raw: bytes | str | None) -> Generation:
    try:
        return Generation.from_json_dict(atsign, token, decode_json(raw))
    except (TypeError, ValueError):
        return Generation(atsign=atsign, token=token, node="")


def stamp_value(stamp: GenerationStamp, info: ClaimInfo, session: str) -> bytes:
    """The stored JSON of the generation a claim by ``info`` records in its transaction."""
    return generation_value(
        info.node,
        stamp.cloud or info.cloud,
        stamp.dir_id,
        stamp.prev,
        client=stamp.client,
        session=session,
    )


def generation_value(
    node: str,
    cloud: str,
    dir_id: str,
    prev: int,
    accepted_by: str = "",
    client: str = "",
    session: str = "",
) -> bytes:
    """The stored JSON of a new generation (its token is the record's revision)."""
    return encode_json(
        Generation(
            atsign="",
            token=0,
            node=node,
            cloud=cloud,
            dir_id=dir_id,
            prev=prev,
            time=time.time(),
            accepted_by=accepted_by,
            client=client,
            session=session,
        ).to_json_dict()
    )
