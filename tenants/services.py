"""Tenant services: the only code that changes tenants, members, tokens and quotas."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from portal import events
from portal.errors import Conflict, Invalid, NotPermitted
from portal.permissions import acts_as_operator
from tenants import audit, secret_box
from tenants.actors import Actor
from tenants.choices import Role
from tenants.models import ApiToken, Membership, Quota, Secret, Tenant
from tenants.tokens import new_token_secret

User = get_user_model()
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _require_operator(actor: Actor, action: str) -> None:
    # A scoped or read-only token of an operator is no operator.
    if not actor.is_operator:
        raise NotPermitted("Only operators may do this.", audit_action=action)
    if actor.token is not None and actor.token.read_only:
        raise NotPermitted("This token is read-only.", audit_action=action)


@audit.denials_audited
@transaction.atomic
def create_tenant(*, actor: Actor, name: str, display_name: str = "", owner: Any = None) -> Tenant:
    """Create a tenant with default quotas; the owner (if given) becomes its first member."""
    _require_operator(actor, "tenant.create")
    if Tenant.objects.filter(name=name).exists():
        raise Conflict(f"A tenant named {name!r} already exists.", field="name")
    tenant = Tenant.objects.create(name=name, display_name=display_name)
    Quota.objects.create(tenant=tenant)
    audit.record(actor, "tenant.create", tenant, details={"name": name})
    if owner is not None:
        Membership.objects.create(user=owner, tenant=tenant, role=Role.OWNER)
        audit.record(
            actor, "membership.create", tenant, details={"user": owner.get_username(), "role": "owner"}
        )
    return tenant


@transaction.atomic
def update_tenant(*, actor: Actor, tenant: Tenant, display_name: str) -> Tenant:
    tenant.display_name = display_name
    tenant.save(update_fields=["display_name"])
    audit.record(actor, "tenant.update", tenant, details={"display_name": display_name})
    return tenant


# What a tenant must not own when it is deleted: each lives on hosts or in the store, and deleting the
# rows would leave it running or held there. (related name on Tenant, what to call it, its name field)
OWNED_RESOURCES = (
    ("workloads", "workloads", "name"),
    ("compartments", "networks", "name"),
    ("published_ports", "published ports", "host_port"),
    ("images", "images", "name"),
)


def owned_resources(tenant: Tenant) -> dict[str, list[str]]:
    """What the tenant still owns, by kind, a few names each (an empty dict: nothing)."""
    owned: dict[str, list[str]] = {}
    for relation, label, field in OWNED_RESOURCES:
        manager = getattr(tenant, relation, None)
        if manager is None:
            continue
        names = [str(name) for name in manager.order_by(field).values_list(field, flat=True)[:20]]
        if names:
            owned[label] = names
    return owned


@audit.denials_audited
@transaction.atomic
def set_privileged_containers(*, actor: Actor, tenant: Tenant, allowed: bool) -> Tenant:
    """Allow (or forbid) the tenant's containers to run root-mapped, without a user namespace.

    Forbidding does not touch running containers; a privileged workload is refused at its next start.
    """
    _require_operator(actor, "tenant.privileged_containers")
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if tenant.allow_privileged_containers != allowed:
        tenant.allow_privileged_containers = allowed
        tenant.save(update_fields=["allow_privileged_containers"])
        audit.record(actor, "tenant.privileged_containers", tenant, details={"allowed": allowed})
    return tenant


@audit.denials_audited
@transaction.atomic
def delete_tenant(*, actor: Actor, tenant: Tenant) -> None:
    """Delete an empty tenant (operators). One that still owns workloads, networks, ports or images is
    refused with the list, so that nothing is left running on a host without an owner."""
    _require_operator(actor, "tenant.delete")
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    owned = owned_resources(tenant)
    if owned:
        listing = "; ".join(f"{label}: {', '.join(names)}" for label, names in owned.items())
        raise Conflict(
            f"{tenant.name} still owns resources; delete them first ({listing}).",
            audit_action="tenant.delete",
            owned=owned,
        )
    audit.record(actor, "tenant.delete", tenant, details={"name": tenant.name})
    _tell_sockets(*tenant.memberships.values_list("user_id", flat=True))
    tenant.delete()


@audit.denials_audited
@transaction.atomic
def change_password(*, actor: Actor, user: Any, old_password: str, new_password: str) -> None:
    """A signed-in user changes their own password; the old one is required."""
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    if actor.user is None or actor.user.pk != user.pk:
        raise NotPermitted("You can change only your own password.", audit_action="user.password_change")
    if not user.check_password(old_password):
        raise Invalid(
            "The current password is not right.", field="old_password", audit_action="user.password_change"
        )
    try:
        validate_password(new_password, user)
    except ValidationError as error:
        raise Invalid(" ".join(error.messages), field="new_password") from None
    user.set_password(new_password)
    user.save(update_fields=["password"])
    audit.record(actor, "user.password_change", user, details={"username": user.get_username()})
    _tell_sockets(user.pk)  # sockets of other sessions were signed in with the old password


def _tell_sockets(*user_ids: Any) -> None:
    """After commit, the users' live event sockets look again at what they may receive."""
    ids = list(user_ids)
    transaction.on_commit(lambda: events.access_changed(*ids))


