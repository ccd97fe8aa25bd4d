"""The key layout shared by every backend: ``<prefix>/claims/<atsign>`` holding ClaimInfo JSON."""

from __future__ import annotations

import json

from leases.base import ClaimInfo, normalize_atsign


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

    def claim_key(self, atsign: str) -> str:
        """The key of one atSign's claim (the atSign is validated and normalized)."""
        return self.claims_dir + normalize_atsign(atsign)

    def atsign_of(self, key: str) -> str | None:
        """The atSign a claim key names, or None for a key that is not a claim."""
        if not key.startswith(self.claims_dir):
            return None
        name = key[len(self.claims_dir) :]
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
