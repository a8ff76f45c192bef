"""Tenants, their members, API tokens, quotas and the append-only audit log."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q

from portal.permissions import (
    TenantOwnedQuerySet,
    TenantQuerySet,
    active_token,
    acts_as_operator,
    is_restricted,
)
from tenants.choices import AuditOutcome, Role

dns_label = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    "Use 1-63 lowercase letters, digits and hyphens, starting and ending with a letter or digit.",
)


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63, unique=True, validators=[dns_label])
    display_name = models.CharField(max_length=200, blank=True)
    # Operators only (`services.set_privileged_containers`): its containers may ask to run without a
    # user namespace, their root being the host's root.
    allow_privileged_containers = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.display_name or self.name


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__name", "user__username"]
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="one_membership_per_tenant")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class Quota(models.Model):
    """Limits and the amounts allocated against them; changed only under a row lock (tenants.quota)."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota")
    vcpus = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal(8))
    memory_mib = models.PositiveBigIntegerField(default=16384)
    workloads = models.PositiveIntegerField(default=20)
    compartments = models.PositiveIntegerField(default=5)
    image_bytes = models.PositiveBigIntegerField(default=20 * 1024**3)
    published_ports = models.PositiveIntegerField(default=20)
    disk_gib = models.PositiveBigIntegerField(default=100)
    # Sum of the sizes of the tenant's volumes (issue 17).
    volume_bytes = models.PositiveBigIntegerField(default=100 * 1024**3)
    # Compressed bytes of the chunks the tenant's backups use, each chunk once (issue 17).
    backup_bytes = models.PositiveBigIntegerField(default=200 * 1024**3)
    used_vcpus = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal(0))
    used_memory_mib = models.PositiveBigIntegerField(default=0)
    used_workloads = models.PositiveIntegerField(default=0)
    used_compartments = models.PositiveIntegerField(default=0)
    used_image_bytes = models.PositiveBigIntegerField(default=0)
    used_published_ports = models.PositiveIntegerField(default=0)
    used_disk_gib = models.PositiveBigIntegerField(default=0)
    used_volume_bytes = models.PositiveBigIntegerField(default=0)
    used_backup_bytes = models.PositiveBigIntegerField(default=0)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__name"]

    RESOURCES = (
        "vcpus",
        "memory_mib",
        "disk_gib",
        "workloads",
        "compartments",
        "image_bytes",
        "published_ports",
        "volume_bytes",
        "backup_bytes",
    )

    def __str__(self) -> str:
        return f"quota of {self.tenant}"

    def usage(self) -> list[dict[str, Any]]:
        rows = []
        for resource in self.RESOURCES:
            limit = getattr(self, resource)
            used = getattr(self, f"used_{resource}")
            percent = int(min(100, (used * 100 / limit))) if limit else 100
            rows.append({"resource": resource, "used": used, "limit": limit, "percent": percent})
        return rows


class ApiTokenQuerySet(models.QuerySet):
    def for_user(self, user: Any, action: str = "view") -> ApiTokenQuerySet:
        """Users see and revoke their own tokens; operators everybody's; a restricted token only itself."""
        if user is None or not user.is_authenticated:
            return self.none()
        token = active_token(user)
        if is_restricted(token):
            return self.filter(pk=token.pk)
        return self if acts_as_operator(user) else self.filter(user=user)


class ApiToken(models.Model):
    """A bearer token. Only a hash of the secret is stored; the secret is shown once at creation."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, unique=True)
    secret_hash = models.CharField(max_length=64)
    read_only = models.BooleanField(default=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"token {self.prefix} ({self.name})"


class AuditQuerySet(TenantOwnedQuerySet):
    def for_user(self, user: Any, action: Any = "audit") -> AuditQuerySet:
        """Owners and admins read their tenant's log, operators every entry, everyone their own actions.

        The tenants are resolved first (a handful of ids), so the log query stays on its indexes.
        """
        from portal.permissions import acts_as_operator

        if user is None or not user.is_authenticated:
            return self.none()
        if acts_as_operator(user):
            return super().for_user(user, "audit")
        tenant_ids = list(Tenant.objects.for_user(user, "audit").values_list("pk", flat=True))
        own = Q(actor=user)
        token = getattr(user, "active_token", None)
        if token is not None and token.tenant_id is not None:
            own &= Q(tenant_id=token.tenant_id)
        return self.filter(Q(tenant_id__in=tenant_ids) | own)

    def update(self, **kwargs: Any) -> int:
        raise TypeError("The audit log is append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("The audit log is append-only")


class AuditEntry(models.Model):
    """One line of the append-only audit log: who did what to which object, and how it ended."""

    time = models.DateTimeField(auto_now_add=True, db_index=True)
    # No database constraints: entries outlive the users, tokens and tenants they name, unchanged.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_token = models.ForeignKey(
        ApiToken, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    actor_label = models.CharField(max_length=200, blank=True)
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    outcome = models.CharField(max_length=8, choices=AuditOutcome.choices, default=AuditOutcome.OK)
    request_id = models.CharField(max_length=64, blank=True)
    source_address = models.GenericIPAddressField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)

    objects = AuditQuerySet.as_manager()

    class Meta:
        ordering = ["-time", "-id"]
        indexes = [
            models.Index(fields=["tenant", "-time"], name="audit_tenant_time"),
            models.Index(fields=["action", "-time"], name="audit_action_time"),
            models.Index(fields=["outcome", "-time"], name="audit_outcome_time"),
            models.Index(fields=["actor", "-time"], name="audit_actor_time"),
        ]

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.outcome}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise TypeError("The audit log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise TypeError("The audit log is append-only")


class Secret(models.Model):
    """A tenant's secret value (a database password, an API key), referenced by workloads' `secret_env`.

    The value is write-only: sealed with a key derived from the installation's secret key
    (tenants.secret_box), never returned by the API or the UI, never in documents, revisions, plans,
    operation parameters or audit details. A workload receives it in its environment when it starts.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=63, validators=[dns_label])
    sealed_value = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="secret_unique_name_in_tenant"),
        ]

    def __str__(self) -> str:
        return self.name
