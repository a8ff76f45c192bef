"""The host API's services for volume and backup work on a host (issue 16: the agent never writes the
database) and for resuming such work after its worker died (issue 17: kill points converge in seconds).

- `operation_work`: what a host needs to do one volume, snapshot or backup operation on its queue (pool
  names, sizes, manifests: server values), so the host reads no row itself.
- `report_backup`: claim (pending/running -> running), finish (the portal records the backup from its
  own copy of the manifest: every chunk must have reached it, and the chunk rows and sizes that quota
  counts are the portal's, not the host's word), fail.
- Chunks and manifests travel per backup: a host uploads only for a backup of a volume on it that runs
  (each checked by digest), and fetches only what the backup it restores into a volume on it names.
- `resume_operation`: a running operation of this host whose worker died (the agent saw its lock free)
  is queued again, up to `MAX_RESUMES` times; then it fails and its object becomes `failed`.

Everything else is a 404 audited as denied (`host.operation.read`, `host.backup.report`,
`host.backup_chunk.upload|fetch`, `host.backup_manifest.upload|fetch`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.db import transaction
from django.db.models import CharField
from django.db.models.functions import Cast

from backups import services
from backups.choices import BackupState
from backups.models import Backup
from compute.host_reports import _is_uuid, _refuse
from compute.models import Host
from imaging.store import DigestMismatch, NotFound
from portal import operations
from portal.errors import Invalid
from portal.models import Operation, OperationState
from tenants import audit
from tenants.actors import Actor
from volumes import host_reports as volume_reports
from volumes.choices import SnapshotState, VolumeState
from volumes.models import Snapshot, Volume

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_CHUNK_UPLOAD = 16 * 1024 * 1024
MAX_MANIFEST = 256 * 1024 * 1024
# A volume or backup operation whose worker died this many times is failed instead of queued again
# (a step that kills its worker every time must not loop for ever).
MAX_RESUMES = 3
RESUME_LIMIT_REACHED = (
    "The host's worker stopped during this operation {times} times; it was not tried again."
)

VOLUME_OPERATION_KINDS = (
    "volume.create",
    "volume.resize",
    "volume.delete",
    "snapshot.create",
    "snapshot.restore",
    "snapshot.clone",
    "snapshot.delete",
)
BACKUP_OPERATION_KINDS = ("backup.create", "backup.restore")


def _task_of(kind: str) -> Any:
    from compute.host import volume_tasks

    return {
        "volume.create": volume_tasks.create_volume,
        "volume.resize": volume_tasks.resize_volume,
        "volume.delete": volume_tasks.delete_volume,
        "snapshot.create": volume_tasks.snapshot_volume,
        "snapshot.restore": volume_tasks.restore_snapshot,
        "snapshot.clone": volume_tasks.clone_snapshot,
        "snapshot.delete": volume_tasks.delete_snapshot,
        "backup.create": volume_tasks.run_backup,
        "backup.restore": volume_tasks.restore_backup,
    }[kind]


# ---------------------------------------------------------------------------------------- operations
def _operation_on(host: Host, op_id: Any, action: str) -> Operation:
    op = (
        Operation.objects.filter(
            pk=op_id, queue=host.queue, kind__in=VOLUME_OPERATION_KINDS + BACKUP_OPERATION_KINDS
        ).first()
        if _is_uuid(op_id)
        else None
    )
    if op is None:
        raise _refuse(host, action, "No such operation on this host.", operation=str(op_id)[:80])
    return op


def volume_operations(host: Host) -> list[dict[str, Any]]:
    """The host's running volume and backup operations (the agent checks which lost their worker)."""
    running = Operation.objects.filter(
        queue=host.queue,
        state=OperationState.RUNNING,
        kind__in=VOLUME_OPERATION_KINDS + BACKUP_OPERATION_KINDS,
    ).values_list("pk", "kind")
    return [{"id": str(pk), "kind": kind} for pk, kind in running]


