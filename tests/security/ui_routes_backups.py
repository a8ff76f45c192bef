"""UI matrix entries for backups on the volumes page (merged into UI_ROUTES by test_ui_matrix.py)."""

from typing import Any

from tests.conftest import World
from tests.security.ui_routes_volumes import _volume


def _backup(world: World, ownership: str) -> Any:
    from backups.models import Backup
    from volumes.models import Volume

    volume = Volume.objects.get(pk=_volume(world, ownership))
    return Backup.objects.create(
        tenant=volume.tenant,
        volume=volume,
        volume_name=volume.name,
        state="ready",
        manifest="sha256:" + "1" * 64,
    ).pk


def _schedule(world: World, ownership: str) -> Any:
    from backups.models import BackupSchedule
    from volumes.models import Volume

    volume = Volume.objects.get(pk=_volume(world, ownership))
    return BackupSchedule.objects.get_or_create(volume=volume, defaults={"tenant": volume.tenant})[0].pk


def _routes() -> dict[str, Any]:
    from tests.security.test_ui_matrix import UiRoute

    return {
        "volume-backup": UiRoute(method="POST", obj=_volume, acts="operate"),
        "backup-restore": UiRoute(method="POST", obj=_backup, acts="operate"),
        "backup-verify": UiRoute(method="POST", obj=_backup, acts="operate"),
        "backup-export": UiRoute(method="POST", obj=_backup, acts="operate"),
        "backup-delete": UiRoute(method="POST", obj=_backup, acts="operate"),
        "volume-schedule": UiRoute(method="POST", obj=_volume, acts="operate"),
        "schedule-delete": UiRoute(method="POST", obj=_schedule, acts="operate"),
    }


ROUTES = _routes()
