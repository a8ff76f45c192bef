"""Who is acting: a user, maybe through a token, from an address, within a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from portal.client_address import client_address
from portal.permissions import active_token


@dataclass(frozen=True)
class Actor:
    user: Any = None
    token: Any = None
    request_id: str = ""
    source_address: str | None = None
    label_override: str = ""

    @classmethod
    def from_request(cls, request: Any) -> Actor:
        user = getattr(request, "user", None)
        authenticated = user is not None and user.is_authenticated
        return cls(
            user=user if authenticated else None,
            token=active_token(user) if authenticated else None,
            request_id=getattr(request, "request_id", "") or "",
            source_address=client_address(request.META),
        )

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls(label_override=label)

    @property
    def is_operator(self) -> bool:
        """An operator acting with full powers: not through a scoped or read-only token."""
        if self.user is None or not self.user.is_staff:
            return False
        return self.token is None or (self.token.tenant_id is None and not self.token.read_only)

    @property
    def label(self) -> str:
        if self.label_override:
            return self.label_override
        if self.user is None:
            return "anonymous"
        if self.token is not None:
            return f"{self.user.get_username()} (token {self.token.prefix})"
        return str(self.user.get_username())
