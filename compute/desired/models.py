"""Desired state of a tenant: immutable numbered revisions, stored plans, the reconciler's state.

``DesiredState`` is one row per tenant: the mode, the revision the portal keeps the tenant at
(``target_revision``, set when a plan of it is applied), the conditions the reconciler last wrote and the
claim that makes runs (reconciler or apply) of one tenant exclusive. ``ResourceCorrection`` rows are the
flap breaker's memory: one per automatic correction of a resource.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models

from portal.permissions import TenantOwnedQuerySet


class ReconcileMode(models.TextChoices):
    OFF = "off", "Off"
    MONITOR = "monitor", "Monitor (report drift)"
    AUTOCORRECT = "autocorrect", "Autocorrect"


class PlanState(models.TextChoices):
    PLANNED = "planned", "Planned"
    APPLYING = "applying", "Applying"
    APPLIED = "applied", "Applied"
    FAILED = "failed", "Failed"
    STALE = "stale", "Stale"


class DesiredState(models.Model):
    tenant = models.OneToOneField(
        "tenants.Tenant", on_delete=models.CASCADE, primary_key=True, related_name="desired_state"
    )
    mode = models.CharField(max_length=16, choices=ReconcileMode.choices, default=ReconcileMode.OFF)
    # The revision the tenant is kept at: the last one whose plan was applied (None: nothing applied yet).
    target_revision = models.PositiveIntegerField(null=True, blank=True)
    # The revision the conditions below were computed against.
    observed_revision = models.PositiveIntegerField(null=True, blank=True)
    conditions = models.JSONField(default=list, blank=True)
    drift = models.JSONField(default=list, blank=True)
    # Per managed resource key: {"Ready", "Drifted", "Degraded", "Flapping": "True"/"False", "reason", ...}.
    resource_conditions = models.JSONField(default=dict, blank=True)
    # Exclusive claim on the tenant's desired state (reconciler run or apply), with a lease.
    claimed_by = models.CharField(max_length=64, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    next_run_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_duration_ms = models.PositiveIntegerField(null=True, blank=True)
    failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__name"]
        indexes = [models.Index(fields=["mode", "next_run_at"], name="desired_state_due")]

    def __str__(self) -> str:
        return f"desired state of {self.tenant_id} ({self.mode})"

    def condition(self, kind: str) -> dict[str, Any] | None:
        """The condition of type ``kind`` (Ready, Drifted, Degraded, Flapping), if recorded."""
        return next((c for c in self.conditions if c.get("type") == kind), None)


class ImmutableRevision(Exception):
    """A stored revision was about to be changed; revisions are append-only."""


class DesiredRevision(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="desired_revisions")
    number = models.PositiveIntegerField()
    text = models.TextField()
    sha256 = models.CharField(max_length=64)
    message = models.CharField(max_length=500, blank=True)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    author_label = models.CharField(max_length=200, blank=True)
    # Set when the revision was made by a rollback: the number it copies.
    rolled_back_from = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "number"], name="desired_revision_unique_number"),
        ]

    def __str__(self) -> str:
        return f"revision {self.number} of {self.tenant_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise ImmutableRevision(f"revision {self.number} is immutable; save a new one")
        super().save(*args, **kwargs)


class DesiredPlan(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="desired_plans")
    # None: a preview of a document that was not saved as a revision; it cannot be applied.
    revision = models.ForeignKey(
        DesiredRevision, null=True, blank=True, on_delete=models.CASCADE, related_name="plans"
    )
    plan = models.JSONField()
    observed_fingerprint = models.CharField(max_length=64)
    desired_fingerprint = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=PlanState.choices, default=PlanState.PLANNED)
    operation = models.ForeignKey(
        "portal.Operation", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    applied_at = models.DateTimeField(null=True, blank=True)
    # When the sweep last sent an interrupted apply again (at most once per lease).
    resume_requested_at = models.DateTimeField(null=True, blank=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="desired_plan_tenant_created")]

    def __str__(self) -> str:
        return f"plan {self.pk} ({self.state})"


class ResourceCorrection(models.Model):
    """One automatic correction of one resource by the reconciler: what the flap breaker counts."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=300)
    action = models.CharField(max_length=16)
    drift = models.CharField(max_length=16, blank=True)
    revision = models.PositiveIntegerField(null=True, blank=True)
    at = models.DateTimeField()

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "key", "at"]
        indexes = [models.Index(fields=["tenant", "at"], name="desired_correction_tenant_at")]

    def __str__(self) -> str:
        return f"{self.action} {self.key} at {self.at}"


__all__ = [
    "DesiredPlan",
    "DesiredRevision",
    "DesiredState",
    "ImmutableRevision",
    "PlanState",
    "ReconcileMode",
    "ResourceCorrection",
]
