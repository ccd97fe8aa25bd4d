"""Resolve atSigns through an atDirectory with the real ``atsdk`` root connection.

Run as a subprocess with a timeout (atsdk has no timeouts and spins when a server closes
the connection). ``SSL_CERT_FILE`` names the CA the directory's certificate is checked
against. Prints one JSON object: ``{"@alice": "host:port" | "error: ..."}``.

    python atsdk_resolve.py HOST PORT @alice [@bob ...]
"""

from __future__ import annotations

import json
import os
import ssl
import sys

from at_client.common import AtSign
from at_client.connections.atrootconnection import AtRootConnection


def main(argv: list[str]) -> int:
    """Look every atSign up on one root connection and print the answers."""
    host, port, atsigns = argv[1], int(argv[2]), argv[3:]
    context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    root = AtRootConnection.get_instance(host, port, context)
    answers: dict[str, str] = {}
    for atsign in atsigns:
        try:
            answers[atsign] = str(root.find_secondary(AtSign(atsign)))
        except Exception as exc:
            answers[atsign] = f"error: {type(exc).__name__}: {exc}"
    print(json.dumps(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
