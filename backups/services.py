"""Backup services: the only code that creates, finishes, restores, verifies, exports and deletes backups.

Each runs in one transaction: checks under the volume's (or the tenant quota's) row lock, the rows, an
Operation, an audit entry; the work is sent on commit: a backup to the volume's host queue (it reads the
volume's directory there), a restore to the new volume's host queue, verify and export to the portal's
queue (`default`, where the backup store is). Refusals raise ServiceErrors with an `audit_action`,
audited after the rollback.

Quota `backup_bytes`: the compressed bytes of the distinct chunks the tenant's ready backups use (a
chunk shared by many of its backups counts once). A backup's size is known only when it is done, so a
new backup is refused while the tenant is at or over its limit, and the usage is recounted under the
quota row lock whenever a backup finishes or is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import CharField
from django.db.models.functions import Cast
from django.utils import timezone

from backups.choices import BackupState
from backups.models import Backup, BackupChunk, BackupSchedule
from imaging.store import BackupResult, BackupStore
from portal import events, operations
from portal.errors import Conflict, Invalid
from portal.models import Operation, OperationState
from tenants import audit
from tenants.actors import Actor
from tenants.models import Quota, Tenant
from tenants.quota import QuotaExceeded
from volumes import services as volume_services
from volumes.choices import SnapshotState, VolumeState
from volumes.models import GIB, Snapshot, Volume

PORTAL_QUEUE = "default"
MAX_KEEP = 1000


def backup_store() -> BackupStore:
    """The portal's backup store."""
    return BackupStore(settings.BULKHEAD_BACKUP_DIR)


def _publish(backup_id: Any) -> None:
    fresh = Backup.objects.filter(pk=backup_id).first()
    if fresh is not None:
        events.publish(fresh.tenant_id, fresh.as_event())


# ---------------------------------------------------------------------------------------- quota
def tenant_backup_bytes(tenant: Tenant) -> int:
    """Compressed bytes of the distinct chunks of the tenant's ready backups."""
    rows = BackupChunk.objects.filter(backup__tenant=tenant, backup__state=BackupState.READY)
    return sum(dict(rows.values_list("digest", "stored_bytes")).values())


def recount_backup_bytes(tenant: Tenant) -> int:
    """Set the tenant's `used_backup_bytes` to what its backups use now, under the quota row lock."""
    with transaction.atomic():
        quota = Quota.objects.select_for_update().get(tenant=tenant)
        used = tenant_backup_bytes(tenant)
        Quota.objects.filter(pk=quota.pk).update(used_backup_bytes=used)
    return used


def _check_room(tenant: Tenant) -> None:
    quota = Quota.objects.select_for_update().get(tenant=tenant)
    if quota.used_backup_bytes >= quota.backup_bytes:
        raise QuotaExceeded("backup_bytes", 1, quota.used_backup_bytes, quota.backup_bytes)


# ---------------------------------------------------------------------------------------- backup
@audit.denials_audited
@transaction.atomic
def create_backup(
    *,
    actor: Actor,
    volume: Volume,
    snapshot: Snapshot | None = None,
    schedule: BackupSchedule | None = None,
) -> Operation:
    """Back up a volume (through a temporary snapshot, so the copy is of one moment) or one of its
    snapshots. Runs on the volume's host; only new chunks are written."""
    from compute.host import volume_tasks

    locked = Volume.objects.select_for_update(of=("self",)).select_related("host", "tenant").get(pk=volume.pk)
    if locked.state != VolumeState.READY:
        raise Conflict(f"The volume {locked.name} is {locked.state}.", audit_action="backup.create")
    if snapshot is not None:
        if snapshot.volume_id != locked.pk:
            raise Invalid("No such snapshot of this volume.", field="snapshot")
        if snapshot.state != SnapshotState.READY:
            raise Conflict(f"The snapshot {snapshot.name} is {snapshot.state}.", audit_action="backup.create")
    if Backup.objects.filter(volume=locked, state__in=[BackupState.PENDING, BackupState.RUNNING]).exists():
        raise Conflict(f"A backup of {locked.name} is under way.", audit_action="backup.create")
    _check_room(locked.tenant)
    backup = Backup.objects.create(
        tenant=locked.tenant,
        volume=locked,
        volume_name=locked.name,
        volume_size_bytes=locked.size_bytes,
        snapshot=snapshot,
        snapshot_name=snapshot.name if snapshot is not None else "",
        schedule=schedule,
    )
    audit.record(
        actor,
        "backup.create",
        backup,
        details={"volume": locked.name, "snapshot": backup.snapshot_name, "scheduled": schedule is not None},
    )
    return operations.start(
        kind="backup.create",
        task=volume_tasks.run_backup,
        actor=actor,
        tenant=locked.tenant,
        target=backup,
        queue=locked.host.queue,
    )


