"""The host side of backups (runs on the volume's host queue, `host.<id>`).

A backup reads the volume through a temporary read-only snapshot (one moment, while the workload may
keep writing) or through the snapshot the tenant chose, into the host's backup store
(BULKHEAD_BACKUP_DIR: on the portal's machine, the portal's store itself). A restore fetches the
manifest and every chunk its host lacks through the portal's host API with the host's own credential;
each is checked against its digest before it is kept, and the restore itself treats the manifest as
hostile (imaging/native/src/backup/restore.rs). Every step is idempotent: a task run again after its
worker was killed converges (a half-restored volume is deleted and made again).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from backups import services
from backups.choices import BackupState
from backups.models import Backup
from imaging.store import BackupStore, NotFound
from portal import events
from portal.errors import Explained
from volumes import agent as volume_agent
from volumes.choices import VolumeState
from volumes.models import Volume


class BackupUnavailable(Explained):
    """The portal refused or failed to hand this host a backup's manifest or chunk."""


def host_store() -> BackupStore:
    return BackupStore(settings.BULKHEAD_BACKUP_DIR)


def temporary_snapshot_name(backup: Backup) -> str:
    """The pool name of the snapshot a backup of a live volume reads (server-generated)."""
    return f"snap-{backup.pk.hex}"


def run_backup(backup: Backup, progress: Any) -> dict[str, Any]:
    if not services.claim_backup(backup.pk):
        return {"skipped": "backup finished or deleted"}
    volume = backup.volume
    if volume is None:
        services.fail_backup(backup.pk, "The volume was deleted before it was backed up.")
        return {"skipped": "volume deleted"}
    pool = volume_agent.pool_for(volume.host)
    store = host_store()
    # Snapshots left by backups of this volume that failed (a worker killed, an operation lost).
    for failed in Backup.objects.filter(volume=volume, state=BackupState.FAILED, snapshot__isnull=True):
        if pool.snapshot_exists(temporary_snapshot_name(failed)):
            pool.delete_snapshot(temporary_snapshot_name(failed))
    temporary = None
    if backup.snapshot is not None:
        source = pool.snapshot_path(backup.snapshot.pool_name)
    else:
        temporary = temporary_snapshot_name(backup)
        progress(3, "Taking a snapshot to back up", force=True)
        pool.snapshot(volume.pool_name, temporary)
        source = pool.snapshot_path(temporary)
    previous = services.previous_manifest(backup)
    if previous is not None:
        try:
            store.manifest_bytes(previous)
        except NotFound:
            previous = None
    total = max(volume.used_bytes, 1)
    try:
        result = store.backup(
            source,
            previous=previous,
            progress=lambda done: progress(5 + min(90.0, 90 * done / total), "Backing up"),
        )
    finally:
        if temporary is not None:
            pool.delete_snapshot(temporary)
    uploaded = upload_new(store, result.manifest, progress)
    progress(97, "Recording the backup", force=True)
    finished = services.finish_backup(backup.pk, result, store.chunks(result.manifest))
    return {
        "manifest": result.manifest,
        "source_bytes": result.source_bytes,
        "new_bytes": result.new_chunk_bytes,
        "stored_bytes": result.stored_bytes,
        "bytes_read": result.bytes_read,
        "dedup_ratio": finished.dedup_ratio,
        "uploaded_chunks": uploaded,
    }


