"""The atDirectory's line protocol (the "root" dialect of the at-protocol).

What the public atDirectory and the official SDKs (``atsdk``'s ``AtRootConnection``) do:

* the server sends the prompt ``@`` as soon as a connection is accepted;
* each client line is an atSign, with or without the leading ``@``, in any case,
  terminated by ``\\n`` (a ``\\r`` before it is ignored);
* the answer is ``host:port\\r\\n@`` when the atSign has a healthy atServer, or
  ``null\\r\\n@`` when it has none, sent in ONE write: atsdk reads until a chunk
  contains ``\\n`` or is a lone ``@``, so a separate ``@`` would be read as the
  answer to the next question;
* ``@exit`` closes the connection.

Lines that cannot name an atSign (not UTF-8, control characters or spaces inside,
empty) are answered with an ``error:AT0003-Invalid syntax : <why>`` line followed by
the prompt, so a human at ``openssl s_client`` sees what is wrong; the connection
stays open. Misses are never delayed or punished.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

PROMPT = b"@"
NULL_ANSWER = b"null\r\n@"
EXIT_COMMAND = "@exit"
LINE_END = b"\n"

# at_commons limits an atSign to 55 characters; anything longer cannot be registered.
MAX_ATSIGN_CHARS = 55


@dataclass(frozen=True, slots=True)
class Lookup:
    """A question for the directory: the atSign's key (lower case, no ``@``)."""

    key: str


@dataclass(frozen=True, slots=True)
class Exit:
    """The client asked to close the connection (``@exit``)."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that cannot name an atSign; ``reason`` says why, for the client and the log."""

    reason: str


Request = Lookup | Exit | Invalid


class AtSignError(ValueError):
    """A string is not a usable atSign; the message says why."""


def atsign_key(text: str) -> str:
    """The map key for an atSign: no leading ``@``, lower case (``"@Alice"`` -> ``"alice"``).

    Raises :class:`AtSignError` when ``text`` cannot be an atSign.
    """
    name = text.strip()
    if name.startswith("@"):
        name = name[1:]
    if not name:
        raise AtSignError("empty atSign")
    if len(name) > MAX_ATSIGN_CHARS:
        raise AtSignError(f"atSign longer than {MAX_ATSIGN_CHARS} characters")
    for ch in name:
        if ch == "@":
            raise AtSignError("'@' inside the atSign")
        if ch.isspace() or unicodedata.category(ch)[0] in ("C", "Z"):
            raise AtSignError(f"character U+{ord(ch):04X} is not allowed in an atSign")
    return name.lower()


def parse_line(line: bytes) -> Request:
    """Interpret one client line (with or without its ``\\r\\n``/``\\n``)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid(f"line is not UTF-8 (byte {exc.start})")
    text = text.strip()
    if text.lower() == EXIT_COMMAND:
        return Exit()
    try:
        return Lookup(atsign_key(text))
    except AtSignError as exc:
        return Invalid(str(exc))


def answer_for(host: str, port: int) -> bytes:
    """The complete reply (answer plus prompt) naming where an atServer is reached."""
    return f"{host}:{port}\r\n@".encode()


def invalid_answer(reason: str) -> bytes:
    """The complete reply to a line that names no atSign."""
    return f"error:AT0003-Invalid syntax : {reason}\r\n@".encode()


def line_too_long_answer(limit: int) -> bytes:
    """The last words to a client whose line exceeded ``limit`` bytes (then it is closed)."""
    return f"error:AT0003-Invalid syntax : line longer than {limit} bytes\r\n".encode()


CONNECTION_LIMIT_ANSWER = b"error:AT0012-Inbound connection limit exceeded\r\n"
