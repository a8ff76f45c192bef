"""Volume services: the only code that creates, resizes, attaches, snapshots, restores and deletes volumes.

Each runs in one transaction: the quota under the tenant's row lock, the rows, an Operation, an audit
entry; the host's work is sent on commit to its queue (`host.<id>`), where compute.host.volume_tasks call
compute.host.volumes. Refusals raise ServiceErrors with an `audit_action`, audited after the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Sum

from compute.choices import HostState, WorkloadState
from compute.models import Host, Workload
from portal import operations
from portal.errors import Conflict, Invalid, ServiceError
from portal.models import Operation
from tenants import audit, quota
from tenants.actors import Actor
from tenants.models import Tenant
from volumes.choices import SnapshotState, VolumeState
from volumes.models import GIB, Snapshot, Volume, VolumeAttachment
from volumes.paths import mount_path_problem

MAX_VOLUME_GIB = 16 * 1024
# Workload states in which its volumes are not in use (attach, detach, restore).
STOPPED_STATES = (WorkloadState.STOPPED, WorkloadState.FAILED, WorkloadState.PENDING)


class NoPoolFits(ServiceError):
    status_code = 409
    code = "no_host_fits"


@dataclass(frozen=True)
class VolumeMount:
    """A volume in a workload at `path` (what a workload create or an attach asks for)."""

    volume: Volume
    path: str
    read_only: bool = False


def check_mount_path(path: str) -> str:
    """An absolute, normalised path inside the workload that is not one of the system's directories."""
    problem = mount_path_problem(path)
    if problem is not None:
        raise Invalid(problem, field="path")
    return path


def _size_bytes(size_gib: Any) -> int:
    try:
        gib = int(size_gib)
    except (TypeError, ValueError):
        raise Invalid("size_gib must be a whole number of GiB.", field="size_gib") from None
    if not 1 <= gib <= MAX_VOLUME_GIB:
        raise Invalid(f"size_gib must be between 1 and {MAX_VOLUME_GIB}.", field="size_gib")
    return gib * GIB


def pool_capacity_bytes(host: Host) -> int | None:
    """What the host's volume pool holds (None: the host did not say; then it is not limited here)."""
    pool = host.facts.get("volume_pool")
    if isinstance(pool, dict) and isinstance(pool.get("total_bytes"), int):
        return int(pool["total_bytes"])
    return None


def _promised_bytes(host: Host) -> int:
    return int(Volume.objects.filter(host=host).aggregate(total=Sum("size_bytes"))["total"] or 0)


def _place_volume(size_bytes: int, host: Host | None) -> Host:
    """A ready host whose pool can promise `size_bytes` more (volumes are not overcommitted), under the
    candidates' row locks like workload placement."""
    candidates = Host.objects.select_for_update().order_by("name")
    if host is not None:
        candidates = candidates.filter(pk=host.pk)
    reasons: list[str] = []
    best: tuple[int, Host] | None = None
    for candidate in candidates:
        if candidate.state != HostState.READY or (candidate.pinned_only and host is None):
            reasons.append(f"{candidate.name}: {candidate.state}")
            continue
        capacity = pool_capacity_bytes(candidate)
        free = None if capacity is None else capacity - _promised_bytes(candidate)
        if free is not None and size_bytes > free:
            reasons.append(f"{candidate.name}: {max(free, 0) // GIB} GiB free in its volume pool")
            continue
        rank = free if free is not None else 0
        if best is None or rank > best[0]:
            best = (rank, candidate)
    if best is None:
        raise NoPoolFits(
            f"No host can take a volume of {size_bytes // GIB} GiB: "
            f"{'; '.join(reasons) or 'no host is ready'}.",
            audit_action="volume.create",
        )
    return best[1]


def _start_op(
    actor: Actor, volume: Volume, kind: str, task: Any, target: Any = None, **params: Any
) -> Operation:
    return operations.start(
        kind=kind,
        task=task,
        actor=actor,
        tenant=volume.tenant,
        target=target if target is not None else volume,
        queue=volume.host.queue,
        params=params,
    )


