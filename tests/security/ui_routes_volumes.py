"""UI matrix entries for the volumes page (merged into UI_ROUTES by test_ui_matrix.py)."""

from typing import Any

from tests.conftest import World
from tests.security.test_ui_matrix import UiRoute, _host, _workload


def _volume(world: World, ownership: str) -> Any:
    from compute.models import Host
    from volumes.models import Volume

    tenant = world.acme if ownership == "acme" else world.globex
    host = Host.objects.get(pk=_host(world, ownership))
    return Volume.objects.create(
        tenant=tenant, name=f"v-{ownership}", host=host, size_bytes=1024**3, state="ready"
    ).pk


def _snapshot(world: World, ownership: str) -> Any:
    from volumes.models import Snapshot

    return Snapshot.objects.create(volume_id=_volume(world, ownership), name="s1", state="ready").pk


def _attachment(world: World, ownership: str) -> Any:
    from volumes.models import VolumeAttachment

    return VolumeAttachment.objects.create(
        volume_id=_volume(world, ownership), workload_id=_workload(world, ownership), path="/data"
    ).pk


ROUTES = {
    "volumes": UiRoute(),
    "volume-create": UiRoute(method="POST", acts="operate"),
    "volume-delete": UiRoute(method="POST", obj=_volume, acts="operate"),
    "volume-snapshot": UiRoute(method="POST", obj=_volume, acts="operate"),
    "volume-attach": UiRoute(method="POST", obj=_volume, acts="operate"),
    "volume-detach": UiRoute(method="POST", obj=_attachment, acts="operate"),
    "snapshot-restore": UiRoute(method="POST", obj=_snapshot, acts="operate"),
    "snapshot-clone": UiRoute(method="POST", obj=_snapshot, acts="operate"),
    "snapshot-delete": UiRoute(method="POST", obj=_snapshot, acts="operate"),
}
