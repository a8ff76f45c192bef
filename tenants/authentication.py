"""`Authorization: Bearer <token>` for the API, with a throttle on failed attempts.

Failures are counted per trusted client address and credential: the token's prefix when it names a
token, one shared bucket for unknown prefixes (guessing). One user's bad token behind a proxy locks out
that token from that client, not everybody.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from portal.client_address import client_address
from tenants import audit
from tenants.actors import Actor
from tenants.models import ApiToken
from tenants.tokens import matches, prefix_of


def _failure_key(request: Request, credential: str) -> str:
    return f"authfail:{client_address(request.META) or '-'}:{credential}"


def user_failure_key(address: str | None, username: str) -> str:
    """The failed sign-ins with `username` from `address`: the sign-in form and the registry's Basic
    login count in one budget."""
    return f"authfail:{address or '-'}:user:{username[:150].lower()}"


def failures_exceeded(key: str) -> bool:
    """Whether the failures counted under `key` this minute reached BULKHEAD_AUTH_FAILURES_PER_MINUTE."""
    return (cache.get(key) or 0) >= settings.BULKHEAD_AUTH_FAILURES_PER_MINUTE


def count_failure(key: str) -> None:
    """One more failure under `key`, forgotten a minute after the first."""
    if not cache.add(key, 1, timeout=60):
        try:
            cache.incr(key)
        except ValueError:
            cache.set(key, 1, timeout=60)


def check_auth_throttle(request: Any, credential: str = "?") -> None:
    if failures_exceeded(_failure_key(request, credential)):
        raise exceptions.Throttled(wait=60, detail="Too many failed authentication attempts; retry later.")


def note_auth_failure(request: Any, reason: str, credential: str = "?") -> None:
    count_failure(_failure_key(request, credential))
    # Not Actor.from_request(request): reading request.user would re-run authentication.
    actor = Actor(
        request_id=getattr(request._request, "request_id", ""),
        source_address=client_address(request.META),
    )
    audit.record_denied(actor, "auth.token", reason=reason)


class BearerTokenAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            check_auth_throttle(request)
            note_auth_failure(request, "malformed header")
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        secret = parts[1].decode("latin-1")
        prefix = prefix_of(secret)
        token = (
            ApiToken.objects.select_related("user", "tenant").filter(prefix=prefix).first()
            if prefix
            else None
        )
        # Unknown prefixes share one bucket per client: guessing gains nothing by varying them.
        credential = token.prefix if token is not None else "?"
        check_auth_throttle(request, credential)
        now = timezone.now()
        if token is None or not matches(secret, token.secret_hash):
            note_auth_failure(request, "unknown token", credential)
            raise exceptions.AuthenticationFailed("Invalid token.")
        if token.revoked_at is not None:
            note_auth_failure(request, "revoked token", credential)
            raise exceptions.AuthenticationFailed("Token revoked.")
        if token.expires_at is not None and token.expires_at <= now:
            note_auth_failure(request, "expired token", credential)
            raise exceptions.AuthenticationFailed("Token expired.")
        if not token.user.is_active:
            note_auth_failure(request, "inactive user", credential)
            raise exceptions.AuthenticationFailed("User inactive.")
        # last_used_at at minute granularity: one write per token per minute, not per request.
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        user = token.user
        user.active_token = token
        return user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