def _lock(volume: Volume) -> Volume:
    return Volume.objects.select_for_update(of=("self",)).select_related("host", "tenant").get(pk=volume.pk)


def _refuse_busy(volume: Volume, action: str) -> None:
    if volume.state in (
        VolumeState.CREATING,
        VolumeState.DELETING,
        VolumeState.RESTORING,
        VolumeState.RESIZING,
    ):
        raise Conflict(
            f"The volume {volume.name} is {volume.state}; try again when it is ready.", audit_action=action
        )


@audit.denials_audited
@transaction.atomic
def create_volume(
    *, actor: Actor, tenant: Tenant, name: str, size_gib: Any, host: Host | None = None
) -> Operation:
    """Charge `volume_bytes` under the tenant's row lock, place the volume on a pool, queue its creation."""
    from compute.host import volume_tasks as tasks

    size = _size_bytes(size_gib)
    if Volume.objects.filter(tenant=tenant, name=name).exists():
        raise Conflict(f"A volume named {name!r} exists in this tenant.", field="name")
    _check_name(name)
    quota.allocate(tenant, volume_bytes=size)
    chosen = _place_volume(size, host)
    try:
        with transaction.atomic():
            volume = Volume.objects.create(tenant=tenant, name=name, host=chosen, size_bytes=size)
    except IntegrityError:
        raise Conflict(f"A volume named {name!r} exists in this tenant.", field="name") from None
    audit.record(actor, "volume.create", volume, details={"size_gib": size // GIB, "host": chosen.name})
    return _start_op(actor, volume, "volume.create", tasks.create_volume)


def _check_name(name: str) -> None:
    from tenants.models import dns_label

    try:
        dns_label(name)
    except Exception:
        raise Invalid(
            "A volume's name is a DNS label: lower-case letters, digits and '-'.", field="name"
        ) from None


@audit.denials_audited
@transaction.atomic
def resize_volume(*, actor: Actor, volume: Volume, size_gib: Any) -> Operation:
    """Grow a volume (shrinking is refused: data past the new size would have nowhere to go)."""
    from compute.host import volume_tasks as tasks

    locked = _lock(volume)
    _refuse_busy(locked, "volume.resize")
    size = _size_bytes(size_gib)
    if size < locked.size_bytes:
        raise Invalid("A volume can only grow.", field="size_gib")
    if size == locked.size_bytes:
        raise Invalid("The volume has that size already.", field="size_gib")
    grow = size - locked.size_bytes
    quota.allocate(locked.tenant, volume_bytes=grow)
    Host.objects.select_for_update().filter(pk=locked.host_id).first()
    capacity = pool_capacity_bytes(locked.host)
    if capacity is not None and grow > capacity - _promised_bytes(locked.host):
        raise NoPoolFits(
            f"The volume pool of its host cannot grow {locked.name} by {grow // GIB} GiB.",
            audit_action="volume.resize",
        )
    Volume.objects.filter(pk=locked.pk).update(size_bytes=size, state=VolumeState.RESIZING)
    audit.record(actor, "volume.resize", locked, details={"from_gib": locked.size_gib, "to_gib": size // GIB})
    return _start_op(actor, locked, "volume.resize", tasks.resize_volume)


@audit.denials_audited
@transaction.atomic
def delete_volume(*, actor: Actor, volume: Volume) -> Operation:
    """Refused while attached; the host deletes its data and snapshots, then the row and quota go."""
    from compute.host import volume_tasks as tasks

    locked = _lock(volume)
    attached = list(VolumeAttachment.objects.filter(volume=locked).select_related("workload"))
    if attached:
        names = ", ".join(sorted(a.workload.name for a in attached))
        raise Conflict(
            f"The volume {locked.name} is attached to {names}; detach it first.", audit_action="volume.delete"
        )
    if locked.state == VolumeState.DELETING:
        raise Conflict("The volume is being deleted.", audit_action="volume.delete")
    Volume.objects.filter(pk=locked.pk).update(state=VolumeState.DELETING)
    audit.record(actor, "volume.delete", locked)
    return _start_op(actor, locked, "volume.delete", tasks.delete_volume)


def forget_volume(volume_id: Any) -> None:
    """The host removed the volume: drop the row (and its snapshots' rows), give the quota back."""
    with transaction.atomic():
        volume = Volume.objects.select_for_update().filter(pk=volume_id).first()
        if volume is None:
            return
        tenant, size = volume.tenant, volume.size_bytes
        volume.delete()
        quota.release(tenant, volume_bytes=size)


# ---------------------------------------------------------------------------------------- attachments
def _check_mounts_for(workload_tenant: Tenant, isolation: str, mounts: list[VolumeMount]) -> Host | None:
    """Validate a workload's volumes; return the host they all live on (None: no volumes)."""
    hosts = set()
    paths: set[str] = set()
    seen: set[Any] = set()
    for mount in mounts:
        volume = mount.volume
        if volume.tenant_id != workload_tenant.pk:
            # Resolved through for_user by the caller; a volume of another tenant is "no such volume".
            raise Invalid("No such volume.", field="volumes")
        path = check_mount_path(mount.path)
        if path in paths:
            raise Invalid(f"Two volumes at {path}.", field="volumes")
        if volume.pk in seen:
            raise Invalid(f"The volume {volume.name} is listed twice.", field="volumes")
        paths.add(path)
        seen.add(volume.pk)
        hosts.add(volume.host_id)
    if len(hosts) > 1:
        raise Conflict(
            "A workload's volumes must all live on one host.", field="volumes", audit_action="volume.attach"
        )
    return Host.objects.get(pk=hosts.pop()) if hosts else None


def _attach_rows(workload: Workload, mounts: list[VolumeMount]) -> None:
    """Under each volume's row lock: ready, on the workload's host, and at most one writer."""
    for mount in mounts:
        volume = _lock(mount.volume)
        if volume.host_id != workload.host_id:
            raise Conflict(
                f"The volume {volume.name} lives on another host than {workload.name}.",
                field="volumes",
                audit_action="volume.attach",
            )
        if volume.state in (VolumeState.DELETING, VolumeState.FAILED, VolumeState.RESTORING):
            raise Conflict(
                f"The volume {volume.name} is {volume.state}.", field="volumes", audit_action="volume.attach"
            )
        others = VolumeAttachment.objects.filter(volume=volume)
        writer = others.filter(read_only=False).select_related("workload").first()
        if writer is not None:
            raise Conflict(
                f"The volume {volume.name} is attached read-write to {writer.workload.name}.",
                field="volumes",
                audit_action="volume.attach",
            )
        if not mount.read_only and others.exists():
            raise Conflict(
                f"The volume {volume.name} is attached elsewhere; it can only be attached read-only now.",
                field="volumes",
                audit_action="volume.attach",
            )
        try:
            with transaction.atomic():
                VolumeAttachment.objects.create(
                    volume=volume,
                    workload=workload,
                    path=check_mount_path(mount.path),
                    read_only=mount.read_only,
                )
        except IntegrityError:
            raise Conflict(
                "That path or volume is attached to the workload already.", audit_action="volume.attach"
            ) from None


def volume_host_for(*, tenant: Tenant, isolation: str, mounts: list[VolumeMount]) -> Host | None:
    """For compute.services.create_workload: the host its volumes pin it to (checked), or None."""
    if not mounts:
        return None
    host = _check_mounts_for(tenant, isolation, mounts)
    if host is not None and host.state != HostState.READY:
        raise Conflict(
            f"The volumes live on host {host.name}, which is {host.state}: "
            "the workload cannot start there now.",
            field="volumes",
            audit_action="workload.create",
        )
    return host


def attach_at_create(*, actor: Actor, workload: Workload, mounts: list[VolumeMount]) -> None:
    """Called by compute.services.create_workload inside its transaction, after placement."""
    _attach_rows(workload, mounts)
    for mount in mounts:
        audit.record(
            actor,
            "volume.attach",
            mount.volume,
            details={"workload": workload.name, "path": mount.path, "read_only": mount.read_only},
        )


@audit.denials_audited
@transaction.atomic
def attach_volume(
    *, actor: Actor, volume: Volume, workload: Workload, path: str, read_only: bool = False
) -> VolumeAttachment:
    """Attach to a stopped workload on the volume's host; it is mounted at the workload's next start."""
    locked_workload = Workload.objects.select_for_update().get(pk=workload.pk)
    if locked_workload.tenant_id != volume.tenant_id:
        raise Invalid("No such volume.", field="volume")
    if locked_workload.state not in STOPPED_STATES:
        raise Conflict(
            f"Stop {locked_workload.name} before attaching a volume to it.", audit_action="volume.attach"
        )
    mount = VolumeMount(volume=volume, path=check_mount_path(path), read_only=bool(read_only))
    _attach_rows(locked_workload, [mount])
    audit.record(
        actor,
        "volume.attach",
        volume,
        details={"workload": locked_workload.name, "path": mount.path, "read_only": mount.read_only},
    )
    return VolumeAttachment.objects.get(volume=volume, workload=locked_workload)


@audit.denials_audited
@transaction.atomic
def detach_volume(*, actor: Actor, attachment: VolumeAttachment) -> None:
    """Detach from a stopped workload (a running one still has it mounted)."""
    locked = (
        VolumeAttachment.objects.select_related("volume", "workload")
        .select_for_update(of=("self",))
        .get(pk=attachment.pk)
    )
    workload = Workload.objects.select_for_update().get(pk=locked.workload_id)
    if workload.state not in STOPPED_STATES:
        raise Conflict(
            f"Stop {workload.name} before detaching a volume from it.", audit_action="volume.detach"
        )
    locked.delete()
    audit.record(
        actor, "volume.detach", locked.volume, details={"workload": workload.name, "path": locked.path}
    )


def refuse_move(workload: Workload, audit_action: str = "") -> None:
    """A workload with volumes stays on their host (its data is there)."""
    first = VolumeAttachment.objects.filter(workload=workload).select_related("volume__host").first()
    if first is not None:
        raise Conflict(
            f"{workload.name} uses volumes on {first.volume.host.name}; it cannot move to another host.",
            audit_action=audit_action,
        )


# ---------------------------------------------------------------------------------------- snapshots
@audit.denials_audited
@transaction.atomic
def snapshot_volume(*, actor: Actor, volume: Volume, name: str) -> Operation:
    """A read-only snapshot of the volume as it is now (running workloads may keep writing)."""
    from compute.host import volume_tasks as tasks

    locked = _lock(volume)
    _refuse_busy(locked, "snapshot.create")
    if locked.state != VolumeState.READY:
        raise Conflict(f"The volume {locked.name} is {locked.state}.", audit_action="snapshot.create")
    _check_name(name)
    try:
        with transaction.atomic():
            snapshot = Snapshot.objects.create(volume=locked, name=name)
    except IntegrityError:
        raise Conflict(f"The volume has a snapshot named {name!r} already.", field="name") from None
    audit.record(actor, "snapshot.create", locked, details={"snapshot": name})
    return _start_op(actor, locked, "snapshot.create", tasks.snapshot_volume, target=snapshot)


def _attached_running(volume: Volume) -> list[str]:
    return sorted(
        VolumeAttachment.objects.filter(volume=volume)
        .exclude(workload__state__in=STOPPED_STATES)
        .values_list("workload__name", flat=True)
    )


@audit.denials_audited
@transaction.atomic
def restore_snapshot(*, actor: Actor, snapshot: Snapshot) -> Operation:
    """Make the volume what the snapshot holds; its workloads must be stopped."""
    from compute.host import volume_tasks as tasks

    snap = Snapshot.objects.select_related("volume").get(pk=snapshot.pk)
    locked = _lock(snap.volume)
    _refuse_busy(locked, "snapshot.restore")
    if snap.state != SnapshotState.READY:
        raise Conflict(f"The snapshot {snap.name} is {snap.state}.", audit_action="snapshot.restore")
    running = _attached_running(locked)
    if running:
        raise Conflict(
            f"Stop {', '.join(running)} before restoring {locked.name}.", audit_action="snapshot.restore"
        )
    Volume.objects.filter(pk=locked.pk).update(state=VolumeState.RESTORING)
    audit.record(actor, "snapshot.restore", locked, details={"snapshot": snap.name})
    return _start_op(actor, locked, "snapshot.restore", tasks.restore_snapshot, target=snap)


@audit.denials_audited
@transaction.atomic
def clone_snapshot(*, actor: Actor, snapshot: Snapshot, name: str, size_gib: Any = None) -> Operation:
    """A new volume (on the same host) holding what the snapshot holds; charged like a new volume."""
    from compute.host import volume_tasks as tasks

    snap = Snapshot.objects.select_related("volume__tenant", "volume__host").get(pk=snapshot.pk)
    source = snap.volume
    if snap.state != SnapshotState.READY:
        raise Conflict(f"The snapshot {snap.name} is {snap.state}.", audit_action="snapshot.clone")
    size = _size_bytes(size_gib) if size_gib is not None else source.size_bytes
    if size < source.size_bytes:
        raise Invalid("A clone is at least as large as its volume.", field="size_gib")
    _check_name(name)
    if Volume.objects.filter(tenant=source.tenant, name=name).exists():
        raise Conflict(f"A volume named {name!r} exists in this tenant.", field="name")
    quota.allocate(source.tenant, volume_bytes=size)
    host = _place_volume(size, source.host)
    try:
        with transaction.atomic():
            clone = Volume.objects.create(
                tenant=source.tenant, name=name, host=host, size_bytes=size, cloned_from=snap
            )
    except IntegrityError:
        raise Conflict(f"A volume named {name!r} exists in this tenant.", field="name") from None
    audit.record(actor, "snapshot.clone", clone, details={"snapshot": snap.name, "volume": source.name})
    return _start_op(actor, clone, "snapshot.clone", tasks.clone_snapshot, snapshot=str(snap.pk))


@audit.denials_audited
@transaction.atomic
def delete_snapshot(*, actor: Actor, snapshot: Snapshot) -> Operation:
    from compute.host import volume_tasks as tasks

    snap = (
        Snapshot.objects.select_for_update()
        .select_related("volume__host", "volume__tenant")
        .get(pk=snapshot.pk)
    )
    if snap.state == SnapshotState.DELETING:
        raise Conflict("The snapshot is being deleted.", audit_action="snapshot.delete")
    Snapshot.objects.filter(pk=snap.pk).update(state=SnapshotState.DELETING)
    audit.record(actor, "snapshot.delete", snap.volume, details={"snapshot": snap.name})
    return _start_op(actor, snap.volume, "snapshot.delete", tasks.delete_snapshot, target=snap)


# ---------------------------------------------------------------------------------------- host reports
def report_usage(volume_id: Any, used_bytes: int) -> None:
    from django.utils import timezone

    Volume.objects.filter(pk=volume_id).update(used_bytes=max(int(used_bytes), 0), used_at=timezone.now())


def mounts_for(workload: Workload) -> list[dict[str, Any]]:
    """What the host needs to mount a workload's volumes: server values only (pool names, paths)."""
    return [
        {
            "pool_name": a.volume.pool_name,
            "path": a.path,
            "read_only": a.read_only,
            "tag": f"vol{index}",
        }
        for index, a in enumerate(
            VolumeAttachment.objects.filter(workload=workload).select_related("volume").order_by("path")
        )
    ]
