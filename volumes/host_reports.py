"""What a host reports about its volumes and snapshots, and what it may read of them (the host API).

As `compute.host_reports` for workloads: each function takes the host its credential proved, accepts
only volumes placed on that host (anything else is a 404, audited as denied: `host.volume.report`,
`host.snapshot.report`), validates the report and makes a conditional update of the state a host may
move the object from. A host never names a size, a name or a tenant: those are the portal's.
"""

from __future__ import annotations

import re
from typing import Any

from django.db import transaction
from django.utils import timezone

from compute.host_reports import _is_uuid, _refuse
from compute.models import Host
from portal import events
from portal.errors import Invalid
from tenants.actors import Actor
from volumes import services
from volumes.choices import SnapshotState, VolumeState
from volumes.models import Snapshot, Volume

# The states a host may move a volume out of, and to what (ready or failed): the portal's own states
# (deleting) and a ready volume are not the host's to change.
HOST_MOVABLE = [VolumeState.CREATING, VolumeState.RESIZING, VolumeState.RESTORING, VolumeState.FAILED]
MAX_BYTES = 1 << 62
POOL_NAME = re.compile(r"^vol-[0-9a-f]{32}$")


def _volume_on(host: Host, volume_id: Any, action: str) -> Volume:
    volume = (
        Volume.objects.select_related("tenant").filter(pk=volume_id, host=host).first()
        if _is_uuid(volume_id)
        else None
    )
    if volume is None:
        raise _refuse(host, action, "No such volume on this host.", volume=str(volume_id)[:80])
    return volume


def _snapshot_on(host: Host, snapshot_id: Any, action: str) -> Snapshot:
    snap = (
        Snapshot.objects.select_related("volume__tenant").filter(pk=snapshot_id, volume__host=host).first()
        if _is_uuid(snapshot_id)
        else None
    )
    if snap is None:
        raise _refuse(host, action, "No such snapshot on this host.", snapshot=str(snapshot_id)[:80])
    return snap