def previous_manifest(backup: Backup) -> str | None:
    """The newest ready backup of the same volume: its unchanged files are not read again."""
    if backup.volume_id is None:
        return None
    previous = (
        Backup.objects.filter(volume_id=backup.volume_id, state=BackupState.READY)
        .exclude(pk=backup.pk)
        .exclude(manifest="")
        .order_by("-created_at")
        .first()
    )
    return previous.manifest if previous is not None else None


def claim_backup(backup_id: Any) -> bool:
    """pending -> running (a rerun after a lost worker finds it running and goes on)."""
    claimed = Backup.objects.filter(
        pk=backup_id, state__in=[BackupState.PENDING, BackupState.RUNNING]
    ).update(state=BackupState.RUNNING)
    _publish(backup_id)
    return bool(claimed)


@dataclass(frozen=True)
class HostBackupFigures:
    """What a host reports of a finished backup. The chunks, their sizes and the stored bytes are read
    from the portal's own copy of the manifest, never taken from the host."""

    manifest: str
    files: int
    source_bytes: int
    new_bytes: int
    bytes_read: int


def finish_backup(
    backup_id: Any, result: HostBackupFigures | BackupResult, chunks: list[tuple[str, int, int]]
) -> Backup:
    """Record a finished backup and its chunks (as the portal's store lists them), recount the tenant's
    backup bytes, prune its schedule."""
    with transaction.atomic():
        backup = (
            Backup.objects.select_for_update(of=("self",))
            .select_related("tenant", "schedule")
            .get(pk=backup_id)
        )
        if backup.state != BackupState.RUNNING:
            return backup
        BackupChunk.objects.filter(backup=backup).delete()
        BackupChunk.objects.bulk_create(
            [BackupChunk(backup=backup, digest=d, stored_bytes=stored) for d, _, stored in chunks],
            batch_size=5000,
        )
        Backup.objects.filter(pk=backup.pk).update(
            state=BackupState.READY,
            manifest=result.manifest,
            files=result.files,
            source_bytes=result.source_bytes,
            stored_bytes=sum({digest: stored for digest, _, stored in chunks}.values()),
            new_bytes=result.new_bytes if isinstance(result, HostBackupFigures) else result.new_chunk_bytes,
            bytes_read=result.bytes_read,
            chunks=len({digest for digest, _, _ in chunks}),
            finished_at=timezone.now(),
            status_message="",
        )
    recount_backup_bytes(backup.tenant)
    if backup.schedule is not None:
        prune_schedule(backup.schedule)
    _publish(backup_id)
    backup.refresh_from_db()
    return backup


def fail_backup(backup_id: Any, message: str) -> None:
    Backup.objects.filter(pk=backup_id, state__in=[BackupState.PENDING, BackupState.RUNNING]).update(
        state=BackupState.FAILED, status_message=message[:500], finished_at=timezone.now()
    )
    _publish(backup_id)


@audit.denials_audited
def delete_backup(*, actor: Actor, backup: Backup) -> None:
    """Forget a backup; its chunks go when no backup uses them (`collect_garbage`)."""
    with transaction.atomic():
        locked = Backup.objects.select_for_update().get(pk=backup.pk)
        if locked.state in (BackupState.PENDING, BackupState.RUNNING):
            raise Conflict(
                "The backup is under way; delete it when it is done.", audit_action="backup.delete"
            )
        audit.record(actor, "backup.delete", locked, details={"volume": locked.volume_name})
        locked.delete()
    recount_backup_bytes(backup.tenant)
    events.publish(backup.tenant_id, {"type": "backup", "id": str(backup.pk), "state": "deleted"})