def _end_sessions_of(user: Any) -> None:
    from django.contrib.sessions.models import Session

    for session in Session.objects.all().iterator():
        if str(session.get_decoded().get("_auth_user_id")) == str(user.pk):
            session.delete()


def _owner_count(tenant: Tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).count()


def _may_grant(actor: Actor, tenant: Tenant, role: str) -> bool:
    """Admins manage members but only owners (and operators) hand out or take away ownership."""
    if acts_as_operator(actor.user, actor.token):
        return True
    if role != Role.OWNER:
        return True
    return Membership.objects.filter(tenant=tenant, user=actor.user, role=Role.OWNER).exists()


@audit.denials_audited
@transaction.atomic
def add_member(*, actor: Actor, tenant: Tenant, username: str, role: str) -> Membership:
    if role not in Role.values:
        raise Invalid(f"Unknown role {role!r}.", field="role")
    user = User.objects.filter(username=username).first()
    if user is None:
        raise Invalid(f"No user named {username!r}.", field="username")
    if not _may_grant(actor, tenant, role):
        raise NotPermitted("Only owners may add owners.", audit_action="membership.create")
    try:
        with transaction.atomic():
            membership = Membership.objects.create(user=user, tenant=tenant, role=role)
    except IntegrityError:
        raise Conflict(f"{username} is already a member of {tenant.name}.", field="username") from None
    audit.record(actor, "membership.create", membership, details={"user": username, "role": role})
    _tell_sockets(user.pk)
    return membership


@audit.denials_audited
@transaction.atomic
def change_role(*, actor: Actor, membership: Membership, role: str) -> Membership:
    if role not in Role.values:
        raise Invalid(f"Unknown role {role!r}.", field="role")
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if Role.OWNER in (role, membership.role) and not _may_grant(actor, membership.tenant, Role.OWNER):
        raise NotPermitted("Only owners may grant or take away ownership.", audit_action="membership.update")
    if membership.role == Role.OWNER and role != Role.OWNER and _owner_count(membership.tenant) == 1:
        raise Conflict("A tenant keeps at least one owner.")
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit.record(actor, "membership.update", membership, details={"from": before, "to": role})
    _tell_sockets(membership.user_id)
    return membership


@audit.denials_audited
@transaction.atomic
def remove_member(*, actor: Actor, membership: Membership) -> None:
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if membership.role == Role.OWNER:
        if not _may_grant(actor, membership.tenant, Role.OWNER):
            raise NotPermitted("Only owners may remove owners.", audit_action="membership.delete")
        if _owner_count(membership.tenant) == 1:
            raise Conflict("A tenant keeps at least one owner.")
    audit.record(actor, "membership.delete", membership, details={"user": membership.user.get_username()})
    _tell_sockets(membership.user_id)
    membership.delete()