def _bytes(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
        raise Invalid(f"{field} is a whole number of bytes.", field=field)
    return value


def _message(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("message is text.", field="message")
    return value[:500]


def _publish_volume(volume_id: Any) -> None:
    fresh = Volume.objects.filter(pk=volume_id).first()
    if fresh is not None:
        events.publish(fresh.tenant_id, fresh.as_event())


def volume_view(volume: Volume) -> dict[str, Any]:
    """What the host needs of a volume to work on it: server values only."""
    return {
        "id": str(volume.pk),
        "pool_name": volume.pool_name,
        "size_bytes": volume.size_bytes,
        "state": volume.state,
        "used_bytes": volume.used_bytes,
    }


def snapshot_view(snap: Snapshot) -> dict[str, Any]:
    return {"id": str(snap.pk), "pool_name": snap.pool_name, "state": snap.state}


def report_volume(*, actor: Actor, host: Host, volume_id: Any, event: Any, **fields: Any) -> dict[str, Any]:
    """`ready` (a creation, resize, restore or clone finished), `failed` {message}, `usage`
    {used_bytes}, `deleted` (only a volume the portal is deleting: the row goes, the quota comes back)."""
    volume = _volume_on(host, volume_id, "host.volume.report")
    if event == "ready":
        moved = Volume.objects.filter(pk=volume.pk, state__in=HOST_MOVABLE).update(
            state=VolumeState.READY, status_message=""
        )
    elif event == "failed":
        moved = Volume.objects.filter(pk=volume.pk, state__in=HOST_MOVABLE[:3]).update(
            state=VolumeState.FAILED, status_message=_message(fields.get("message", ""))
        )
    elif event == "usage":
        used = _bytes(fields.get("used_bytes"), "used_bytes")
        moved = Volume.objects.filter(pk=volume.pk).update(used_bytes=used, used_at=timezone.now())
    elif event == "deleted":
        if volume.state != VolumeState.DELETING:
            raise _refuse(
                host,
                "host.volume.report",
                "No such volume being deleted on this host.",
                volume=str(volume.pk),
            )
        services.forget_volume(volume.pk)
        events.publish(volume.tenant_id, {"type": "volume", "id": str(volume.pk), "state": "deleted"})
        return {"applied": True, "state": "deleted"}
    else:
        raise Invalid("event is ready, failed, usage or deleted.", field="event")
    if moved and event != "usage":
        _publish_volume(volume.pk)
    state = Volume.objects.filter(pk=volume.pk).values_list("state", flat=True).first()
    return {"applied": bool(moved), "state": state}


def report_snapshot(
    *, actor: Actor, host: Host, snapshot_id: Any, event: Any, **fields: Any
) -> dict[str, Any]:
    """`ready` {used_bytes} (taken), `failed` {message}, `deleted` (only one the portal is deleting)."""
    snap = _snapshot_on(host, snapshot_id, "host.snapshot.report")
    tenant_id = snap.volume.tenant_id
    if event == "ready":
        used = _bytes(fields.get("used_bytes", 0), "used_bytes")
        moved = Snapshot.objects.filter(pk=snap.pk, state=SnapshotState.CREATING).update(
            state=SnapshotState.READY, used_bytes=used
        )
    elif event == "failed":
        moved = Snapshot.objects.filter(pk=snap.pk, state=SnapshotState.CREATING).update(
            state=SnapshotState.FAILED, status_message=_message(fields.get("message", ""))
        )
    elif event == "deleted":
        if snap.state != SnapshotState.DELETING:
            raise _refuse(
                host,
                "host.snapshot.report",
                "No such snapshot being deleted on this host.",
                snapshot=str(snap.pk),
            )
        Snapshot.objects.filter(pk=snap.pk).delete()
        events.publish(tenant_id, {"type": "snapshot", "id": str(snap.pk), "state": "deleted"})
        return {"applied": True, "state": "deleted"}
    else:
        raise Invalid("event is ready, failed or deleted.", field="event")
    fresh = Snapshot.objects.filter(pk=snap.pk).first()
    if moved and fresh is not None:
        events.publish(tenant_id, fresh.as_event())
    return {"applied": bool(moved), "state": fresh.state if fresh is not None else None}


def report_volume_pool(*, actor: Actor, host: Host, pool: Any) -> dict[str, Any]:
    """The pool's capacity and use into the host's facts. Bounded: figures are bytes, use and free
    space no more than the total. (Not bounded by an approval: an operator sizes the pool.)"""
    if not isinstance(pool, dict):
        raise Invalid("pool is an object.", field="pool")
    figures = {name: _bytes(pool.get(name), name) for name in ("total_bytes", "used_bytes", "free_bytes")}
    if figures["used_bytes"] > figures["total_bytes"] or figures["free_bytes"] > figures["total_bytes"]:
        raise Invalid("A pool uses and has free no more than its total.", field="pool")
    facts = {"kind": "btrfs", "embedded": bool(pool.get("embedded")), **figures}
    with transaction.atomic():
        locked = Host.objects.select_for_update().get(pk=host.pk)
        Host.objects.filter(pk=host.pk).update(facts={**locked.facts, "volume_pool": facts})
    return facts


def report_volume_usage(*, actor: Actor, host: Host, usage: Any) -> int:
    """Used bytes per volume, keyed by pool name; volumes not on this host are left out (and audited)."""
    if not isinstance(usage, dict) or len(usage) > 100_000:
        raise Invalid("usage maps volume pool names to bytes.", field="usage")
    by_pk = {}
    for name, used in usage.items():
        if not isinstance(name, str) or not POOL_NAME.match(name):
            raise Invalid("usage maps volume pool names to bytes.", field="usage")
        by_pk[name.removeprefix("vol-")] = _bytes(used, "usage")
    volumes = Volume.objects.filter(pk__in=list(by_pk), host=host, state=VolumeState.READY)
    recorded = 0
    for volume in volumes:
        used = by_pk[volume.pk.hex]
        if used != volume.used_bytes:
            services.report_usage(volume.pk, used)
        recorded += 1
    foreign = len(by_pk) - Volume.objects.filter(pk__in=list(by_pk), host=host).count()
    if foreign:
        from tenants import audit

        audit.record_denied(actor, "host.volume.report", host=host.name, foreign_volumes=foreign)
    return recorded
