"""The registration layout: which Consul service holds an atSign's atServer instance.

Shared by the directory (what to follow) and the supervisor (where to register). An atSign's
shard is the top bits of ``blake2b(key, digest_size=8)``, where ``key`` is the atSign in lower
case without ``@`` (UTF-8). With ``shards`` = 16**k the shard is simply the first k hex digits
of that digest, so going from 256 to 4096 shards splits every shard into 16
(``atserver-3f`` -> ``atserver-3f0`` ... ``atserver-3ff``).

- ``shards=1``: the legacy single service ``<base>`` (``atserver``).
- ``shards=2**b`` (b = 1 .. 16): services ``<base>-<hex>``, the hex number zero-padded to
  ceil(b/4) digits: 256 shards are ``atserver-00`` ... ``atserver-ff``.

Every instance: service ID ``<service>-<key>`` (``atserver-3f-alice``; legacy
``atserver-alice``), tag ``<key>``, Meta ``atsign``/``node``/``cloud``/``fencing_token``. The
ID names its service, so an ID never moves between services: Consul 1.8.7 does not bump the
old service's index when a registration is renamed in place, and blocking queries on the old
service would keep the instance until that service changed again.

Migration: a supervisor registers each atSign once per shard count in its list (e.g. ``[1,
256]``: ``atserver-alice`` and ``atserver-3f-alice``, same address, token and meta); the
directory follows every layout in its own list and merges them (highest token wins).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from directory.protocol import atsign_key

DEFAULT_BASE = "atserver"
DEFAULT_SHARDS = 256
"""Shards of a new deployment: 100,000 atSigns -> ~390 instances (~0.6 MB) per shard."""
MAX_SHARDS = 1 << 16
_DIGEST_BITS = 64


def check_shards(shards: int) -> int:
    """``shards`` if it is 1 or a power of two up to 65536; else ValueError saying so."""
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise ValueError(f"shards must be an integer, got {shards!r}")
    if shards < 1 or shards > MAX_SHARDS or shards & (shards - 1):
        raise ValueError(
            f"shards must be 1 or a power of 2 up to {MAX_SHARDS} (16, 256, 4096), got {shards}"
        )
    return shards


def _bits(shards: int) -> int:
    return check_shards(shards).bit_length() - 1


def shard_width(shards: int) -> int:
    """Hex digits in a shard's name (0 for the legacy single service)."""
    return (_bits(shards) + 3) // 4


def shard_index(atsign: str, shards: int) -> int:
    """The shard number (0 .. shards-1) of ``atsign`` (``@Alice``, ``alice``: the same)."""
    bits = _bits(shards)
    if bits == 0:
        return 0
    digest = hashlib.blake2b(atsign_key(atsign).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (_DIGEST_BITS - bits)


def shard_name(base: str, index: int, shards: int) -> str:
    """The service name of shard ``index``: ``atserver-3f`` (``base`` itself if shards=1)."""
    width = shard_width(shards)
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} out of range for {shards} shards")
    return base if width == 0 else f"{base}-{index:0{width}x}"


def shard_service(base: str, atsign: str, shards: int = DEFAULT_SHARDS) -> str:
    """The Consul service that holds ``atsign``'s instance: ``atserver-3f`` (or ``base``)."""
    return shard_name(base, shard_index(atsign, shards), shards)


def shard_services(base: str, shards: int = DEFAULT_SHARDS) -> list[str]:
    """Every service name of the layout, in shard order."""
    return [shard_name(base, i, shards) for i in range(check_shards(shards))]


def service_id(service: str, atsign: str) -> str:
    """The instance's service ID: ``<service>-<key>`` (``atserver-3f-alice``)."""
    return f"{service}-{atsign_key(atsign)}"


def services_of(base: str, atsigns: Iterable[str], shards: Sequence[int]) -> list[str]:
    """The services holding ``atsigns`` in the layouts ``shards``: one query each finds them."""
    return sorted({shard_service(base, a, n) for a in atsigns for n in normalize_layouts(shards)})


def dns_name(service: str, atsign: str, domain: str = "consul") -> str:
    """The Consul DNS name answering the atSign: ``alice.atserver-3f.service.consul``."""
    return f"{atsign_key(atsign)}.{service}.service.{domain}"


@dataclass(frozen=True, slots=True)
class Registration:
    """One service instance a supervisor registers for an atSign."""

    service: str
    service_id: str
    tag: str
    shards: int


def registrations(
    atsign: str, base: str = DEFAULT_BASE, shards: Sequence[int] = (DEFAULT_SHARDS,)
) -> list[Registration]:
    """The instances to register for ``atsign``: one per shard count in ``shards``.

    ``[1]`` is today's layout, ``[1, 256]`` the migration (both), ``[256]`` the target.
    """
    key = atsign_key(atsign)
    out: list[Registration] = []
    for count in normalize_layouts(shards):
        service = shard_service(base, key, count)
        out.append(Registration(service, service_id(service, key), key, count))
    return out


def normalize_layouts(shards: Iterable[int]) -> tuple[int, ...]:
    """Shard counts, checked, without repeats, in the order given; ValueError if empty."""
    seen: list[int] = []
    for count in shards:
        if check_shards(count) in seen:
            continue
        for other in seen:
            if shard_width(other) == shard_width(count):
                raise ValueError(
                    f"shard counts {other} and {count} both name their services with "
                    f"{shard_width(count)} hex digit(s); use counts whose names differ"
                )
        seen.append(count)
    if not seen:
        raise ValueError("at least one shard count is needed (1 is the legacy layout)")
    return tuple(seen)


def followed_services(base: str, shards: Iterable[int]) -> list[str]:
    """Every service a directory following the layouts ``shards`` queries (no repeats)."""
    names: dict[str, None] = {}
    for count in normalize_layouts(shards):
        for name in shard_services(base, count):
            names[name] = None
    return list(names)


ANY_LAYOUT = tuple(16**w for w in range(5))
"""One shard count per name width (1, 16, 256, 4096, 65536): with these, :func:`layout_of`
tells whether a service belongs to ``base``'s layouts at all (any shard count)."""


def is_layout_service(base: str, service: str) -> bool:
    """True if ``service`` is ``base`` or one of its shards (``atserver-3f``), any layout."""
    return layout_of(base, service, ANY_LAYOUT) is not None


def layout_services(base: str, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (e.g. the keys of ``/v1/catalog/services``) that are ``base`` or
    its shards: what to query to find every instance, in whatever layout it was registered."""
    return sorted(n for n in names if is_layout_service(base, n))


def layout_of(base: str, service: str, shards: Iterable[int]) -> int | None:
    """The shard count (of ``shards``) whose layout has a service called ``service``."""
    for count in normalize_layouts(shards):
        width = shard_width(count)
        if width == 0:
            if service == base:
                return count
            continue
        prefix = base + "-"
        suffix = service[len(prefix) :]
        if (
            service.startswith(prefix)
            and len(suffix) == width
            and all(c in "0123456789abcdef" for c in suffix)
            and int(suffix, 16) < count
        ):
            return count
    return None