@audit.denials_audited
@transaction.atomic
def create_token(
    *,
    actor: Actor,
    name: str,
    tenant: Tenant | None = None,
    read_only: bool = False,
    expires_at: datetime | None = None,
) -> tuple[ApiToken, str]:
    """Create a token for the acting user; returns the row and the secret (shown once, never stored)."""
    user = actor.user
    if user is None:
        raise NotPermitted("Sign in first.")
    if actor.token is not None and (actor.token.read_only or actor.token.tenant_id is not None):
        raise NotPermitted("A restricted token cannot create tokens.", audit_action="token.create")
    if (
        tenant is not None
        and not user.is_staff
        and not Membership.objects.filter(user=user, tenant=tenant).exists()
    ):
        raise Invalid("You are not a member of that tenant.", field="tenant")
    if expires_at is not None and expires_at <= timezone.now():
        raise Invalid("The expiry must be in the future.", field="expires_at")
    secret = new_token_secret()
    token = ApiToken.objects.create(
        user=user,
        tenant=tenant,
        name=name,
        prefix=secret.prefix,
        secret_hash=secret.digest,
        read_only=read_only,
        expires_at=expires_at,
    )
    audit.record(
        actor,
        "token.create",
        token,
        tenant=tenant,
        details={"name": name, "prefix": secret.prefix, "read_only": read_only},
    )
    return token, secret.secret


@transaction.atomic
def revoke_token(*, actor: Actor, token: ApiToken) -> ApiToken:
    if token.revoked_at is None:
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        token.refresh_from_db()
        audit.record(actor, "token.revoke", token, tenant=token.tenant, details={"prefix": token.prefix})
    return token


@audit.denials_audited
@transaction.atomic
def update_quota(*, actor: Actor, quota: Quota, **limits: Any) -> Quota:
    _require_operator(actor, "quota.update")
    unknown = set(limits) - set(Quota.RESOURCES)
    if unknown:
        raise Invalid(f"Unknown quota fields: {sorted(unknown)}")
    quota = Quota.objects.select_for_update().get(pk=quota.pk)
    for field, value in limits.items():
        if value < 0:
            raise Invalid("Limits cannot be negative.", field=field)
        setattr(quota, field, value)
    quota.save(update_fields=list(limits))
    audit.record(actor, "quota.update", quota, details={k: str(v) for k, v in limits.items()})
    return quota


@audit.denials_audited
@transaction.atomic
def create_user(
    *, actor: Actor, username: str, password: str, email: str = "", is_staff: bool = False
) -> Any:
    """Operators create accounts (there is no self sign-up in a private cloud)."""
    _require_operator(actor, "user.create")
    if User.objects.filter(username=username).exists():
        raise Conflict(f"A user named {username!r} already exists.", field="username")
    user = User.objects.create_user(username=username, password=password, email=email, is_staff=is_staff)
    audit.record(actor, "user.create", user, details={"username": username, "is_staff": is_staff})
    return user


@transaction.atomic
def ensure_first_operator(*, actor: Actor, username: str, password: str, email: str = "") -> tuple[Any, bool]:
    """The installation's first operator (a superuser), created once; (user, created).

    Only set-up calls this (`make run`'s bootstrap, `manage.py deploy`); an existing account of that
    name is left as it is, password included, so that running set-up again changes nothing.
    """
    existing = User.objects.filter(username=username).first()
    if existing is not None:
        return existing, False
    user = User.objects.create_superuser(username, email, password)
    audit.record(actor, "user.create", user, details={"username": username, "is_staff": True})
    return user, True


