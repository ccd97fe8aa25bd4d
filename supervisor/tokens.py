"""Bearer tokens of the node API, read from a file or an environment variable.

A token file holds one token per line (blank lines and ``#`` comments are skipped); several
lines let an operator rotate a token without a flag day: add the new one, restart the nodes
one at a time, move the clients to it, then remove the old one. Clients send the first.
Errors name the file or the variable, never a token's value.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

MIN_TOKEN_LENGTH = 16
"""Shorter tokens are refused: a guessable secret is no authentication."""


class TokenError(ValueError):
    """A token source that cannot be used; the message names it but not its value."""


def parse_tokens(text: str, where: str) -> tuple[str, ...]:
    """The tokens in ``text`` (one per line); ``where`` names the source in errors."""
    tokens: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise TokenError(f"{where}: line {number} holds whitespace inside the token")
        if len(line) < MIN_TOKEN_LENGTH:
            raise TokenError(
                f"{where}: line {number} is {len(line)} characters, a token needs at least "
                f"{MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`)"
            )
        tokens.append(line)
    if not tokens:
        raise TokenError(f"{where}: holds no token")
    return tuple(tokens)


def read_token_file(path: Path) -> tuple[str, ...]:
    """The tokens of a file that only its owner (and group) may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise TokenError(f"token file {path} does not exist") from None
    except OSError as exc:
        raise TokenError(f"token file {path}: cannot read: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        raise TokenError(
            f"token file {path} is readable by every user (mode {stat.S_IMODE(mode):04o}); "
            "chmod o-r (600 or 640)"
        )
    return parse_tokens(text, f"token file {path}")


def read_token_env(name: str, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The token(s) of an environment variable (several separated by newlines)."""
    value = (os.environ if env is None else env).get(name)
    if not value:
        raise TokenError(f"environment variable {name} is not set or empty")
    return parse_tokens(value, f"environment variable {name}")
