"""The at-protocol lines the dev atServer understands, parsed into commands (pure, no I/O).

Formats follow what the official Python SDK (``atsdk``) sends and expects, and the
Dart ``at_secondary`` server it normally talks to:

* every answer is one line ``data:<payload>`` or ``error:<ATxxxx>-<description> : <detail>``
  followed by the prompt (``@`` before login, ``@alice@`` after) in the same write;
* the SDK parses the error code from the text before the first ``:``, so every error
  carries a ``" : "`` separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_KEY_CHARS = 512

# Error codes and their descriptions as at_commons names them.
INVALID_SYNTAX = "AT0003"
BUFFER_OVERFLOW = "AT0005"
SECONDARY_NOT_FOUND = "AT0007"
UNAUTHORIZED = "AT0009"
INTERNAL_SERVER_EXCEPTION = "AT0011"
INBOUND_CONNECTION_LIMIT = "AT0012"
KEY_NOT_FOUND = "AT0015"
INVALID_ATKEY = "AT0016"
ILLEGAL_ARGUMENT = "AT0022"
SERVER_PAUSED = "AT0024"
UNAUTHENTICATED = "AT0401"

ERROR_DESCRIPTIONS: dict[str, str] = {
    INVALID_SYNTAX: "Invalid syntax",
    BUFFER_OVERFLOW: "Buffer limit exceeded",
    SECONDARY_NOT_FOUND: "Secondary server not found",
    UNAUTHORIZED: "UnAuthorized client in request",
    INTERNAL_SERVER_EXCEPTION: "Internal server exception",
    INBOUND_CONNECTION_LIMIT: "Inbound connection limit exceeded",
    KEY_NOT_FOUND: "Key not found",
    INVALID_ATKEY: "Invalid atKey",
    ILLEGAL_ARGUMENT: "Illegal arguments",
    SERVER_PAUSED: "Server is paused",
    UNAUTHENTICATED: "Client authentication failed",
}

# Metadata fields an ``update`` may carry before the key (camelCase on the wire).
INT_META = frozenset({"ttl", "ttb", "ttr", "ttln"})
BOOL_META = frozenset({"ccd", "isBinary", "isEncrypted"})
STR_META = frozenset(
    {
        "dataSignature",
        "sharedKeyStatus",
        "sharedKeyEnc",
        "pubKeyCS",
        "encoding",
        "ivNonce",
        "skeEncKeyName",
        "skeEncAlgo",
        "encKeyName",
        "encAlgo",
    }
)
META_NAMES = INT_META | BOOL_META | STR_META

_META_RE = re.compile(r":(?P<name>[A-Za-z]+):(?P<value>[^:\s]*)(?=:)")
_ATSIGN_RE = re.compile(r"^@[^@:\s]+$")


class ProtocolError(Exception):
    """A request the server answers with ``error:<code>-<description> : <detail>``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    def line(self) -> str:
        return error_line(self.code, self.detail)


def error_line(code: str, detail: str) -> str:
    """``error:AT0015-Key not found : <detail>`` without line breaks in ``detail``."""
    description = ERROR_DESCRIPTIONS.get(code, "Error")
    clean = " ".join(detail.split())
    return f"error:{code}-{description} : {clean}"


def normalize_atsign(text: str) -> str:
    """``alice`` or ``@Alice`` -> ``@alice``; raises ProtocolError if it is not an atSign."""
    s = text.strip().lower()
    if not s.startswith("@"):
        s = "@" + s
    if not _ATSIGN_RE.match(s):
        raise ProtocolError(INVALID_SYNTAX, f"not an atSign: {text!r}")
    return s


@dataclass(frozen=True)
class Command:
    """One parsed request line. ``verb`` is the at-protocol verb name."""

    verb: str
    arg: str = ""
    """The main argument: atSign for ``from``, digest for ``pkam``/``cram``, key for lookups."""
    detail: str = ""
    """``meta``/``all`` for lookups, the regex for ``scan``."""
    value: str = ""
    meta: dict[str, int | bool | str] = field(default_factory=dict)
    show_hidden: bool = False
    for_atsign: str = ""


def _lookup_args(rest: str) -> tuple[str, str]:
    detail = ""
    for prefix in ("meta:", "all:"):
        if rest.startswith(prefix):
            detail, rest = prefix[:-1], rest[len(prefix) :]
            break
    return detail, validate_key(rest)


def validate_key(key: str) -> str:
    """A key as stored: lower case, no whitespace, bounded length."""
    if not key:
        raise ProtocolError(INVALID_SYNTAX, "missing key")
    if len(key) > MAX_KEY_CHARS:
        raise ProtocolError(INVALID_ATKEY, f"key longer than {MAX_KEY_CHARS} characters")
    if any(ch.isspace() for ch in key):
        raise ProtocolError(INVALID_ATKEY, f"key contains whitespace: {key[:80]!r}")
    return key.lower()