@audit.denials_audited
@transaction.atomic
def update_user(
    *,
    actor: Actor,
    user: Any,
    email: str | None = None,
    is_staff: bool | None = None,
    is_active: bool | None = None,
    password: str | None = None,
) -> Any:
    """Operators change an account: e-mail, operator flag, active flag, password (never audited)."""
    _require_operator(actor, "user.update")
    if user.pk == actor.user.pk and (is_staff is False or is_active is False):
        raise Conflict("You cannot take away your own operator rights or deactivate yourself.")
    user = User.objects.select_for_update().get(pk=user.pk)
    changed: dict[str, Any] = {}
    for field, value in (("email", email), ("is_staff", is_staff), ("is_active", is_active)):
        if value is not None and getattr(user, field) != value:
            setattr(user, field, value)
            changed[field] = value
    if password is not None:
        user.set_password(password)
        changed["password"] = "changed"  # noqa: S105 - a marker, the password itself is never kept
    if changed:
        user.save()
        if is_active is False:
            # A deactivated account stops at once: its tokens are revoked (they do not come back with a
            # reactivation) and its sessions end (the session backend checks is_active too).
            ApiToken.objects.filter(user=user, revoked_at__isnull=True).update(revoked_at=timezone.now())
            _end_sessions_of(user)
        _tell_sockets(user.pk)
    audit.record(actor, "user.update", user, details=changed)
    return user


# --- secrets: write-only values that workloads receive in their environment ----------------------

MAX_SECRET_BYTES = 64 * 1024


def _checked_value(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("A secret needs a value.", field="value")
    if "\0" in value:
        raise Invalid("A secret value cannot contain NUL bytes.", field="value")
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise Invalid(f"A secret value is at most {MAX_SECRET_BYTES} bytes.", field="value")
    return value


@audit.denials_audited
@transaction.atomic
def create_secret(*, actor: Actor, tenant: Tenant, name: str, value: str) -> Secret:
    """A new secret of the tenant. The audit entry names it; its value is never recorded."""
    if not DNS_LABEL.match(name or ""):
        raise Invalid("A secret's name is 1-63 lowercase letters, digits and hyphens.", field="name")
    sealed = secret_box.seal(_checked_value(value))
    try:
        with transaction.atomic():
            secret = Secret.objects.create(tenant=tenant, name=name, sealed_value=sealed)
    except IntegrityError:
        raise Conflict(f"A secret named {name!r} exists in this tenant.", field="name") from None
    audit.record(actor, "secret.create", secret, details={"name": name})
    return secret


@audit.denials_audited
@transaction.atomic
def set_secret_value(*, actor: Actor, secret: Secret, value: str) -> Secret:
    """Replace a secret's value; workloads get the new one when they next start."""
    sealed = secret_box.seal(_checked_value(value))
    secret = Secret.objects.select_for_update().get(pk=secret.pk)
    secret.sealed_value = sealed
    secret.save(update_fields=["sealed_value", "updated_at"])
    audit.record(actor, "secret.update", secret, details={"name": secret.name})
    return secret


def workloads_using(secret: Secret) -> list[str]:
    """Names of the tenant's workloads whose environment refers to this secret."""
    from compute.models import Workload

    rows = Workload.objects.filter(tenant_id=secret.tenant_id).values_list("name", "secret_env")
    return sorted(name for name, refs in rows if secret.name in (refs or {}).values())


@audit.denials_audited
@transaction.atomic
def delete_secret(*, actor: Actor, secret: Secret) -> None:
    """Delete a secret no workload refers to (one in use is refused with their names)."""
    secret = Secret.objects.select_for_update().get(pk=secret.pk)
    users = workloads_using(secret)
    if users:
        raise Conflict(
            f"The secret {secret.name!r} is used by {', '.join(users[:20])}; change those workloads first.",
            audit_action="secret.delete",
        )
    audit.record(actor, "secret.delete", secret, details={"name": secret.name})
    secret.delete()


def secret_values(tenant_id: Any, refs: dict[str, str]) -> dict[str, str]:
    """`refs` ({ENV_NAME: secret name}) with the secrets' values: for the host starting a workload."""
    if not refs:
        return {}
    sealed = dict(
        Secret.objects.filter(tenant_id=tenant_id, name__in=set(refs.values())).values_list(
            "name", "sealed_value"
        )
    )
    values: dict[str, str] = {}
    for env_name, secret_name in refs.items():
        if secret_name not in sealed:
            raise secret_box.SecretUnreadable(
                f"The secret {secret_name!r} (for {env_name}) no longer exists in this tenant."
            )
        values[env_name] = secret_box.unseal(sealed[secret_name], secret_name)
    return values