def operation_work(host: Host, op_id: Any) -> dict[str, Any]:
    """What the host needs to do the operation: its objects as server values, read here."""
    op = _operation_on(host, op_id, "host.operation.read")
    work: dict[str, Any] = {"operation": str(op.pk), "kind": op.kind}
    volumes = Volume.objects.filter(host=host)
    if op.kind in ("snapshot.create", "snapshot.restore", "snapshot.delete"):
        snap = Snapshot.objects.select_related("volume").filter(pk=op.target_id, volume__host=host).first()
        work["snapshot"] = volume_reports.snapshot_view(snap) if snap is not None else None
        work["volume"] = volume_reports.volume_view(snap.volume) if snap is not None else None
    elif op.kind == "backup.create":
        backup = Backup.objects.select_related("volume", "snapshot").filter(pk=op.target_id).first()
        volume = backup.volume if backup is not None and backup.volume is not None else None
        if volume is not None and volume.host_id != host.pk:
            volume = None
        work["volume"] = volume_reports.volume_view(volume) if volume is not None else None
        work["backup"] = _backup_work(backup) if backup is not None else None
    else:
        volume = volumes.filter(pk=op.target_id).first() if _is_uuid(op.target_id) else None
        work["volume"] = volume_reports.volume_view(volume) if volume is not None else None
        if op.kind == "volume.delete" and volume is not None:
            work["snapshots"] = [s.pool_name for s in Snapshot.objects.filter(volume=volume)]
        if op.kind == "snapshot.clone":
            source = op.params.get("snapshot")
            snap = Snapshot.objects.filter(pk=source, volume__host=host).first() if _is_uuid(source) else None
            work["snapshot"] = volume_reports.snapshot_view(snap) if snap is not None else None
        if op.kind == "backup.restore":
            source = op.params.get("backup")
            backup = (
                Backup.objects.filter(pk=source, state=BackupState.READY).first()
                if _is_uuid(source)
                else None
            )
            work["backup"] = (
                {"id": str(backup.pk), "manifest": backup.manifest, "source_bytes": backup.source_bytes}
                if backup is not None
                else None
            )
    return work


def temporary_snapshot_name(backup_id: Any) -> str:
    """The pool name of the snapshot a backup of a live volume reads (server-generated)."""
    return f"snap-{uuid.UUID(str(backup_id)).hex}"


def _backup_work(backup: Backup) -> dict[str, Any]:
    stale = Backup.objects.filter(
        volume=backup.volume, state=BackupState.FAILED, snapshot__isnull=True
    ).values_list("pk", flat=True)
    return {
        "id": str(backup.pk),
        "state": backup.state,
        "snapshot_pool_name": backup.snapshot.pool_name if backup.snapshot is not None else None,
        "temporary_snapshot": temporary_snapshot_name(backup.pk),
        "previous_manifest": services.previous_manifest(backup),
        "stale_snapshots": [temporary_snapshot_name(pk) for pk in stale],
    }


def resume_operation(*, actor: Actor, host: Host, op_id: Any) -> dict[str, Any]:
    """A running operation of this host whose worker died (the host saw its lock free): queued again,
    or failed once it was resumed `MAX_RESUMES` times (its object then becomes `failed`)."""
    op = _operation_on(host, op_id, "host.operation.report")
    with transaction.atomic():
        locked = Operation.objects.select_for_update().filter(pk=op.pk, state=OperationState.RUNNING).first()
        if locked is None:
            return {"resumed": False, "failed": False, "state": op.state}
        times = int(locked.params.get("resumed", 0))
        if times >= MAX_RESUMES:
            message = RESUME_LIMIT_REACHED.format(times=times + 1)
            transaction.on_commit(lambda: operations.fail(op.pk, message))
            _fail_objects(locked, message)
            audit.record(
                actor, "host.operation.abandoned", locked, tenant=locked.tenant, details={"kind": op.kind}
            )
            return {"resumed": False, "failed": True, "state": OperationState.FAILED}
        Operation.objects.filter(pk=op.pk).update(
            state=OperationState.QUEUED, params={**locked.params, "resumed": times + 1}
        )
        operations.log_step(op.pk, "requeued", locked.progress, "The host's worker stopped; queued again.")
        task, queue = _task_of(op.kind), host.queue
        transaction.on_commit(lambda: operations.send(task, str(op.pk), queue))
        audit.record(actor, "host.operation.resume", locked, tenant=locked.tenant, details={"kind": op.kind})
    return {"resumed": True, "failed": False, "state": OperationState.QUEUED}


