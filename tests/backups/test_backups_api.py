"""Backups through the API and services without a host agent: who may see and do what, the
`backup_bytes` quota (a chunk shared by a tenant's backups counted once), schedules and pruning."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from backups import services
from backups.choices import BackupState
from backups.models import Backup, BackupChunk, BackupSchedule
from compute import hosts
from compute.models import Host
from imaging.store import BackupResult
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from volumes.choices import VolumeState
from volumes.models import GIB, Volume

pytestmark = pytest.mark.django_db


@pytest.fixture
def host(world: World) -> Host:
    placeholder = Host(name="bht-bk-api")
    return hosts.register_host(
        actor=Actor.system("test"), name="bht-bk-api", facts=hosts.gather_facts(placeholder)
    )


@pytest.fixture
def backup_dir(settings: Any, tmp_path: Path) -> Path:
    settings.BULKHEAD_BACKUP_DIR = tmp_path / "backups"
    return tmp_path / "backups"


def volume(world: World, host: Host, name: str = "db-data", tenant: Any = None) -> Volume:
    return Volume.objects.create(
        tenant=tenant or world.acme, name=name, host=host, size_bytes=GIB, state=VolumeState.READY
    )


def ready_backup(vol: Volume, chunks: dict[str, int], **fields: Any) -> Backup:
    """A finished backup (as the host's task would record it) using `chunks` (digest -> stored bytes)."""
    backup = Backup.objects.create(
        tenant=vol.tenant, volume=vol, volume_name=vol.name, state=BackupState.RUNNING, **fields
    )
    result = BackupResult(
        manifest="sha256:" + "a" * 64,
        entries=1,
        files=len(chunks),
        source_bytes=10 * sum(chunks.values()),
        bytes_read=0,
        files_unchanged=0,
        chunks=len(chunks),
        new_chunks=0,
        new_chunk_bytes=sum(chunks.values()),
        new_raw_bytes=0,
        reused_chunks=0,
        distinct_chunks=len(chunks),
        stored_bytes=sum(chunks.values()),
    )
    return services.finish_backup(backup.pk, result, [(d, 0, n) for d, n in chunks.items()])


def digest(c: str) -> str:
    return "sha256:" + c * 64


def test_it_starts_a_backup_as_an_operation_on_the_volumes_host(world: World, host: Host) -> None:
    vol = volume(world, host)
    response = client_for(world, "mia").post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json")
    assert response.status_code == 202, response.json()
    op = Operation.objects.get(pk=response.json()["id"])
    assert op.kind == "backup.create" and op.queue == host.queue
    backup = Backup.objects.get(pk=op.target_id)
    assert backup.state == BackupState.PENDING and backup.volume_name == "db-data"
    assert AuditEntry.objects.filter(action="backup.create", object_id=str(backup.pk)).exists()


def test_it_refuses_a_second_backup_while_one_runs(world: World, host: Host) -> None:
    vol = volume(world, host)
    client = client_for(world, "mia")
    assert client.post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json").status_code == 202
    assert client.post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json").status_code == 409
    assert AuditEntry.objects.filter(action="backup.create", outcome="denied").exists()


def test_it_hides_another_tenants_volume_and_backups(world: World, host: Host) -> None:
    theirs = volume(world, host, "globex-data", tenant=world.globex)
    backup = ready_backup(theirs, {digest("b"): 100})
    client = client_for(world, "mia")
    assert client.post("/api/v1/backups/", {"volume": str(theirs.pk)}, format="json").status_code == 400
    assert client.get(f"/api/v1/backups/{backup.pk}/").status_code == 404
    for verb in ("restore", "verify", "export"):
        answer = client.post(f"/api/v1/backups/{backup.pk}/{verb}/", {"name": "stolen"}, format="json")
        assert answer.status_code == 404, verb
    assert client.delete(f"/api/v1/backups/{backup.pk}/").status_code == 404
    assert client.get("/api/v1/backups/").json()["count"] == 0
    assert Backup.objects.filter(pk=backup.pk).exists()


def test_a_viewer_sees_backups_but_cannot_make_or_delete_them(world: World, host: Host) -> None:
    vol = volume(world, host)
    backup = ready_backup(vol, {digest("c"): 10})
    vic = client_for(world, "vic")
    assert vic.get(f"/api/v1/backups/{backup.pk}/").status_code == 200
    assert vic.post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json").status_code == 400
    assert vic.delete(f"/api/v1/backups/{backup.pk}/").status_code == 403
    assert Backup.objects.filter(pk=backup.pk).exists()


def test_shared_chunks_count_once_against_backup_bytes(world: World, host: Host) -> None:
    vol = volume(world, host)
    other = volume(world, host, "other")
    ready_backup(vol, {digest("1"): 1000, digest("2"): 500})
    second = ready_backup(vol, {digest("1"): 1000, digest("2"): 500})
    ready_backup(other, {digest("2"): 500, digest("3"): 70})
    assert Quota.objects.get(tenant=world.acme).used_backup_bytes == 1570
    # A chunk used by another tenant's backup is charged to that tenant too (and grants nothing).
    theirs = volume(world, host, "theirs", tenant=world.globex)
    ready_backup(theirs, {digest("1"): 1000})
    assert Quota.objects.get(tenant=world.globex).used_backup_bytes == 1000
    services.delete_backup(actor=Actor.system("test"), backup=second)
    assert Quota.objects.get(tenant=world.acme).used_backup_bytes == 1570
    assert BackupChunk.objects.filter(backup_id=second.pk).count() == 0


def test_it_refuses_a_backup_over_the_backup_bytes_quota(world: World, host: Host) -> None:
    vol = volume(world, host)
    Quota.objects.filter(tenant=world.acme).update(backup_bytes=1000)
    ready_backup(vol, {digest("d"): 1000})
    response = client_for(world, "mia").post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json")
    assert response.status_code == 409, response.json()
    assert Backup.objects.filter(volume=vol).count() == 1
    assert AuditEntry.objects.filter(action="quota.exceeded", outcome="denied").exists()


def test_a_schedule_backs_up_when_due_and_keeps_the_last_n(
    world: World, host: Host, backup_dir: Path
) -> None:
    vol = volume(world, host)
    client = client_for(world, "mia")
    answer = client.post(
        "/api/v1/backup-schedules/", {"volume": str(vol.pk), "every_hours": 24, "keep_last": 2}, format="json"
    )
    assert answer.status_code == 201, answer.json()
    schedule = BackupSchedule.objects.get(volume=vol)
    started = services.run_due_schedules()
    assert len(started) == 1 and Backup.objects.filter(schedule=schedule).count() == 1
    assert services.run_due_schedules() == []  # not due again for a day
    Backup.objects.filter(schedule=schedule).delete()
    for n in range(3):
        ready_backup(vol, {digest(str(n)): 10}, schedule=schedule)
    assert Backup.objects.filter(schedule=schedule).count() == 2
    assert Quota.objects.get(tenant=world.acme).used_backup_bytes == 20
    later = timezone.now() + timedelta(hours=25)
    assert len(services.run_due_schedules(now=later)) == 1


def test_a_schedule_refuses_nonsense(world: World, host: Host) -> None:
    vol = volume(world, host)
    client = client_for(world, "mia")
    for body in ({"every_hours": 0}, {"keep_last": 0}, {"every_hours": 100000}):
        answer = client.post("/api/v1/backup-schedules/", {"volume": str(vol.pk), **body}, format="json")
        assert answer.status_code == 400, body
    assert not BackupSchedule.objects.exists()


def test_a_backup_whose_operation_ended_without_it_fails_and_frees_the_volume(
    world: World, host: Host
) -> None:
    vol = volume(world, host)
    op = services.create_backup(actor=Actor(user=world.user("mia")), volume=vol)
    assert services.claim_backup(op.target_id)
    assert services.fail_abandoned() == 0  # its operation still runs
    Operation.objects.filter(pk=op.pk).update(state="failed", finished_at=timezone.now())
    assert services.fail_abandoned() == 1
    assert Backup.objects.get(pk=op.target_id).state == BackupState.FAILED
    response = client_for(world, "mia").post("/api/v1/backups/", {"volume": str(vol.pk)}, format="json")
    assert response.status_code == 202, response.json()


def test_a_restore_whose_operation_ended_without_it_leaves_a_failed_volume(world: World, host: Host) -> None:
    backup = ready_backup(volume(world, host), {digest("9"): 10})
    op = services.restore_backup(actor=Actor(user=world.user("mia")), backup=backup, name="copy")
    assert Volume.objects.get(pk=op.target_id).state == VolumeState.RESTORING
    Operation.objects.filter(pk=op.pk).update(state="failed", finished_at=timezone.now())
    services.fail_abandoned()
    assert Volume.objects.get(pk=op.target_id).state == VolumeState.FAILED


def test_the_volumes_page_lists_backups_with_dedup_and_backs_up_on_a_click(world: World, host: Host) -> None:
    from django.test import Client

    vol = volume(world, host)
    ready_backup(vol, {digest("7"): 100})
    ready_backup(volume(world, host, "theirs", tenant=world.globex), {digest("8"): 100})
    client = Client()
    client.force_login(world.user("mia"))
    html = client.get("/volumes/").content.decode()
    assert html.count('id="backup-') == 1 and "10.0\u00d7" in html  # 1000 volume bytes per 100 new
    answer = client.post(f"/volumes/{vol.pk}/backup/", HTTP_HX_REQUEST="true")
    assert answer.status_code == 200
    assert Backup.objects.filter(volume=vol, state=BackupState.PENDING).exists()
