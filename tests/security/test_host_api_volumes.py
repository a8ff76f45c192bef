"""The host API's volume, snapshot and backup routes as a compromised host would use them: host A holds
its own credential and reports on B's volumes, snapshots and backups, reads B's work, fetches the chunks
of a backup restored on B, uploads a chunk whose bytes are not its digest's, and finishes a backup whose
chunks never reached the portal. Each is refused (404 like a missing object, or 400), changes nothing
and is audited; the host's own reports are recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import zstandard
from rest_framework.test import APIClient

from backups import services as backup_services
from backups.choices import BackupState
from backups.models import Backup, BackupChunk
from compute import hosts
from compute.models import Host
from imaging.store import BackupStore
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World
from volumes import services as volume_services
from volumes.choices import SnapshotState, VolumeState
from volumes.models import GIB, Snapshot, Volume

pytestmark = pytest.mark.django_db

BASE = "/api/v1/hosts/self"
POOL = {"kind": "btrfs", "embedded": True, "total_bytes": 64 * GIB, "used_bytes": 0, "free_bytes": 64 * GIB}


def make_host(name: str) -> Host:
    facts = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100, "oci_runtimes": ["runc"]}
    host = hosts.register_host(actor=Actor.system("test"), name=name, facts=facts)
    Host.objects.filter(pk=host.pk).update(facts={**host.facts, "volume_pool": POOL})
    host.refresh_from_db()
    return host


def as_host(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def denied(action: str, host: Host) -> int:
    return AuditEntry.objects.filter(action=action, outcome="denied", actor_label=f"host {host.name}").count()


def ready_volume(world: World, host: Host, name: str) -> Volume:
    return Volume.objects.create(
        tenant=world.acme, name=name, host=host, size_bytes=GIB, state=VolumeState.READY
    )


@pytest.fixture
def two_hosts(world: World, settings: Any, tmp_path: Path) -> dict[str, Any]:
    settings.BULKHEAD_BACKUP_DIR = tmp_path / "portal-backups"
    a, b = make_host("bht-vapi-a"), make_host("bht-vapi-b")
    system = Actor.system("test")
    return {
        "a": a,
        "b": b,
        "as_a": as_host(hosts.issue_host_credential(actor=system, host=a)),
        "as_b": as_host(hosts.issue_host_credential(actor=system, host=b)),
        "vol_a": ready_volume(world, a, "data-a"),
        "vol_b": ready_volume(world, b, "data-b"),
        "mia": Actor(user=world.user("mia")),
    }


def real_backup(
    volume: Volume, store_root: Path, tmp_path: Path, content: bytes
) -> tuple[Backup, BackupStore]:
    """A ready backup of `volume` whose manifest and chunks are real, in the store at `store_root`."""
    source = tmp_path / f"src-{volume.name}"
    source.mkdir()
    (source / "table").write_bytes(content)
    store = BackupStore(store_root)
    result = store.backup(source)
    backup = Backup.objects.create(
        tenant=volume.tenant, volume=volume, volume_name=volume.name, state=BackupState.RUNNING
    )
    return backup_services.finish_backup(backup.pk, result, store.chunks(result.manifest)), store


# ------------------------------------------------------------------------------------------ volumes
def test_it_records_what_a_host_reports_about_its_own_volume(two_hosts: dict[str, Any]) -> None:
    op = volume_services.create_volume(
        actor=two_hosts["mia"],
        tenant=two_hosts["vol_a"].tenant,
        name="fresh",
        size_gib=1,
        host=two_hosts["a"],
    )
    volume = Volume.objects.get(pk=op.target_id)
    assert volume.state == VolumeState.CREATING
    work = two_hosts["as_a"].get(f"{BASE}/volume-operations/{op.pk}/")
    assert work.status_code == 200, work.json()
    assert work.json()["volume"]["pool_name"] == volume.pool_name
    ready = two_hosts["as_a"].post(f"{BASE}/volumes/{volume.pk}/", {"event": "ready"}, format="json")
    assert ready.json() == {"applied": True, "state": "ready"}
    usage = two_hosts["as_a"].post(
        f"{BASE}/volumes/{volume.pk}/", {"event": "usage", "used_bytes": 4096}, format="json"
    )
    assert usage.status_code == 200
    assert Volume.objects.get(pk=volume.pk).used_bytes == 4096


def test_it_refuses_a_host_reporting_on_another_hosts_volume(two_hosts: dict[str, Any]) -> None:
    vol_b, a = two_hosts["vol_b"], two_hosts["a"]
    Volume.objects.filter(pk=vol_b.pk).update(state=VolumeState.RESTORING)
    reports = [
        {"event": "ready"},
        {"event": "failed", "message": "planted"},
        {"event": "usage", "used_bytes": 0},
        {"event": "deleted"},
    ]
    for report in reports:
        answer = two_hosts["as_a"].post(f"{BASE}/volumes/{vol_b.pk}/", report, format="json")
        assert answer.status_code == 404, report
    vol_b.refresh_from_db()
    assert (vol_b.state, vol_b.status_message, vol_b.used_bytes) == (VolumeState.RESTORING, "", 0)
    assert denied("host.volume.report", a) == 4
    usage = two_hosts["as_a"].post(f"{BASE}/volume-usage/", {"usage": {vol_b.pool_name: 999}}, format="json")
    assert usage.json() == {"recorded": 0}
    assert Volume.objects.get(pk=vol_b.pk).used_bytes == 0
    assert denied("host.volume.report", a) == 5


def test_it_refuses_a_host_deleting_a_volume_the_portal_is_not_deleting(two_hosts: dict[str, Any]) -> None:
    vol_a = two_hosts["vol_a"]
    answer = two_hosts["as_a"].post(f"{BASE}/volumes/{vol_a.pk}/", {"event": "deleted"}, format="json")
    assert answer.status_code == 404
    assert Volume.objects.filter(pk=vol_a.pk, state=VolumeState.READY).exists()
    assert denied("host.volume.report", two_hosts["a"]) == 1


def test_it_refuses_a_host_reporting_on_another_hosts_snapshot(two_hosts: dict[str, Any]) -> None:
    snap = Snapshot.objects.create(volume=two_hosts["vol_b"], name="nightly")
    for report in ({"event": "ready", "used_bytes": 1}, {"event": "failed"}, {"event": "deleted"}):
        answer = two_hosts["as_a"].post(f"{BASE}/snapshots/{snap.pk}/", report, format="json")
        assert answer.status_code == 404, report
    assert Snapshot.objects.get(pk=snap.pk).state == SnapshotState.CREATING
    assert denied("host.snapshot.report", two_hosts["a"]) == 3


def test_it_refuses_a_host_reading_or_resuming_another_hosts_volume_work(two_hosts: dict[str, Any]) -> None:
    op = volume_services.snapshot_volume(actor=two_hosts["mia"], volume=two_hosts["vol_b"], name="nightly")
    Operation.objects.filter(pk=op.pk).update(state="running")
    assert two_hosts["as_a"].get(f"{BASE}/volume-operations/{op.pk}/").status_code == 404
    assert two_hosts["as_a"].post(f"{BASE}/volume-operations/{op.pk}/resume/").status_code == 404
    assert two_hosts["as_a"].get(f"{BASE}/volume-operations/").json() == {"operations": []}
    assert Operation.objects.get(pk=op.pk).state == "running"
    assert denied("host.operation.read", two_hosts["a"]) == 1
    assert denied("host.operation.report", two_hosts["a"]) == 1
    work = two_hosts["as_b"].get(f"{BASE}/volume-operations/{op.pk}/").json()
    assert work["snapshot"]["pool_name"] == Snapshot.objects.get(pk=op.target_id).pool_name


def test_it_queues_again_an_operation_whose_worker_died_then_fails_it_past_the_limit(
    two_hosts: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    from backups.host_reports import MAX_RESUMES

    op = volume_services.create_volume(
        actor=two_hosts["mia"],
        tenant=two_hosts["vol_a"].tenant,
        name="flaky",
        size_gib=1,
        host=two_hosts["a"],
    )
    for attempt in range(1, MAX_RESUMES + 1):
        Operation.objects.filter(pk=op.pk).update(state="running")  # a worker claimed it, then died
        with django_capture_on_commit_callbacks(execute=True):
            answer = two_hosts["as_a"].post(f"{BASE}/volume-operations/{op.pk}/resume/").json()
        assert answer["resumed"] is True
        assert Operation.objects.get(pk=op.pk).params["resumed"] == attempt
    Operation.objects.filter(pk=op.pk).update(state="running")
    with django_capture_on_commit_callbacks(execute=True):
        answer = two_hosts["as_a"].post(f"{BASE}/volume-operations/{op.pk}/resume/").json()
    assert answer["failed"] is True
    assert "stopped during this operation" in Operation.objects.get(pk=op.pk).error
    volume = Volume.objects.get(pk=op.target_id)
    assert volume.state == VolumeState.FAILED and "stopped during this operation" in volume.status_message


# ------------------------------------------------------------------------------------------ backups
def test_it_refuses_a_host_claiming_or_finishing_another_hosts_backup(two_hosts: dict[str, Any]) -> None:
    op = backup_services.create_backup(actor=two_hosts["mia"], volume=two_hosts["vol_b"])
    url = f"{BASE}/backups/{op.target_id}/"
    assert two_hosts["as_a"].post(url, {"event": "claim"}, format="json").status_code == 404
    result = {
        "manifest": "sha256:" + "a" * 64,
        "files": 1,
        "source_bytes": 1,
        "new_bytes": 0,
        "bytes_read": 0,
    }
    assert (
        two_hosts["as_a"].post(url, {"event": "finish", "result": result}, format="json").status_code == 404
    )
    assert two_hosts["as_a"].post(url, {"event": "fail", "message": "x"}, format="json").status_code == 404
    assert Backup.objects.get(pk=op.target_id).state == BackupState.PENDING
    assert denied("host.backup.report", two_hosts["a"]) == 3


def test_it_refuses_a_host_fetching_the_chunks_of_a_backup_restored_on_another_host(
    two_hosts: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    backup, store = real_backup(
        two_hosts["vol_b"], settings.BULKHEAD_BACKUP_DIR, tmp_path, b"b's rows " * 999
    )
    chunk = store.chunks(backup.manifest)[0][0]
    backup_services.restore_backup(actor=two_hosts["mia"], backup=backup, name="copy-b", host=two_hosts["b"])
    manifest_url = f"{BASE}/backups/{backup.pk}/manifest/"
    chunk_url = f"{BASE}/backups/{backup.pk}/chunks/{chunk}/"
    assert two_hosts["as_a"].get(manifest_url).status_code == 404
    assert two_hosts["as_a"].get(chunk_url).status_code == 404
    assert denied("host.backup_manifest.fetch", two_hosts["a"]) == 1
    assert denied("host.backup_chunk.fetch", two_hosts["a"]) == 1
    fetched = two_hosts["as_b"].get(chunk_url)
    assert fetched.status_code == 200
    assert b"".join(fetched.streaming_content) == store.chunk_path(chunk).read_bytes()  # type: ignore[attr-defined]
    # A, restoring a backup of its own, cannot reach B's chunk through it either.
    own, _ = real_backup(two_hosts["vol_a"], settings.BULKHEAD_BACKUP_DIR, tmp_path, b"a's rows " * 999)
    backup_services.restore_backup(actor=two_hosts["mia"], backup=own, name="copy-a", host=two_hosts["a"])
    assert two_hosts["as_a"].get(f"{BASE}/backups/{own.pk}/chunks/{chunk}/").status_code == 404
    assert denied("host.backup_chunk.fetch", two_hosts["a"]) == 2


def test_it_refuses_a_chunk_whose_bytes_do_not_match_its_digest(two_hosts: dict[str, Any]) -> None:
    op = backup_services.create_backup(actor=two_hosts["mia"], volume=two_hosts["vol_a"])
    as_a = two_hosts["as_a"]
    assert as_a.post(f"{BASE}/backups/{op.target_id}/", {"event": "claim"}, format="json").json() == {
        "claimed": True
    }
    data = b"table rows " * 100
    name = "sha256:" + hashlib.sha256(data).hexdigest()

    def put(backup_id: Any, body: bytes) -> Any:
        return as_a.put(
            f"{BASE}/backups/{backup_id}/chunks/{name}/?length={len(data)}",
            body,
            content_type="application/zstd",
        )

    forged = zstandard.ZstdCompressor().compress(b"planted rows " * 100)
    assert put(op.target_id, forged).status_code == 400
    assert not backup_services.backup_store().chunk_path(name).exists()
    assert denied("host.backup_chunk.upload", two_hosts["a"]) == 1
    other = backup_services.create_backup(actor=two_hosts["mia"], volume=two_hosts["vol_b"])
    Backup.objects.filter(pk=other.target_id).update(state=BackupState.RUNNING)
    assert put(other.target_id, zstandard.ZstdCompressor().compress(data)).status_code == 404  # B's backup
    assert not backup_services.backup_store().chunk_path(name).exists()
    assert put(op.target_id, zstandard.ZstdCompressor().compress(data)).status_code == 201


def test_it_finishes_a_backup_only_from_chunks_that_reached_the_portal(
    two_hosts: dict[str, Any], tmp_path: Path
) -> None:
    op = backup_services.create_backup(actor=two_hosts["mia"], volume=two_hosts["vol_a"])
    as_a, url = two_hosts["as_a"], f"{BASE}/backups/{op.target_id}/"
    as_a.post(url, {"event": "claim"}, format="json")
    source = tmp_path / "volume"
    source.mkdir()
    (source / "rows").write_bytes(bytes(range(256)) * 4096)
    host_store = BackupStore(tmp_path / "host-backups")
    result = host_store.backup(source)
    figures = {
        "manifest": result.manifest,
        "files": 1,
        "source_bytes": 1 << 20,
        "new_bytes": 0,
        "bytes_read": 0,
    }
    refused = as_a.post(url, {"event": "finish", "result": figures}, format="json")
    assert refused.status_code == 400
    assert Backup.objects.get(pk=op.target_id).state == BackupState.RUNNING
    missing = as_a.post(
        f"{url}missing/",
        {"manifest": result.manifest, "chunks": [d for d, _, _ in host_store.chunks(result.manifest)]},
        format="json",
    ).json()
    assert missing["manifest"] is True and len(missing["missing"]) == len(host_store.chunks(result.manifest))
    for digest, length, _ in host_store.chunks(result.manifest):
        body = host_store.chunk_path(digest).read_bytes()
        answer = as_a.put(f"{url}chunks/{digest}/?length={length}", body, content_type="application/zstd")
        assert answer.status_code == 201
    manifest = host_store.manifest_bytes(result.manifest)
    assert (
        as_a.put(f"{url}manifests/{result.manifest}/", manifest, content_type="application/json").status_code
        == 201
    )
    finished = as_a.post(url, {"event": "finish", "result": figures}, format="json")
    assert finished.status_code == 200, finished.json()
    backup = Backup.objects.get(pk=op.target_id)
    assert backup.state == BackupState.READY and backup.manifest == result.manifest
    store = backup_services.backup_store()
    assert {(c.digest, c.stored_bytes) for c in BackupChunk.objects.filter(backup=backup)} == {
        (d, store.chunk_path(d).stat().st_size) for d, _, _ in store.chunks(result.manifest)
    }
