"""`Authorization: Bearer <token>` for the API, with a throttle on failed attempts per address."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from tenants import audit, throttle
from tenants.actors import Actor
from tenants.models import ApiToken
from tenants.tokens import matches, prefix_of


def check_auth_throttle(request: Any, subject: str = "") -> None:
    if throttle.throttled(request, subject):
        raise exceptions.Throttled(wait=60, detail="Too many failed authentication attempts; retry later.")


def note_auth_failure(request: Any, reason: str, subject: str = "") -> None:
    throttle.note_failure(request, subject)
    # Not Actor.from_request(request): reading request.user would re-run authentication.
    actor = Actor(
        request_id=getattr(request._request, "request_id", ""),
        source_address=request.META.get("REMOTE_ADDR") or None,
    )
    audit.record_denied(actor, "auth.token", reason=reason)


class BearerTokenAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        secret = parts[1].decode("latin-1") if len(parts) == 2 else ""
        prefix = prefix_of(secret)
        subject = f"token:{prefix or '-'}"
        check_auth_throttle(request, subject)
        if len(parts) != 2:
            note_auth_failure(request, "malformed header", subject)
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        token = (
            ApiToken.objects.select_related("user", "tenant").filter(prefix=prefix).first()
            if prefix
            else None
        )
        now = timezone.now()
        if token is None or not matches(secret, token.secret_hash):
            note_auth_failure(request, "unknown token", subject)
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            note_auth_failure(request, "revoked token", subject)
            raise exceptions.AuthenticationFailed("Token revoked.")
        if token.expires_at is not None and token.expires_at <= now:
            note_auth_failure(request, "expired token", subject)
            raise exceptions.AuthenticationFailed("Token expired.")
        if not token.user.is_active:
            note_auth_failure(request, "inactive user", subject)
            raise exceptions.AuthenticationFailed("User inactive.")
        # last_used_at at minute granularity: one write per token per minute, not per request.
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        user = token.user
        user.active_token = token
        return user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
