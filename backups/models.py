"""Deduplicated backups of volumes (issue 17).

A Backup is a manifest (by digest) in the portal's backup store (imaging.store.BackupStore under
BULKHEAD_BACKUP_DIR): the volume's tree with each file's content-defined chunks, each chunk stored
once for every backup of every tenant. BackupChunk rows say which chunks a backup uses, so the
`backup_bytes` quota counts a chunk shared by a tenant's backups once. A BackupSchedule makes one
backup of a volume every `every_hours` and keeps the last `keep_last`. Rows change only through
backups.services.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models

from backups.choices import BackupState
from portal.permissions import TenantOwnedQuerySet


class BackupQuerySet(TenantOwnedQuerySet):
    pass


class Backup(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="backups")
    # A backup outlives its volume (restoring a deleted volume is the point); the names stay.
    volume = models.ForeignKey(
        "volumes.Volume", null=True, blank=True, on_delete=models.SET_NULL, related_name="backups"
    )
    volume_name = models.CharField(max_length=63)
    volume_size_bytes = models.PositiveBigIntegerField(default=0)
    snapshot = models.ForeignKey(
        "volumes.Snapshot", null=True, blank=True, on_delete=models.SET_NULL, related_name="backups"
    )
    snapshot_name = models.CharField(max_length=63, blank=True)
    schedule = models.ForeignKey(
        "backups.BackupSchedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="backups"
    )
    state = models.CharField(max_length=16, choices=BackupState.choices, default=BackupState.PENDING)
    status_message = models.CharField(max_length=500, blank=True)
    manifest = models.CharField(max_length=71, blank=True)
    files = models.PositiveBigIntegerField(default=0)
    # Bytes of the volume's files; compressed bytes of the backup's distinct chunks; compressed bytes
    # this backup added to the store (what was new); bytes read from the volume.
    source_bytes = models.PositiveBigIntegerField(default=0)
    stored_bytes = models.PositiveBigIntegerField(default=0)
    new_bytes = models.PositiveBigIntegerField(default=0)
    bytes_read = models.PositiveBigIntegerField(default=0)
    chunks = models.PositiveIntegerField(default=0)
    verified_at = models.DateTimeField(null=True, blank=True)
    verify_bad_chunks = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = BackupQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["volume", "state", "-created_at"])]

    def __str__(self) -> str:
        return (
            f"backup of {self.volume_name} at {self.created_at:%Y-%m-%d %H:%M}"
            if self.created_at
            else "backup"
        )

    @property
    def dedup_ratio(self) -> float | None:
        """Volume bytes per byte this backup added to the store (None when it added nothing)."""
        return round(self.source_bytes / self.new_bytes, 1) if self.new_bytes else None

    def as_event(self) -> dict[str, Any]:
        return {
            "type": "backup",
            "id": str(self.pk),
            "volume": self.volume_name,
            "state": self.state,
            "stored_bytes": self.stored_bytes,
            "new_bytes": self.new_bytes,
        }


class BackupChunk(models.Model):
    """A chunk a ready backup uses, with its stored (compressed) size."""

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="chunk_rows")
    digest = models.CharField(max_length=71, db_index=True)
    stored_bytes = models.PositiveBigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["backup", "digest"], name="backup_chunk_once")]

    def __str__(self) -> str:
        return self.digest


class BackupScheduleQuerySet(TenantOwnedQuerySet):
    pass


class BackupSchedule(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="backup_schedules")
    volume = models.OneToOneField("volumes.Volume", on_delete=models.CASCADE, related_name="backup_schedule")
    every_hours = models.PositiveIntegerField(default=24)
    keep_last = models.PositiveIntegerField(default=7)
    enabled = models.BooleanField(default=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = BackupScheduleQuerySet.as_manager()

    class Meta:
        ordering = ["volume__name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(every_hours__gte=1), name="schedule_every_hour_or_more"
            ),
            models.CheckConstraint(condition=models.Q(keep_last__gte=1), name="schedule_keeps_one_or_more"),
        ]

    def __str__(self) -> str:
        return f"backups of {self.volume} every {self.every_hours} h"