def _fail_objects(op: Operation, message: str) -> None:
    """The objects of an operation that will not run again: in a state the tenant can act on."""
    if op.kind == "backup.create":
        services.fail_backup(op.target_id, message)
    elif op.kind == "snapshot.create":
        Snapshot.objects.filter(pk=op.target_id, state=SnapshotState.CREATING).update(
            state=SnapshotState.FAILED, status_message=message[:500]
        )
    elif op.kind in ("snapshot.restore",):
        snap = Snapshot.objects.filter(pk=op.target_id).first()
        if snap is not None:
            Volume.objects.filter(pk=snap.volume_id, state=VolumeState.RESTORING).update(
                state=VolumeState.FAILED, status_message=message[:500]
            )
    elif op.kind != "snapshot.delete" and _is_uuid(op.target_id):
        Volume.objects.filter(
            pk=op.target_id, state__in=[VolumeState.CREATING, VolumeState.RESIZING, VolumeState.RESTORING]
        ).update(state=VolumeState.FAILED, status_message=message[:500])


# ---------------------------------------------------------------------------------------- backups
def _backup_on(host: Host, backup_id: Any, action: str, *, running: bool = True) -> Backup:
    """A backup of a volume on `host` (running, when asked) with its backup.create operation open."""
    backup = (
        Backup.objects.select_related("tenant", "volume").filter(pk=backup_id, volume__host=host).first()
        if _is_uuid(backup_id)
        else None
    )
    open_op = (
        backup is not None
        and Operation.objects.filter(
            kind="backup.create", target_id=str(backup.pk), queue=host.queue, finished_at__isnull=True
        ).exists()
    )
    if backup is None or not open_op or (running and backup.state != BackupState.RUNNING):
        raise _refuse(host, action, "No such backup under way on this host.", backup=str(backup_id)[:80])
    return backup


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 62:
        raise Invalid(f"{field} is a whole non-negative number.", field=field)
    return value


def report_backup(*, actor: Actor, host: Host, backup_id: Any, event: Any, **fields: Any) -> dict[str, Any]:
    """`claim`, `finish` {result: manifest, files, source_bytes, new_bytes, bytes_read}, `fail` {message}."""
    if event == "claim":
        backup = _backup_on(host, backup_id, "host.backup.report", running=False)
        return {"claimed": services.claim_backup(backup.pk)}
    backup = _backup_on(host, backup_id, "host.backup.report")
    if event == "fail":
        message = fields.get("message", "")
        services.fail_backup(backup.pk, message[:500] if isinstance(message, str) else "")
        return {"state": BackupState.FAILED}
    if event != "finish":
        raise Invalid("event is claim, finish or fail.", field="event")
    result = fields.get("result")
    if not isinstance(result, dict):
        raise Invalid("result is an object.", field="result")
    manifest = result.get("manifest")
    if not isinstance(manifest, str) or not DIGEST.match(manifest):
        raise Invalid("result.manifest is a sha256 digest.", field="result")
    store = services.backup_store()
    try:
        missing = store.missing_chunks(manifest)
    except NotFound:
        raise Invalid("The backup's manifest has not reached the portal.", field="result") from None
    if missing:
        raise Invalid(f"{len(missing)} chunks of the backup have not reached the portal.", field="result")
    finished = services.finish_backup(
        backup.pk,
        services.HostBackupFigures(
            manifest=manifest,
            files=_int(result.get("files", 0), "files"),
            source_bytes=_int(result.get("source_bytes", 0), "source_bytes"),
            new_bytes=_int(result.get("new_bytes", 0), "new_bytes"),
            bytes_read=_int(result.get("bytes_read", 0), "bytes_read"),
        ),
        # Sizes as the portal's store holds them (what `backup_bytes` counts), not as the manifest says.
        [
            (digest, length, store.chunk_path(digest).stat().st_size)
            for digest, length, _ in store.chunks(manifest)
        ],
    )
    return {
        "state": finished.state,
        "stored_bytes": finished.stored_bytes,
        "dedup_ratio": finished.dedup_ratio,
    }


