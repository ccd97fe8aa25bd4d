"""Drives the real ``atsdk`` client against an atServer; run as a subprocess with a timeout.

atsdk has no timeouts and spins when a server closes the connection, so tests never call
it in-process. ``HOME`` must point to a scratch dir (atsdk keeps keys in ~/.atsign/keys)
and ``SSL_CERT_FILE`` to the test CA. Prints one JSON object on stdout.

    python atsdk_driver.py onboard  @alice HOST PORT CRAM_SECRET
    python atsdk_driver.py put      @alice HOST PORT NAME VALUE
    python atsdk_driver.py get      @alice HOST PORT NAME
    python atsdk_driver.py exercise @alice HOST PORT     (put/get/scan/delete round)
    python atsdk_driver.py badsig   @alice HOST PORT     (PKAM with a wrong key must fail)
"""

from __future__ import annotations

import json
import sys
from typing import Any

from at_client.atclient import AtClient
from at_client.common import AtSign
from at_client.common.keys import PublicKey, SelfKey
from at_client.connections import Address, AtSecondaryConnection
from at_client.exception.atexception import AtException
from at_client.util.authutil import AuthUtil
from at_client.util.keysutil import KeysUtil
from at_client.util.onboardingutil import OnboardingUtil


def onboard(atsign: AtSign, address: Address, cram_secret: str) -> dict[str, Any]:
    conn = AtSecondaryConnection(address)
    conn.connect()
    AuthUtil.authenticate_with_cram(conn, atsign, cram_secret)
    keys: dict[str, str] = {}
    OnboardingUtil.generate_pkam_keypair(keys)
    OnboardingUtil.generate_encryption_keypair(keys)
    OnboardingUtil.generate_self_encryption_key(keys)
    OnboardingUtil.store_pkam_public_key(conn, keys)
    OnboardingUtil.store_public_encryption_key(conn, atsign.without_prefix, keys)
    OnboardingUtil.delete_cram_key(conn)
    KeysUtil.save_keys(atsign, keys)
    conn.disconnect()
    return {"onboarded": str(atsign), "pkam_public_key": keys[KeysUtil.pkam_public_key_name]}


def client(atsign: AtSign, address: Address) -> AtClient:
    return AtClient(atsign, secondary_address=address)


def exercise(atsign: AtSign, address: Address) -> dict[str, Any]:
    c = client(atsign, address)
    out: dict[str, Any] = {"authenticated": c.is_authenticated()}
    self_key = SelfKey("note.test", atsign)
    c.put(self_key, "hello self")
    public = PublicKey("card.test", atsign)
    c.put(public, "hello world")
    out["self"] = c.get(SelfKey("note.test", atsign))
    out["public"] = c.get(PublicKey("card.test", atsign))
    out["scan"] = sorted(str(k) for k in c.get_at_keys(".*", fetch_metadata=False))
    c.delete(SelfKey("note.test", atsign))
    try:
        c.get(SelfKey("note.test", atsign))
        out["after_delete"] = "still there"
    except AtException as exc:
        out["after_delete"] = type(exc).__name__
    out["scan_after_delete"] = sorted(str(k) for k in c.get_at_keys(".*", fetch_metadata=False))
    return out


def main(argv: list[str]) -> dict[str, Any]:
    cmd, atsign_s, host, port = argv[:4]
    atsign, address = AtSign(atsign_s), Address(host, int(port))
    rest = argv[4:]
    if cmd == "onboard":
        return onboard(atsign, address, rest[0])
    if cmd == "exercise":
        return exercise(atsign, address)
    if cmd == "put":
        try:
            return {"put": client(atsign, address).put(SelfKey(rest[0], atsign), rest[1])}
        except AtException as exc:
            return {"error": type(exc).__name__, "detail": str(exc)}
    if cmd == "get":
        try:
            return {"value": client(atsign, address).get(SelfKey(rest[0], atsign))}
        except AtException as exc:
            return {"error": type(exc).__name__, "detail": str(exc)}
    if cmd == "badsig":
        keys: dict[str, str] = {}
        OnboardingUtil.generate_pkam_keypair(keys)
        conn = AtSecondaryConnection(address)
        conn.connect()
        try:
            AuthUtil.authenticate_with_pkam(conn, atsign, keys)
            return {"authenticated": True}
        except AtException as exc:
            return {"authenticated": False, "error": type(exc).__name__, "detail": str(exc)}
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
