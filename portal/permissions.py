"""The permission layer: every query of tenant data goes through `for_user(user, action)`.

An object the user may not act on is simply not in the queryset, so a foreign object answers 404
exactly like a missing one. API tokens narrow what their user may do: a tenant-scoped token sees one
tenant, a read-only token only reads.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


# view: read; operate: create and run workloads and images; manage: networks, desired state, members;
# audit: read the audit log; own: tenant settings.
Action = Literal["view", "operate", "manage", "audit", "own"]

ROLES_ALLOWED: dict[str, frozenset[str]] = {
    "view": frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER, Role.VIEWER}),
    "operate": frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}),
    "manage": frozenset({Role.OWNER, Role.ADMIN}),
    "audit": frozenset({Role.OWNER, Role.ADMIN}),
    "own": frozenset({Role.OWNER}),
}

# What a read-only token may still do.
READ_ONLY_ACTIONS = frozenset({"view", "audit"})


def active_token(user: Any) -> Any:
    """The API token the current request authenticated with, if any (set by the token backend)."""
    return getattr(user, "active_token", None)


def is_restricted(token: Any) -> bool:
    """A token narrowed to one tenant or to reading."""
    return token is not None and (token.read_only or token.tenant_id is not None)


def restricted_token(user: Any) -> Any:
    """The request's token if it is read-only or scoped to a tenant (it then sees only itself), else None."""
    token = active_token(user)
    return token if is_restricted(token) else None


def acts_as_operator(user: Any, token: Any = None, *, write: bool = False) -> bool:
    """Whether this request may use operator powers (every tenant, hosts, users, tokens, the store).

    A token scoped to a tenant is a member of that tenant only, operator or not; a read-only token of
    an operator reads as an operator and changes nothing. `token`: the actor's token where the user
    object does not carry it (services); by default the request's.
    """
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_staff:
        return False
    token = token if token is not None else active_token(user)
    if token is None:
        return True
    if token.tenant_id is not None:
        return False
    return not (write and token.read_only)


def role_allows(role: str | None, action: Action) -> bool:
    return role is not None and role in ROLES_ALLOWED[action]


class TenantOwnedQuerySet(models.QuerySet):
    """A queryset whose rows belong to a tenant reachable through `tenant_path`."""

    # Path from the model to its Tenant; "" for the Tenant model itself.
    tenant_path = "tenant__"

    def for_user(self, user: Any, action: Action = "view") -> Self:
        if user is None or not user.is_authenticated:
            return self.none()
        token = active_token(user)
        if token is not None and token.read_only and action not in READ_ONLY_ACTIONS:
            return self.none()
        qs = self
        if not user.is_staff:
            qs = qs.filter(
                **{
                    f"{self.tenant_path}memberships__user": user,
                    f"{self.tenant_path}memberships__role__in": ROLES_ALLOWED[action],
                }
            )
        if token is not None and token.tenant_id is not None:
            qs = qs.filter(**{f"{self.tenant_path}id": token.tenant_id})
        return qs


class TenantQuerySet(TenantOwnedQuerySet):
    tenant_path = ""
