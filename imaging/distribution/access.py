"""Who may do what on a repository of the built-in registry, and the short-lived tokens that say so.

Names: `<tenant>/<repository>` is a tenant's image (nested paths allowed), `library/<repository>` a public
image. Actions follow the role in the tenant, through the same permission layer as the API: viewers
pull; members pull and push; owners and admins also delete. Read-only API tokens pull only; a token scoped
to a tenant reaches only that tenant; public images are pulled by every signed-in user and pushed or
deleted by operators (unscoped). Whether a scope is granted never depends on whether the repository
exists, so another tenant's repository and a missing one answer alike.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import authenticate, get_user_model
from django.core import signing
from django.utils import timezone

from portal.permissions import ROLES_ALLOWED, Action
from tenants.models import ApiToken, Membership, Tenant
from tenants.tokens import matches, prefix_of

# The distribution spec's repository name grammar.
NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
PUBLIC_NAMESPACE = "library"
TOKEN_SALT = "bulkhead.registry.token"  # noqa: S105 - a signing namespace, not a secret
TOKEN_SECONDS = 300
ACTIONS_BY_PERMISSION: dict[str, Action] = {"pull": "view", "push": "operate", "delete": "manage"}


class NameInvalid(ValueError):
    """Not a repository name of the spec's grammar, or not under a tenant or `library/`."""


@dataclass(frozen=True)
class Repository:
    """A parsed repository name: its tenant (None: public) and its image name within the tenant."""

    name: str
    tenant_name: str | None
    image_name: str


def parse_name(name: str) -> Repository:
    if len(name) > 255 or not NAME_RE.match(name) or "/" not in name:
        raise NameInvalid(name)
    namespace, image_name = name.split("/", 1)
    return Repository(name, None if namespace == PUBLIC_NAMESPACE else namespace, image_name)


@dataclass(frozen=True)
class Principal:
    """Who asks: a user, and the API token they authenticated with (None: their password)."""

    user: Any
    token: ApiToken | None

    @property
    def operator(self) -> bool:
        return bool(self.user.is_staff) and (self.token is None or self.token.tenant_id is None)


class LoginThrottled(Exception):
    """Too many failed logins for this user name from this client address within the minute."""


def principal_from_basic(username: str, secret: str, address: str | None = None) -> Principal | None:
    """A user's name with one of their API tokens, or with their password (podman/skopeo login).

    Failures count against the user name from `address` as the sign-in form's do (LoginThrottled past
    the limit, before any check) and are audited: the registry is no way around the sign-in's throttle."""
    from tenants import audit
    from tenants.actors import Actor
    from tenants.authentication import count_failure, failures_exceeded, user_failure_key

    # The sign-in form's key (`frontend.forms.LoginForm`): guesses here and there share one budget.
    key = user_failure_key(address, username)
    if failures_exceeded(key):
        raise LoginThrottled(username)
    principal = _principal_from_basic(username, secret)
    if principal is None:
        count_failure(key)
        audit.record_denied(
            Actor(source_address=address), "registry.login", username=username[:150], reason="bad credentials"
        )
    return principal


def _principal_from_basic(username: str, secret: str) -> Principal | None:
    if prefix_of(secret):
        token = (
            ApiToken.objects.select_related("user", "tenant")
            .filter(prefix=prefix_of(secret), user__username=username)
            .first()
        )
        now = timezone.now()
        if (
            token is None
            or not matches(secret, token.secret_hash)
            or token.revoked_at is not None
            or (token.expires_at is not None and token.expires_at <= now)
            or not token.user.is_active
        ):
            return None
        return Principal(token.user, token)
    user = authenticate(username=username, password=secret)
    return Principal(user, None) if user is not None and user.is_active else None


def granted_actions(principal: Principal | None, repository: Repository, wanted: list[str]) -> list[str]:
    """The subset of `wanted` (pull, push, delete) the principal may do on `repository`."""
    if principal is None:
        return []
    token = principal.token
    granted = []
    for action in wanted:
        if action not in ACTIONS_BY_PERMISSION:
            continue
        if token is not None and token.read_only and action != "pull":
            continue
        if repository.tenant_name is None:
            allowed = action == "pull" or principal.operator
        else:
            allowed = _tenant_allows(principal, repository.tenant_name, ACTIONS_BY_PERMISSION[action])
        if allowed:
            granted.append(action)
    return granted


def _tenant_allows(principal: Principal, tenant_name: str, permission: Action) -> bool:
    token = principal.token
    scoped_elsewhere = (
        token is not None
        and token.tenant_id is not None
        and not Tenant.objects.filter(pk=token.tenant_id, name=tenant_name).exists()
    )
    if scoped_elsewhere:
        return False
    if principal.user.is_staff:
        return Tenant.objects.filter(name=tenant_name).exists()
    return Membership.objects.filter(
        user=principal.user, tenant__name=tenant_name, role__in=ROLES_ALLOWED[permission]
    ).exists()


def issue_token(principal: Principal | None, access: list[dict[str, Any]]) -> str:
    """A signed bearer token for `access` ([{type, name, actions}]), valid TOKEN_SECONDS."""
    payload = {
        "u": str(principal.user.pk) if principal else None,
        "t": str(principal.token.pk) if principal and principal.token else None,
        "a": [[entry["name"], entry["actions"]] for entry in access],
        "iat": int(time.time()),
    }
    return signing.dumps(payload, salt=TOKEN_SALT, compress=True)


@dataclass(frozen=True)
class Grant:
    principal: Principal | None
    access: dict[str, frozenset[str]]

    def allows(self, name: str, action: str) -> bool:
        return action in self.access.get(name, frozenset())


def verify_token(raw: str) -> Grant | None:
    """The grant a bearer token carries, re-checked against the user and API token as they are now."""
    try:
        payload = signing.loads(raw, salt=TOKEN_SALT, max_age=TOKEN_SECONDS)
    except signing.BadSignature:
        return None
    principal = None
    if payload.get("t") is not None:
        # The API token and its user in one query: both must still be active.
        token = (
            ApiToken.objects.select_related("user", "tenant")
            .filter(pk=payload["t"], revoked_at__isnull=True, user__pk=payload.get("u"), user__is_active=True)
            .first()
        )
        if token is None:
            return None
        principal = Principal(token.user, token)
    elif payload.get("u") is not None:
        user = get_user_model().objects.filter(pk=payload["u"], is_active=True).first()
        if user is None:
            return None
        principal = Principal(user, None)
    access = {name: frozenset(actions) for name, actions in payload.get("a", [])}
    return Grant(principal, access)