def backup_missing(*, actor: Actor, host: Host, backup_id: Any, manifest: Any, chunks: Any) -> dict[str, Any]:
    """Which of these chunks (and whether the manifest) the portal lacks, for a backup under way here."""
    _backup_on(host, backup_id, "host.backup_chunk.upload")
    if not isinstance(chunks, list) or len(chunks) > 50_000 or not all(isinstance(c, str) for c in chunks):
        raise Invalid("chunks is a list of at most 50,000 digests.", field="chunks")
    if not isinstance(manifest, str) or not DIGEST.match(manifest):
        raise Invalid("manifest is a sha256 digest.", field="manifest")
    store = services.backup_store()
    try:
        store.manifest_bytes(manifest)
        manifest_missing = False
    except NotFound:
        manifest_missing = True
    return {
        "missing": [c for c in chunks if DIGEST.match(c) and not store.chunk_path(c).is_file()],
        "manifest": manifest_missing,
    }


def put_backup_chunk(
    *, actor: Actor, host: Host, backup_id: Any, digest: Any, length: Any, data: bytes
) -> bool:
    """A chunk's zstd frame for a backup under way on this host; kept only if it inflates to `length`
    bytes hashing to `digest` (else refused, audited, nothing kept)."""
    from imaging.store import LimitExceeded

    _backup_on(host, backup_id, "host.backup_chunk.upload")
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise Invalid("Not a chunk digest.", field="digest")
    try:
        size = int(length)
    except (TypeError, ValueError):
        raise Invalid("length is the chunk's uncompressed size.", field="length") from None
    if len(data) > MAX_CHUNK_UPLOAD:
        raise Invalid("The chunk is too large.", field="length")
    try:
        return services.backup_store().add_chunk(digest, size, data)
    except (DigestMismatch, LimitExceeded, ValueError):
        audit.record_denied(actor, "host.backup_chunk.upload", digest=digest, host=host.name)
        raise Invalid("The chunk does not match its digest.") from None


def put_backup_manifest(*, actor: Actor, host: Host, backup_id: Any, manifest: Any, data: bytes) -> None:
    """The manifest of a backup under way here; kept only if it is valid and hashes to its name."""
    _backup_on(host, backup_id, "host.backup_manifest.upload")
    if not isinstance(manifest, str) or not DIGEST.match(manifest) or len(data) > MAX_MANIFEST:
        raise Invalid("Not a manifest digest.", field="manifest")
    try:
        stored = services.backup_store().put_manifest(data)
    except Exception:
        audit.record_denied(actor, "host.backup_manifest.upload", digest=manifest, host=host.name)
        raise Invalid("The manifest is not valid.") from None
    if stored != manifest:
        audit.record_denied(actor, "host.backup_manifest.upload", digest=manifest, host=host.name)
        raise Invalid("The manifest does not match its digest.")


def _restoring_here(host: Host, backup_id: Any, action: str, **details: Any) -> Backup:
    """A ready backup that a running restore into a volume on `host` reads."""
    backup = (
        Backup.objects.filter(pk=backup_id, state=BackupState.READY).first() if _is_uuid(backup_id) else None
    )
    restoring = (
        backup is not None
        and Operation.objects.filter(
            kind="backup.restore",
            queue=host.queue,
            params__backup=str(backup.pk),
            finished_at__isnull=True,
            target_id__in=Volume.objects.filter(host=host, state=VolumeState.RESTORING)
            .annotate(text_id=Cast("pk", CharField()))
            .values("text_id"),
        ).exists()
    )
    if backup is None or not restoring:
        raise _refuse(
            host, action, "No such backup being restored on this host.", backup=str(backup_id)[:80], **details
        )
    return backup


def backup_manifest(*, actor: Actor, host: Host, backup_id: Any) -> bytes:
    backup = _restoring_here(host, backup_id, "host.backup_manifest.fetch")
    return services.backup_store().manifest_bytes(backup.manifest)


def backup_chunk_path(*, actor: Actor, host: Host, backup_id: Any, digest: Any) -> Any:
    """The chunk's file, only if the backup restored on this host names it."""
    backup = _restoring_here(host, backup_id, "host.backup_chunk.fetch", digest=str(digest)[:80])
    named = (
        isinstance(digest, str) and DIGEST.match(digest) and backup.chunk_rows.filter(digest=digest).exists()
    )
    path = services.backup_store().chunk_path(digest) if named else None
    if path is None or not path.is_file():
        raise _refuse(
            host, "host.backup_chunk.fetch", "No such chunk in this backup.", digest=str(digest)[:80]
        )
    return path
