"""The host side of backups (issue 16's boundary: no Django; the portal only through the link).

A backup reads the volume through a temporary read-only snapshot (one moment, while the workload may
keep writing) or through the snapshot the tenant chose, into the host's backup store, then sends the
portal the chunks it lacks and the manifest (each checked by digest there) and reports the figures; the
portal records the backup from its own copy of the manifest, not from the host's word. A restore fetches
the manifest and each chunk its store lacks through the host API (allowed only while that restore runs
on this host), checks each against its digest, and restores into a fresh volume; the restore treats the
manifest as hostile (imaging/native/src/backup/restore.rs).

Every step is idempotent: run again after its worker was killed (at any of the kill points below) a
backup reuses the temporary snapshot and every chunk already written; a restore deletes the half-made
volume and restores again.
"""

from __future__ import annotations

from typing import Any

from compute.host.volumes import PoolPlace, Progress, pool_for, refresh_usage
from imaging.store import BackupStore, NotFound
from portal.failpoints import failpoint


class BackupUnavailable(RuntimeError):
    """The portal refused or failed to take or hand over a backup's manifest or chunk (its text is
    written for the tenant)."""


def run_backup(
    link: Any, place: PoolPlace, store: BackupStore, work: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    backup, volume = work["backup"], work.get("volume")
    if backup is None:
        return {"skipped": "backup deleted"}
    if not link.report_backup(backup["id"], "claim").get("claimed"):
        return {"skipped": "backup finished or deleted"}
    if volume is None:
        link.report_backup(backup["id"], "fail", message="The volume was deleted before it was backed up.")
        return {"skipped": "volume deleted"}
    pool = pool_for(place)
    # Snapshots left by backups of this volume that failed (a worker killed, an operation lost).
    for leftover in backup.get("stale_snapshots") or []:
        pool.delete_snapshot(leftover)
    temporary = None
    if backup.get("snapshot_pool_name"):
        source = pool.snapshot_path(backup["snapshot_pool_name"])
    else:
        temporary = backup["temporary_snapshot"]
        progress(3, "Taking a snapshot to back up", force=True)
        pool.snapshot(volume["pool_name"], temporary)
        failpoint("backup.snapshot_taken")
        source = pool.snapshot_path(temporary)
    previous = backup.get("previous_manifest")
    if previous:
        try:
            store.manifest_bytes(previous)
        except NotFound:
            previous = None
    total = max(int(volume.get("used_bytes") or 0), 1)

    def reading(done: int) -> None:
        failpoint("backup.reading")
        progress(5 + min(90.0, 90 * done / total), "Backing up")

    try:
        result = store.backup(source, previous=previous or None, progress=reading)
    finally:
        if temporary is not None:
            pool.delete_snapshot(temporary)
    failpoint("backup.stored")
    uploaded = upload_new(link, store, backup["id"], result.manifest, progress)
    failpoint("backup.uploaded")
    progress(97, "Recording the backup", force=True)
    figures = {
        "manifest": result.manifest,
        "files": result.files,
        "source_bytes": result.source_bytes,
        "new_bytes": result.new_chunk_bytes,
        "bytes_read": result.bytes_read,
    }
    recorded = link.report_backup(backup["id"], "finish", result=figures)
    return {
        **figures,
        "stored_bytes": recorded.get("stored_bytes"),
        "dedup_ratio": recorded.get("dedup_ratio"),
        "uploaded_chunks": uploaded,
    }


def upload_new(link: Any, store: BackupStore, backup_id: str, manifest: str, progress: Progress) -> int:
    """Send the portal the chunks it lacks, then the manifest (the portal checks each by digest). On
    the portal's own machine the store is the portal's: nothing is missing."""
    chunks = {digest: length for digest, length, _stored in store.chunks(manifest)}
    names = list(chunks)
    missing: list[str] = []
    manifest_missing = False
    for start in range(0, max(len(names), 1), 50_000):
        answer = link.backup_missing(backup_id, manifest, names[start : start + 50_000])
        missing += answer["missing"]
        manifest_missing = manifest_missing or bool(answer["manifest"])
    for number, digest in enumerate(missing, start=1):
        if number % 64 == 1:
            progress(95, f"Sending chunk {number} of {len(missing)} to the portal")
        link.put_backup_chunk(backup_id, digest, chunks[digest], store.chunk_path(digest).read_bytes())
        failpoint("backup.uploading")
    if manifest_missing:
        link.put_backup_manifest(backup_id, manifest, store.manifest_bytes(manifest))
    return len(missing)


def fetch_missing(link: Any, store: BackupStore, backup: dict[str, Any], progress: Progress) -> int:
    """The manifest and chunks this host's store lacks, from the portal, each checked by digest."""
    manifest = backup["manifest"]
    try:
        store.manifest_bytes(manifest)
    except NotFound:
        if store.put_manifest(link.backup_manifest(backup["id"])) != manifest:
            raise BackupUnavailable(
                "The portal handed out a manifest that does not match its digest."
            ) from None
    missing = store.missing_chunks(manifest)
    for number, (digest, length, _stored) in enumerate(missing, start=1):
        if number % 64 == 1:
            progress(5 + 40 * number / len(missing), f"Fetching chunk {number} of {len(missing)}")
        store.add_chunk(digest, length, link.backup_chunk(backup["id"], digest))  # DigestMismatch if not it
        failpoint("restore.fetching")
    return len(missing)


def restore_backup(
    link: Any, place: PoolPlace, store: BackupStore, work: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    volume, backup = work.get("volume"), work.get("backup")
    if volume is None:
        return {"skipped": "volume deleted"}
    if backup is None:
        link.report_volume(volume["id"], "failed", message="The backup was deleted before it was restored.")
        return {"skipped": "backup deleted"}
    pool = pool_for(place)
    fetched = fetch_missing(link, store, backup, progress)
    failpoint("restore.fetched")
    progress(50, "Making the volume", force=True)
    pool.delete(volume["pool_name"])  # a restore cut short earlier: start again from empty
    pool.clear_stale_qgroups()
    pool.create(volume["pool_name"], volume["size_bytes"])
    failpoint("restore.created")
    total = max(int(backup.get("source_bytes") or 0), 1)

    def writing(done: int) -> None:
        failpoint("restore.writing")
        progress(50 + min(45.0, 45 * done / total), "Restoring")

    restored = store.restore(backup["manifest"], pool.volume_path(volume["pool_name"]), progress=writing)
    failpoint("restore.restored")
    link.report_volume(volume["id"], "ready")
    refresh_usage(link, place, volume)
    return {
        "state": "ready",
        "bytes": restored["bytes"],
        "files": restored["files"],
        "fetched_chunks": fetched,
    }