def fail_abandoned() -> int:
    """Backups and restoring volumes whose operation ended without them (failed, cancelled, or lost
    with its host) become failed, so a new backup of the volume is not refused as "under way" forever
    and garbage collection is not held off. An operation whose worker was killed is handed back by its
    host's agent and converges (`compute.host.volumes.resume_interrupted`); this is for the operations
    that will never run again."""
    from django.db.models import Exists, OuterRef

    ended = Operation.objects.filter(finished_at__isnull=False).exclude(state=OperationState.SUCCEEDED)
    stuck = Backup.objects.filter(state__in=[BackupState.PENDING, BackupState.RUNNING]).filter(
        Exists(ended.filter(kind="backup.create", target_id=Cast(OuterRef("pk"), CharField())))
    )
    count = 0
    for backup_id in list(stuck.values_list("pk", flat=True)):
        fail_backup(backup_id, "The backup's operation ended before the backup did; start it again.")
        count += 1
    restoring = Volume.objects.filter(state=VolumeState.RESTORING).filter(
        Exists(ended.filter(kind="backup.restore", target_id=Cast(OuterRef("pk"), CharField())))
    )
    count += restoring.update(
        state=VolumeState.FAILED,
        status_message="The restore did not finish; delete this volume and restore again.",
    )
    return count


def collect_garbage() -> tuple[int, int] | None:
    """Remove chunks and manifests no backup uses. Skipped while any backup runs (it may be reusing a
    chunk that would look unused), so the next run does it."""
    fail_abandoned()
    if Backup.objects.filter(state__in=[BackupState.PENDING, BackupState.RUNNING]).exists():
        return None
    keep = list(Backup.objects.exclude(manifest="").values_list("manifest", flat=True).distinct())
    return backup_store().gc(keep)


# ---------------------------------------------------------------------------------------- restore
def _ready(backup: Backup, action: str) -> Backup:
    locked = Backup.objects.select_for_update().select_related("tenant").get(pk=backup.pk)
    if locked.state != BackupState.READY:
        raise Conflict(f"The backup is {locked.state}.", audit_action=action)
    return locked


@audit.denials_audited
@transaction.atomic
def restore_backup(
    *, actor: Actor, backup: Backup, name: str, size_gib: Any = None, host: Any = None
) -> Operation:
    """A new volume holding what the backup holds, on any host with room (or the one an operator
    names); charged like a new volume. The host fetches the chunks it lacks through the portal."""
    from compute.host import volume_tasks

    locked = _ready(backup, "backup.restore")
    size = (
        volume_services._size_bytes(size_gib) if size_gib is not None else max(locked.volume_size_bytes, GIB)
    )
    volume_services._check_name(name)
    if Volume.objects.filter(tenant=locked.tenant, name=name).exists():
        raise Conflict(f"A volume named {name!r} exists in this tenant.", field="name")
    from tenants import quota

    quota.allocate(locked.tenant, volume_bytes=size)
    chosen = volume_services._place_volume(size, host)
    volume = Volume.objects.create(
        tenant=locked.tenant, name=name, host=chosen, size_bytes=size, state=VolumeState.RESTORING
    )
    audit.record(
        actor,
        "backup.restore",
        volume,
        details={"backup": str(locked.pk), "from_volume": locked.volume_name, "host": chosen.name},
    )
    return operations.start(
        kind="backup.restore",
        task=volume_tasks.restore_backup,
        actor=actor,
        tenant=locked.tenant,
        target=volume,
        queue=chosen.queue,
        params={"backup": str(locked.pk)},
    )


# ---------------------------------------------------------------------------------------- verify, export
@audit.denials_audited
@transaction.atomic
def verify_backup(*, actor: Actor, backup: Backup) -> Operation:
    """Re-hash every chunk of the backup in the portal's store."""
    from backups import tasks

    locked = _ready(backup, "backup.verify")
    audit.record(actor, "backup.verify", locked)
    return operations.start(
        kind="backup.verify",
        task=tasks.verify_backup,
        actor=actor,
        tenant=locked.tenant,
        target=locked,
        queue=PORTAL_QUEUE,
    )


