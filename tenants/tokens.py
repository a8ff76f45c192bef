"""API token secrets: `bh_<prefix>_<secret>`; only sha256 of the whole string is stored.

Tokens are 256-bit random, so a fast hash is the right tool (no password stretching needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "bh_"  # noqa: S105 - a public marker, not a secret


@dataclass(frozen=True)
class TokenSecret:
    prefix: str
    secret: str

    @property
    def digest(self) -> str:
        return hash_token(self.secret)


def new_token_secret() -> TokenSecret:
    prefix = secrets.token_hex(4)
    return TokenSecret(prefix=prefix, secret=f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}")


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def prefix_of(secret: str) -> str | None:
    if not secret.startswith(TOKEN_PREFIX):
        return None
    prefix, sep, _rest = secret[len(TOKEN_PREFIX) :].partition("_")
    return prefix if sep and len(prefix) == 8 else None


def matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(hash_token(secret), digest)
