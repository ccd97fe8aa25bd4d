"""Who may call what on the node API: bearer tokens per role, checked in constant time.

Bearer tokens over TLS rather than client certificates, because the three roles need
separate credentials that rotate on their own (a node's, an operator's, the registrar's),
the CLI and scripts send them without a per-user certificate, and Consul and etcd in this
deployment already use tokens the same way. TLS authenticates the server to its clients
and keeps the tokens secret on the wire (docs/supervisor.md, the threat model).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

if TYPE_CHECKING:
    from supervisor.config import APIAuthConfig
    from supervisor.metrics import SupervisorMetrics

log = logging.getLogger("supervisor.api")


class Role(enum.Enum):
    """What a credential is for."""

    OPERATOR = "operator"
    PEER = "peer"
    REGISTRAR = "registrar"


ROLE_KEY = web.RequestKey("atfailover_role", Role)
"""Where the middleware leaves the caller's :class:`Role` on the request."""

OPEN: frozenset[tuple[str, str]] = frozenset({("GET", "/healthz")})
"""Answered without a credential on the API listener too (a liveness probe learns nothing)."""

ALLOWED: Mapping[tuple[str, str], frozenset[Role]] = {
    ("GET", "/readyz"): frozenset({Role.OPERATOR}),
    ("GET", "/status"): frozenset({Role.OPERATOR}),
    ("GET", "/metrics"): frozenset({Role.OPERATOR}),
    ("POST", "/drain"): frozenset({Role.OPERATOR}),
    ("POST", "/resume"): frozenset({Role.OPERATOR}),
    # A peer only for a failback that the placement policy allows (the handler checks).
    ("POST", "/handoff"): frozenset({Role.OPERATOR, Role.PEER}),
    # The inventory (``inventory.source: dcs``): the registrar's calls.
    ("GET", "/atsigns"): frozenset({Role.OPERATOR, Role.REGISTRAR}),
    ("POST", "/atsigns"): frozenset({Role.OPERATOR, Role.REGISTRAR}),
    ("POST", "/atsigns/remove"): frozenset({Role.OPERATOR, Role.REGISTRAR}),
    ("POST", "/atsigns/import"): frozenset({Role.OPERATOR, Role.REGISTRAR}),
}
"""Every other method and path needs the operator credential."""


class Credentials:
    """The accepted tokens of each role, kept as SHA-256 digests."""

    def __init__(self, tokens: Mapping[Role, Sequence[str]]) -> None:
        self._digests = [
            (role, hashlib.sha256(t.encode()).digest()) for role, ts in tokens.items() for t in ts
        ]

    @classmethod
    def from_config(cls, auth: APIAuthConfig) -> Credentials:
        sources = {
            Role.OPERATOR: auth.operator_token,
            Role.PEER: auth.peer_token,
            Role.REGISTRAR: auth.registrar_token,
        }
        return cls({role: s.tokens() for role, s in sources.items() if s is not None})

    def role_of(self, token: str) -> Role | None:
        """The role of ``token``, or None. Compares with every digest (no early exit), in
        constant time per comparison, so the timing tells nothing about near misses."""
        presented = hashlib.sha256(token.encode()).digest()
        found: Role | None = None
        for role, digest in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = role
        return found


def _path_label(request: web.Request) -> str:
    """A bounded label: the route's path, or ``other`` for paths the API does not serve."""
    if (request.method, request.path) in ALLOWED or (request.method, request.path) in OPEN:
        return request.path
    return "other"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def refusal(
    request: web.Request, status: int, why: str, metrics: SupervisorMetrics | None
) -> web.Response:
    """A 401/403 answer with a one-line reason; counted, and logged without the credential."""
    path = _path_label(request)
    if metrics is not None:
        metrics.api_refusals.labels(path=path, status=str(status)).inc()
    log.warning(
        "event=api-refused status=%d method=%s path=%s remote=%s why=%r",
        status,
        request.method,
        path,
        request.remote,
        why,
    )
    headers = {"WWW-Authenticate": 'Bearer realm="atfailover node API"'} if status == 401 else None
    return web.json_response({"ok": False, "error": why}, status=status, headers=headers)


def auth_middleware(
    credentials: Credentials | None, metrics: SupervisorMetrics | None
) -> Middleware:
    """Refuse with 401 (no or unknown credential) or 403 (not this role's call); count and
    log each refusal without the credential. ``credentials=None``: every caller is an
    operator (an API on loopback without ``http.auth``)."""

    def refuse(request: web.Request, status: int, why: str) -> web.Response:
        return refusal(request, status, why, metrics)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        key = (request.method, request.path)
        if credentials is None:
            request[ROLE_KEY] = Role.OPERATOR
            return await handler(request)
        if key in OPEN:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return refuse(request, 401, "no credential: send 'Authorization: Bearer <token>'")
        if scheme.lower() != "bearer" or not token.strip():
            return refuse(request, 401, "the Authorization header must be 'Bearer <token>'")
        role = credentials.role_of(token.strip())
        if role is None:
            return refuse(request, 401, "the token is not valid for this node")
        if role not in ALLOWED.get(key, frozenset({Role.OPERATOR})):
            return refuse(
                request, 403, f"the {role.value} credential may not {request.method} {request.path}"
            )
        request[ROLE_KEY] = role
        if request.method != "GET":
            log.info(
                "event=api-call role=%s method=%s path=%s remote=%s",
                role.value,
                request.method,
                request.path,
                request.remote,
            )
        return await handler(request)

    return middleware