def record_verify(backup_id: Any, bad: int) -> None:
    Backup.objects.filter(pk=backup_id).update(verified_at=timezone.now(), verify_bad_chunks=bad)
    _publish(backup_id)


def export_path(op_id: Any) -> Any:
    return settings.BULKHEAD_BACKUP_DIR / "exports" / f"{op_id}.tar.zst"


@audit.denials_audited
@transaction.atomic
def export_backup(*, actor: Actor, backup: Backup) -> Operation:
    """Write the backup as one tar.zst for download (kept a day)."""
    from backups import tasks

    locked = _ready(backup, "backup.export")
    audit.record(actor, "backup.export", locked)
    return operations.start(
        kind="backup.export",
        task=tasks.export_backup,
        actor=actor,
        tenant=locked.tenant,
        target=locked,
        queue=PORTAL_QUEUE,
    )


def remove_old_exports(max_age: timedelta = timedelta(days=1)) -> int:
    directory = settings.BULKHEAD_BACKUP_DIR / "exports"
    removed = 0
    if directory.is_dir():
        cutoff = (timezone.now() - max_age).timestamp()
        for p in directory.iterdir():
            if p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------- schedules
@audit.denials_audited
@transaction.atomic
def set_schedule(
    *, actor: Actor, volume: Volume, every_hours: Any = 24, keep_last: Any = 7, enabled: bool = True
) -> BackupSchedule:
    """Back the volume up every `every_hours` (1..720), keeping the last `keep_last` (1..1000)."""
    try:
        every, keep = int(every_hours), int(keep_last)
    except (TypeError, ValueError):
        raise Invalid("every_hours and keep_last are whole numbers.") from None
    if not 1 <= every <= 720:
        raise Invalid("every_hours must be between 1 and 720.", field="every_hours")
    if not 1 <= keep <= MAX_KEEP:
        raise Invalid(f"keep_last must be between 1 and {MAX_KEEP}.", field="keep_last")
    schedule, _ = BackupSchedule.objects.update_or_create(
        volume=volume,
        defaults={"tenant": volume.tenant, "every_hours": every, "keep_last": keep, "enabled": bool(enabled)},
    )
    audit.record(
        actor,
        "backup.schedule",
        volume,
        details={"every_hours": every, "keep_last": keep, "enabled": enabled},
    )
    return schedule


def delete_schedule(*, actor: Actor, schedule: BackupSchedule) -> None:
    with transaction.atomic():
        audit.record(actor, "backup.schedule.delete", schedule.volume)
        schedule.delete()


def run_due_schedules(now: Any = None) -> list[str]:
    """Start a backup for every enabled schedule that is due (beat runs this every few minutes)."""
    now = now or timezone.now()
    fail_abandoned()
    started = []
    for schedule in BackupSchedule.objects.filter(enabled=True).select_related("volume__host", "tenant"):
        if (
            schedule.last_run_at is not None
            and schedule.last_run_at + timedelta(hours=schedule.every_hours) > now
        ):
            continue
        # Claim the run first: two beats (or a slow one) start it once.
        claimed = BackupSchedule.objects.filter(pk=schedule.pk, last_run_at=schedule.last_run_at).update(
            last_run_at=now
        )
        if not claimed:
            continue
        try:
            op = create_backup(
                actor=Actor.system("backup schedule"), volume=schedule.volume, schedule=schedule
            )
        except Exception as exc:  # refused (busy volume, quota): audited by the service; next period
            started.append(f"{schedule.volume.name}: {exc}")
            continue
        started.append(str(op.pk))
    return started


def prune_schedule(schedule: BackupSchedule) -> int:
    """Delete the schedule's ready backups beyond its newest `keep_last`."""
    keep = list(
        Backup.objects.filter(schedule=schedule, state=BackupState.READY)
        .order_by("-created_at")
        .values_list("pk", flat=True)[: schedule.keep_last]
    )
    old = Backup.objects.filter(schedule=schedule, state=BackupState.READY).exclude(pk__in=keep)
    removed = 0
    for backup in old:
        delete_backup(actor=Actor.system("backup schedule"), backup=backup)
        removed += 1
    return removed
