"""Who may read the HTTP port's data: bearer tokens an operator configures.

Tokens are read once at start-up from ``CHARGEFLOW_HTTP_TOKENS_FILE`` (one per line, optionally
``name:token``; ``#`` starts a comment) and kept only as SHA-256 digests; a presented token is
hashed and compared with every digest in constant time. Without any configured token, data is
served to loopback clients only (a local operator, `curl localhost`), never to another host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = ["Denied", "Tokens", "load_tokens"]

MIN_TOKEN_LENGTH = 16


class Denied(StrEnum):
    """Why a request was refused (the label of ``chargeflow_http_auth_failures_total``)."""

    MISSING = "missing"  # no bearer token presented
    INVALID = "invalid"  # a token that is not configured
    NOT_CONFIGURED = "not_configured"  # no tokens configured, and the client is not loopback


@dataclass(frozen=True, slots=True)
class Tokens:
    """The configured tokens, as digests with the name each was given."""

    digests: tuple[tuple[str, bytes], ...] = ()

    @property
    def configured(self) -> bool:
        return bool(self.digests)

    def holder(self, token: str) -> str | None:
        """The name of the configured token equal to ``token``, or None; every digest is
        compared, whichever matches, so that timing says nothing about the tokens."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, digest in self.digests:
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    def check(self, token: str | None, client_host: str | None) -> Denied | None:
        """None when the request may read data, else why not."""
        if not self.configured:
            return None if _loopback(client_host) else Denied.NOT_CONFIGURED
        if not token:
            return Denied.MISSING
        return None if self.holder(token) is not None else Denied.INVALID


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def load_tokens(path: Path) -> Tokens:
    """Read a tokens file; ValueError names the line that is wrong (never the token)."""
    digests: list[tuple[str, bytes]] = []
    text = path.read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.rpartition(":")
        if not sep:
            name, token = f"token-{number}", line
        name, token = name.strip(), token.strip()
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ValueError(
                f"line {number}: a token must be at least {MIN_TOKEN_LENGTH} characters without "
                "spaces (e.g. the output of `openssl rand -hex 32`)"
            )
        digests.append((name or f"token-{number}", hashlib.sha256(token.encode()).digest()))
    if not digests:
        raise ValueError("names no token (one per line, optionally name:token)")
    return Tokens(tuple(digests))
