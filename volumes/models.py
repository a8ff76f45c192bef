"""Volumes: a tenant's persistent data on one host's volume pool (issue 17).

A Volume is a directory on its host's pool with a kernel-enforced size limit (a btrfs subvolume with a
qgroup limit, see compute/runtimes/volume_pool.py); a VolumeAttachment puts it into one workload at a
path, as a bind mount (namespace container) or through virtiofs (micro-VM); a Snapshot is a read-only
copy of it at one moment (a read-only btrfs snapshot). Rows change only through volumes.services.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.db.models import Q

from portal.permissions import TenantOwnedQuerySet
from tenants.models import dns_label
from volumes.choices import SnapshotState, VolumeState

GIB = 1024**3


class VolumeQuerySet(TenantOwnedQuerySet):
    pass


class Volume(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="volumes")
    name = models.CharField(max_length=63, validators=[dns_label])
    # A volume lives on one host's pool; workloads that attach it are placed there.
    host = models.ForeignKey("compute.Host", on_delete=models.PROTECT, related_name="volumes")
    size_bytes = models.PositiveBigIntegerField()
    state = models.CharField(max_length=16, choices=VolumeState.choices, default=VolumeState.CREATING)
    status_message = models.CharField(max_length=500, blank=True)
    # What the pool reports the volume uses (the qgroup's referenced bytes), and when.
    used_bytes = models.PositiveBigIntegerField(default=0)
    used_at = models.DateTimeField(null=True, blank=True)
    # The snapshot a clone was made from (kept for the record; the snapshot may be gone).
    cloned_from = models.ForeignKey(
        "volumes.Snapshot", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones"
    )
    managed_revision = models.PositiveIntegerField(null=True, blank=True)
    managed_spec_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = VolumeQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="volume_unique_name_in_tenant"),
            models.CheckConstraint(condition=Q(size_bytes__gte=GIB), name="volume_size_minimum"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def size_gib(self) -> int:
        return self.size_bytes // GIB

    @property
    def pool_name(self) -> str:
        """The volume's directory name on its pool: server-generated, never user text."""
        return f"vol-{self.pk.hex}"

    def as_event(self) -> dict[str, Any]:
        return {
            "type": "volume",
            "id": str(self.pk),
            "name": self.name,
            "state": self.state,
            "size_bytes": self.size_bytes,
            "used_bytes": self.used_bytes,
        }


class VolumeAttachmentQuerySet(TenantOwnedQuerySet):
    tenant_path = "volume__tenant__"


class VolumeAttachment(models.Model):
    """A volume in a workload at `path`. At most one read-write attachment per volume."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    volume = models.ForeignKey(Volume, on_delete=models.PROTECT, related_name="attachments")
    workload = models.ForeignKey(
        "compute.Workload", on_delete=models.CASCADE, related_name="volume_attachments"
    )
    # Absolute path inside the workload (checked by volumes.paths.check_mount_path).
    path = models.CharField(max_length=255)
    read_only = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = VolumeAttachmentQuerySet.as_manager()

    class Meta:
        ordering = ["path"]
        constraints = [
            models.UniqueConstraint(fields=["workload", "path"], name="attachment_unique_path_in_workload"),
            models.UniqueConstraint(
                fields=["workload", "volume"], name="attachment_volume_once_per_workload"
            ),
            models.UniqueConstraint(
                fields=["volume"], condition=Q(read_only=False), name="attachment_one_writer_per_volume"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.volume} at {self.path}"


class SnapshotQuerySet(TenantOwnedQuerySet):
    tenant_path = "volume__tenant__"


class Snapshot(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    volume = models.ForeignKey(Volume, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=63, validators=[dns_label])
    state = models.CharField(max_length=16, choices=SnapshotState.choices, default=SnapshotState.CREATING)
    status_message = models.CharField(max_length=500, blank=True)
    # The volume's referenced bytes when the snapshot was taken.
    used_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = SnapshotQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["volume", "name"], name="snapshot_unique_name_in_volume"),
        ]

    def __str__(self) -> str:
        return f"{self.volume}@{self.name}"

    @property
    def tenant(self) -> Any:
        return self.volume.tenant

    @property
    def pool_name(self) -> str:
        return f"snap-{self.pk.hex}"

    def as_event(self) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "id": str(self.pk),
            "volume": str(self.volume_id),
            "name": self.name,
            "state": self.state,
        }
