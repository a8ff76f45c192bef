"""Backup schedules on the volumes page: members set, change and remove them through the backups
services (audited); viewers see them and change nothing; another tenant's volume or schedule is a 404."""

from __future__ import annotations

import pytest
from django.test import Client

from backups.models import BackupSchedule
from tenants.models import AuditEntry
from tests.conftest import World
from tests.volumes.test_volumes_api import a_host, a_volume

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


def browser_for(world: World, username: str) -> Client:
    browser = Client()
    browser.force_login(world.user(username))
    return browser


def test_a_member_schedules_changes_and_removes_a_volumes_backups(world: World) -> None:
    volume = a_volume(world, "db-data", a_host())
    mia = browser_for(world, "mia")
    page = mia.get("/volumes/").content.decode()
    assert "Back a volume up on a schedule" in page and f"/volumes/{volume.pk}/schedule/" in page

    response = mia.post(
        f"/volumes/{volume.pk}/schedule/", {"every_hours": 24, "keep_last": 7, "enabled": "on"}, headers=HTMX
    )

    assert response.status_code == 200
    assert "db-data is backed up daily, keeping the last 7." in response.content.decode()
    schedule = BackupSchedule.objects.get(volume=volume)
    assert (schedule.every_hours, schedule.keep_last, schedule.enabled) == (24, 7, True)
    assert f'id="schedule-{schedule.pk}"' in response.content.decode()  # the partial shows it at once

    response = mia.post(f"/volumes/{volume.pk}/schedule/", {"every_hours": 1, "keep_last": 48}, headers=HTMX)
    assert "db-data is backed up hourly, keeping the last 48 (paused)." in response.content.decode()
    schedule.refresh_from_db()
    assert (schedule.every_hours, schedule.keep_last, schedule.enabled) == (1, 48, False)
    assert BackupSchedule.objects.count() == 1  # one per volume: changed, not added

    response = mia.post(f"/backup-schedules/{schedule.pk}/delete/", headers=HTMX)
    assert "db-data is no longer backed up on a schedule." in response.content.decode()
    assert not BackupSchedule.objects.exists()
    actions = list(
        AuditEntry.objects.filter(tenant=world.acme, action__startswith="backup.schedule")
        .order_by("time", "id")
        .values_list("action", "outcome")
    )
    assert actions == [("backup.schedule", "ok"), ("backup.schedule", "ok"), ("backup.schedule.delete", "ok")]


@pytest.mark.parametrize(
    ("every", "keep", "says"),
    [
        (0, 7, "every: "),
        (721, 7, "every: "),
        (24, 0, "keep the last: "),
        (24, 1001, "keep the last: "),
        ("x", 7, "every"),
    ],
)
def test_a_bad_schedule_is_refused_with_why_and_changes_nothing(
    world: World, every: object, keep: object, says: str
) -> None:
    volume = a_volume(world, "db-data", a_host())
    response = browser_for(world, "mia").post(
        f"/volumes/{volume.pk}/schedule/", {"every_hours": every, "keep_last": keep}, headers=HTMX
    )
    assert response.status_code == 200
    assert f"Backups of db-data: {says}" in response.content.decode()
    assert not BackupSchedule.objects.exists()


def test_a_viewer_sees_schedules_and_can_change_none(world: World) -> None:
    volume = a_volume(world, "db-data", a_host())
    schedule = BackupSchedule.objects.create(tenant=world.acme, volume=volume, every_hours=168, keep_last=4)
    vic = browser_for(world, "vic")
    page = vic.get("/volumes/").content.decode()
    assert "weekly" in page and "the last 4" in page
    assert "/schedule/" not in page and "/backup-schedules/" not in page  # nothing offered

    # What a viewer may not do is not there: a 404, like another tenant's object (the UI matrix rule).
    assert vic.post(f"/volumes/{volume.pk}/schedule/", {"every_hours": 1, "keep_last": 1}).status_code == 404
    assert vic.post(f"/backup-schedules/{schedule.pk}/delete/").status_code == 404
    schedule.refresh_from_db()
    assert (schedule.every_hours, schedule.keep_last) == (168, 4)
    assert not AuditEntry.objects.filter(action__startswith="backup.schedule").exists()


def test_another_tenants_volume_and_schedule_are_not_found(world: World) -> None:
    host = a_host()
    theirs = a_volume(world, "ledger", host, tenant=world.globex)
    their_schedule = BackupSchedule.objects.create(tenant=world.globex, volume=theirs, keep_last=30)
    mia = browser_for(world, "mia")
    assert mia.post(f"/volumes/{theirs.pk}/schedule/", {"every_hours": 1, "keep_last": 1}).status_code == 404
    assert mia.post(f"/backup-schedules/{their_schedule.pk}/delete/").status_code == 404
    assert "ledger" not in mia.get("/volumes/").content.decode()
    their_schedule.refresh_from_db()
    assert (their_schedule.every_hours, their_schedule.keep_last) == (24, 30)
    assert BackupSchedule.objects.count() == 1
