"""How the CLI and peer nodes call a node API: its URL, TLS verification and credential."""

from __future__ import annotations

import ssl

from supervisor.config import HTTPConfig, NodeConfig, TokenSource

WILDCARDS = ("0.0.0.0", "::")


def advertised_api_url(http: HTTPConfig, node: NodeConfig) -> str:
    """The URL other nodes use for this node's API (the node address for a wildcard)."""
    host = http.host if http.host not in WILDCARDS else node.address
    return f"{http.scheme}://{_bracket(host)}:{http.port}"


def local_api_url(http: HTTPConfig, node: NodeConfig) -> str:
    """The URL this host's CLI uses: loopback for a plain wildcard listener, else the name
    the server's certificate was issued for."""
    if http.scheme == "http" and http.host in WILDCARDS:
        return f"http://127.0.0.1:{http.port}"
    return advertised_api_url(http, node)


def client_tls(http: HTTPConfig) -> ssl.SSLContext | None:
    """The context that verifies node APIs against ``http.tls.ca`` (None: the system's)."""
    if http.tls is None or http.tls.ca is None:
        return None
    return ssl.create_default_context(cafile=str(http.tls.ca))


def server_tls(http: HTTPConfig) -> ssl.SSLContext | None:
    """The API listener's context (None: plain HTTP)."""
    if http.tls is None or http.tls.cert is None or http.tls.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(http.tls.cert), str(http.tls.key))
    return ctx


def bearer(source: TokenSource | None) -> dict[str, str]:
    """The Authorization header for a credential (none without one)."""
    if source is None:
        return {}
    return {"Authorization": f"Bearer {source.tokens()[0]}"}


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
