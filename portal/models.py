"""Operation: the row every asynchronous action writes first; its id is the Celery task id."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from portal.permissions import TenantOwnedQuerySet


class OperationState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED_STATES = (OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED)


class Operation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=64)
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="operations"
    )
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_label = models.CharField(max_length=200, blank=True)
    state = models.CharField(max_length=16, choices=OperationState.choices, default=OperationState.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.CharField(max_length=500, blank=True)
    # What the tenant reads: their own error's text, or a generic one (portal.errors.tenant_message).
    error = models.TextField(blank=True)
    # Only operators read this: the real error (paths, runtime output) and figures about the shared
    # store (what was written, deduplicated) that would tell a tenant what others hold.
    operator_details = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=100, default="default")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Renewed while a worker runs it: a running operation whose heartbeat stopped lost its worker.
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="operation_tenant_created")]

    def __str__(self) -> str:
        return f"{self.kind} {self.target_label} ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def as_event(self) -> dict[str, object]:
        return {
            "type": "operation",
            "id": str(self.id),
            "kind": self.kind,
            "state": self.state,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "target_type": self.target_type,
            "target_id": self.target_id,
            "tenant": str(self.tenant_id) if self.tenant_id else None,
        }


class MetricSeries(models.Model):
    """The sampled figures of one workload, host or tenant: the latest raw sample (what /metrics serves)
    and a round-robin history of a fixed size (portal/rrd.py). Tenant-owned when it describes a tenant's
    object; host series have no tenant and only operators see them."""

    key = models.CharField(max_length=80, unique=True, help_text="<kind>:<object id>")
    kind = models.CharField(max_length=16)
    object_id = models.CharField(max_length=64)
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="metric_series"
    )
    latest = models.JSONField(default=dict, blank=True)
    sampled_at = models.DateTimeField(null=True, blank=True)
    header = models.JSONField(default=dict, blank=True)
    rings = models.BinaryField(default=b"")

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["kind", "object_id"], name="metric_series_object")]

    def __str__(self) -> str:
        return self.key


class OperationLogEntry(models.Model):
    """One step of an operation, kept for its log page: queued, started, each new progress message,
    and how it ended (the error itself stays on the operation, where its visibility is decided)."""

    operation = models.ForeignKey(Operation, on_delete=models.CASCADE, related_name="log_entries")
    at = models.DateTimeField(auto_now_add=True)
    event = models.CharField(max_length=16)  # queued, started, progress, succeeded, failed, cancelled
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["operation", "at", "pk"]
        indexes = [models.Index(fields=["operation", "at"], name="operation_log_order")]

    def __str__(self) -> str:
        return f"{self.operation_id} {self.event} {self.message[:40]}"