def _parse_meta_value(name: str, raw: str) -> int | bool | str:
    if name in INT_META:
        try:
            number = int(raw)
        except ValueError:
            raise ProtocolError(
                ILLEGAL_ARGUMENT, f"{name} must be an integer, got {raw[:40]!r}"
            ) from None
        if number < 0:
            raise ProtocolError(ILLEGAL_ARGUMENT, f"{name} must not be negative")
        return number
    if name in BOOL_META:
        if raw not in ("true", "false"):
            raise ProtocolError(ILLEGAL_ARGUMENT, f"{name} must be true or false, got {raw[:40]!r}")
        return raw == "true"
    return raw


def parse_update(line: str) -> Command:
    """``update[:<meta>:<value>]*:<key> <value>``."""
    rest = line[len("update") :]
    meta: dict[str, int | bool | str] = {}
    while True:
        m = _META_RE.match(rest)
        if m is None or m.group("name") not in META_NAMES:
            break
        meta[m.group("name")] = _parse_meta_value(m.group("name"), m.group("value"))
        rest = rest[m.end() :]
    if not rest.startswith(":"):
        raise ProtocolError(INVALID_SYNTAX, "expected update:<key> <value>")
    key, sep, value = rest[1:].partition(" ")
    if not sep or value == "":
        raise ProtocolError(INVALID_SYNTAX, "update needs a value: update:<key> <value>")
    return Command("update", validate_key(key), value=value, meta=meta)


def parse_scan(line: str) -> Command:
    """``scan[:showHidden:true][:@atsign][ <regex>]``."""
    head, _, regex = line.partition(" ")
    parts = head.split(":")
    if parts[0] != "scan":
        raise ProtocolError(INVALID_SYNTAX, f"unknown verb {head[:40]!r}")
    show_hidden = False
    for_atsign = ""
    i = 1
    while i < len(parts):
        if parts[i] == "showHidden" and i + 1 < len(parts):
            show_hidden = parts[i + 1] == "true"
            i += 2
        elif parts[i].startswith("@"):
            for_atsign = normalize_atsign(parts[i])
            i += 1
        else:
            raise ProtocolError(INVALID_SYNTAX, f"unexpected scan option {parts[i][:40]!r}")
    return Command("scan", detail=regex.strip(), show_hidden=show_hidden, for_atsign=for_atsign)


def parse_command(line: str) -> Command:
    """Parse one request line (without its line ending); raises ProtocolError if malformed."""
    if line == "@exit":
        return Command("exit")
    if line in ("info", "info:brief"):
        return Command("info", detail="brief" if line == "info:brief" else "")
    verb, colon, rest = line.partition(":")
    if verb == "from" and colon:
        return Command("from", normalize_atsign(rest))
    if verb in ("pkam", "cram") and colon:
        if not rest:
            raise ProtocolError(INVALID_SYNTAX, f"{verb} needs a digest")
        return Command(verb, rest)
    if verb == "noop" and colon:
        try:
            millis = int(rest)
        except ValueError:
            raise ProtocolError(
                ILLEGAL_ARGUMENT, "noop:<duration> where the duration maximum is 5000 milliseconds"
            ) from None
        if not 0 <= millis <= 5000:
            raise ProtocolError(
                ILLEGAL_ARGUMENT, "noop:<duration> where the duration maximum is 5000 milliseconds"
            )
        return Command("noop", str(millis))
    if verb == "update" and colon:
        return parse_update(line)
    if verb in ("llookup", "lookup") and colon:
        detail, key = _lookup_args(rest)
        return Command(verb, key, detail=detail)
    if verb == "plookup" and colon:
        if rest.startswith("bypassCache:"):
            rest = rest.split(":", 2)[2] if rest.count(":") >= 2 else ""
        detail, key = _lookup_args(rest)
        return Command("plookup", key, detail=detail)
    if verb == "delete" and colon:
        return Command("delete", validate_key(rest))
    if line == "scan" or line.startswith(("scan:", "scan ")):
        return parse_scan(line)
    shown = line[:40] + ("..." if len(line) > 40 else "")
    raise ProtocolError(INVALID_SYNTAX, f"unknown verb or malformed command: {shown!r}")


def key_owner(key: str) -> str | None:
    """The atSign after the last ``@`` of a key (``public:x@alice`` -> ``@alice``), if any."""
    at = key.rfind("@")
    if at <= 0 or ":" in key[at:]:
        return None
    return key[at:]


def visible_in_scan(key: str, show_hidden: bool, authenticated: bool) -> str | None:
    """The name ``scan`` shows for ``key`` (``None`` = hidden), as the real server filters."""
    if not authenticated:
        if not key.startswith("public:") or key.startswith("public:_"):
            return None
        return key[len("public:") :]
    if show_hidden and (key.startswith("public:__") or key.startswith("_")):
        return key
    if key.startswith(("private:", "privatekey:", "public:_", "_")):
        return None
    if key_owner(key) is None:
        return None
    return key