def upload_new(store: BackupStore, manifest: str, progress: Any) -> int:
    """A host on another machine sends the portal the chunks it lacks, then the manifest (the portal
    checks each by digest). On the portal's own machine (no portal URL) the store is the portal's."""
    portal, credential = settings.BULKHEAD_PORTAL_URL, settings.BULKHEAD_HOST_CREDENTIAL
    if not portal or not credential:
        return 0
    import httpx

    chunks = {digest: length for digest, length, _stored in store.chunks(manifest)}
    uploaded = 0
    with httpx.Client(
        base_url=portal, headers={"Authorization": f"Bearer {credential}"}, timeout=60
    ) as client:
        names = list(chunks)
        missing: list[str] = []
        for start in range(0, len(names), 50_000):
            response = client.post(
                "/api/v1/hosts/backup-missing/", json={"chunks": names[start : start + 50_000]}
            )
            if response.status_code != 200:
                raise BackupUnavailable(f"The portal refused the backup's upload ({response.status_code}).")
            missing += response.json()["missing"]
        for number, digest in enumerate(missing, start=1):
            if number % 64 == 1:
                progress(95, f"Sending chunk {number} of {len(missing)} to the portal")
            response = client.put(
                f"/api/v1/hosts/backup-chunks/{digest}/",
                params={"length": chunks[digest]},
                content=store.chunk_path(digest).read_bytes(),
            )
            if response.status_code not in (200, 201):
                raise BackupUnavailable(f"The portal refused a chunk ({response.status_code}).")
            uploaded += 1
        response = client.put(
            f"/api/v1/hosts/backup-manifests/{manifest}/", content=store.manifest_bytes(manifest)
        )
        if response.status_code != 201:
            raise BackupUnavailable(f"The portal refused the backup's manifest ({response.status_code}).")
    return uploaded


def fetch_missing(store: BackupStore, manifest: str, progress: Any) -> int:
    """The manifest and chunks this host's store lacks, from the portal (checked by digest). Without a
    portal configured (the portal's own machine) nothing is fetched."""
    portal, credential = settings.BULKHEAD_PORTAL_URL, settings.BULKHEAD_HOST_CREDENTIAL
    if not portal or not credential:
        return 0
    import httpx

    fetched = 0
    with httpx.Client(
        base_url=portal, headers={"Authorization": f"Bearer {credential}"}, timeout=60
    ) as client:
        try:
            store.manifest_bytes(manifest)
        except NotFound:
            response = client.get(f"/api/v1/hosts/backup-manifests/{manifest}/")
            if response.status_code != 200:
                raise BackupUnavailable(
                    f"The portal did not hand out the backup's manifest ({response.status_code})."
                ) from None
            if store.put_manifest(response.content) != manifest:
                raise BackupUnavailable(
                    "The portal handed out a manifest that does not match its digest."
                ) from None
        missing = store.missing_chunks(manifest)
        for number, (digest, length, _stored) in enumerate(missing, start=1):
            if number % 64 == 1:
                progress(5 + 40 * number / len(missing), f"Fetching chunk {number} of {len(missing)}")
            response = client.get(f"/api/v1/hosts/backup-chunks/{digest}/")
            if response.status_code != 200:
                raise BackupUnavailable(
                    f"The portal did not hand out the chunk {digest} ({response.status_code})."
                )
            store.add_chunk(digest, length, response.content)  # DigestMismatch if it is not that chunk
            fetched += 1
    return fetched


def restore_backup(volume: Volume, backup: Backup, progress: Any) -> dict[str, Any]:
    pool = volume_agent.pool_for(volume.host)
    store = host_store()
    fetched = fetch_missing(store, backup.manifest, progress)
    progress(50, "Making the volume", force=True)
    if pool.exists(volume.pool_name):
        pool.delete(volume.pool_name)  # a restore cut short earlier: start again from empty
    pool.create(volume.pool_name, volume.size_bytes)
    total = max(backup.source_bytes, 1)
    restored = store.restore(
        backup.manifest,
        pool.volume_path(volume.pool_name),
        progress=lambda done: progress(50 + min(45.0, 45 * done / total), "Restoring"),
    )
    if Volume.objects.filter(pk=volume.pk, state=VolumeState.RESTORING).update(
        state=VolumeState.READY, status_message=""
    ):
        fresh = Volume.objects.get(pk=volume.pk)
        events.publish(fresh.tenant_id, fresh.as_event())
    volume_agent.refresh_usage(volume)
    return {
        "state": VolumeState.READY,
        "bytes": restored["bytes"],
        "files": restored["files"],
        "fetched_chunks": fetched,
    }
