"""Sealing tenants' secret values at rest: Fernet (AES-128-CBC + HMAC-SHA256) with a key derived from
the installation's SECRET_KEY for this purpose only. Changing SECRET_KEY makes sealed values unreadable:
they must be set again (the error says so)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

from portal.errors import Explained


class SecretUnreadable(Explained):
    """A sealed value that this installation's key does not open."""


def _fernet() -> Fernet:
    key = hashlib.sha256(f"tenants.secret:{settings.SECRET_KEY}".encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def seal(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def unseal(sealed: str, name: str) -> str:
    try:
        return _fernet().decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            f"The secret {name!r} cannot be read with this installation's key; set its value again."
        ) from None
