"""Workload services: the only code that creates, updates, starts, stops, restarts and deletes workloads.

Each writes the row and an Operation, audits, and sends the host task on commit (to `host.<id>`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q

from compute import placement
from compute.choices import HostLostPolicy, HostState, Isolation, RestartPolicy, WorkloadState
from compute.compartments import Compartment
from compute.models import Host, Workload
from imaging.models import Image
from imaging.services import require_ready
from portal import operations
from portal.errors import Conflict, Invalid, NotPermitted, ServiceError
from portal.models import Operation
from tenants import audit, quota
from tenants.actors import Actor
from tenants.models import Secret, Tenant

MAX_VCPUS = Decimal(64)
MAX_MEMORY_MIB = 256 * 1024
MAX_DISK_GIB = 16 * 1024
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    image: Image
    isolation: str = Isolation.NAMESPACE
    command: list[str] | None = None
    args: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)  # {NAME: secret name}
    workdir: str = ""
    user: str = ""
    vcpus: Decimal = Decimal(1)
    memory_mib: int = 256
    disk_gib: int = 1
    restart_policy: str = RestartPolicy.NEVER
    on_host_lost: str = HostLostPolicy.WAIT
    host: Host | None = None  # operators may pin
    privileged: bool = False  # root-mapped container: only in tenants an operator allowed


def usable_images(tenant: Tenant) -> Any:
    """Images a tenant's workloads may use: its own and the public ones."""
    return Image.objects.filter(Q(tenant=tenant) | Q(tenant__isnull=True))


def _validate(spec: WorkloadSpec, tenant: Tenant) -> Image:
    """Checked values; the image as the tenant may use it now (with its unpacking operation)."""
    image = usable_images(tenant).select_related("operation").filter(pk=spec.image.pk).first()
    if image is None:
        raise Invalid("No such image.", field="image")
    if spec.vcpus <= 0 or spec.vcpus > MAX_VCPUS:
        raise Invalid(f"vcpus must be more than 0 and at most {MAX_VCPUS}.", field="vcpus")
    if spec.isolation == Isolation.MICROVM and spec.vcpus != spec.vcpus.to_integral_value():
        raise Invalid("A micro-VM needs a whole number of vCPUs.", field="vcpus")
    if not 16 <= spec.memory_mib <= MAX_MEMORY_MIB:
        raise Invalid(f"memory_mib must be between 16 and {MAX_MEMORY_MIB}.", field="memory_mib")
    if spec.isolation == Isolation.MICROVM and spec.memory_mib < 64:
        raise Invalid("A micro-VM needs at least 64 MiB.", field="memory_mib")
    if not 1 <= spec.disk_gib <= MAX_DISK_GIB:
        raise Invalid(f"disk_gib must be between 1 and {MAX_DISK_GIB}.", field="disk_gib")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in str(value):
            raise Invalid(f"Invalid environment variable name {key!r}.", field="env")
    _validate_secret_env(spec, tenant)
    for part in [*(spec.command or []), *(spec.args or []), spec.workdir, spec.user]:
        if "\0" in part:
            raise Invalid("Arguments cannot contain NUL bytes.")
    if spec.workdir and not spec.workdir.startswith("/"):
        raise Invalid("workdir must be an absolute path.", field="workdir")
    if spec.privileged and spec.isolation != Isolation.NAMESPACE:
        raise Invalid("Only namespace containers can be privileged.", field="privileged")
    return image


def _validate_secret_env(spec: WorkloadSpec, tenant: Tenant) -> None:
    """Each secret variable has a valid name of its own and names a secret of the workload's tenant."""
    for key in spec.secret_env:
        if not ENV_NAME.match(key):
            raise Invalid(f"Invalid environment variable name {key!r}.", field="secret_env")
        if key in spec.env:
            raise Invalid(f"{key} is set both as a plain and as a secret variable.", field="secret_env")
    wanted = set(spec.secret_env.values())
    known = set(Secret.objects.filter(tenant=tenant, name__in=wanted).values_list("name", flat=True))
    missing = sorted(wanted - known)
    if missing:
        raise Invalid(f"No secret named {missing[0]!r} in this tenant.", field="secret_env")


def _check_privileged_allowed(tenant: Tenant) -> None:
    # Under the tenant's row lock: an operator forbidding it at the same time is seen.
    if not Tenant.objects.select_for_update().filter(pk=tenant.pk, allow_privileged_containers=True).exists():
        raise NotPermitted(
            "Privileged containers (container root is host root) are not allowed in this tenant; "
            "an operator must allow them.",
            audit_action="workload.create",
            field="privileged",
        )


def _start_op(
    actor: Actor,
    workload: Workload,
    kind: str,
    task: Any,
    sent_with: Callable[[], dict[str, Any]] | None = None,
    **params: Any,
) -> Operation:
    assert workload.host is not None
    op = operations.start(
        kind=kind,
        task=task,
        actor=actor,
        tenant=workload.tenant,
        target=workload,
        queue=workload.host.queue,
        params=params,
        sent_with=sent_with,
    )
    return op


def _spec_with_message(workload: Workload, allocations: list[Any]) -> Callable[[], dict[str, Any]]:
    """The create's message carries the new workload's spec: its host creates the container while the
    claim is answered (`compute.host.tasks.CreateWorkloadTask`). Only for a namespace container with
    no secret value and no volume (the caller checks): a tenant's secret values reach a host only in
    answers to its own requests, never through the broker (whose data a persisting Redis keeps on
    disk), and a volume is attached after the claim."""
    from compute.host.broker import SPEC_HEADER
    from compute.host_reports import new_workload_spec

    return lambda: {SPEC_HEADER: new_workload_spec(workload, allocations)}


@audit.denials_audited
@transaction.atomic
def create_workload(
    *,
    actor: Actor,
    tenant: Tenant,
    spec: WorkloadSpec,
    start: bool = True,
    compartments: list[Compartment] | None = None,
    volumes: list[Any] | None = None,
) -> Operation:
    """Check quota under the tenant's row lock, place, write the row, and queue its creation.

    `compartments`: the networks it joins (None: the tenant's "default", created on first use, when the
    host realises compartments; []: none). Its addresses are allocated in this same transaction.
    `volumes`: volumes.services.VolumeMount list; the workload is placed on their host.
    """
    from compute import network_services
    from compute.host import tasks as host_tasks
    from volumes import services as volume_services  # volumes builds on compute

    image = _validate(spec, tenant)
    # A pushed image is listed at once but runs only once its layers are unpacked: a clear 409 (with the
    # operation to follow) rather than a workload stuck waiting on a push that may yet be refused.
    require_ready(image, "workload.create")
    if spec.privileged:
        _check_privileged_allowed(tenant)
    if Workload.objects.filter(tenant=tenant, name=spec.name).exists():
        raise Conflict(f"A workload named {spec.name!r} exists in this tenant.", field="name")
    volume_host = volume_services.volume_host_for(
        tenant=tenant, isolation=spec.isolation, mounts=volumes or []
    )
    if volume_host is not None and spec.host is not None and spec.host.pk != volume_host.pk:
        raise Conflict(
            f"Its volumes live on host {volume_host.name}, not {spec.host.name}.",
            field="host",
            audit_action="workload.create",
        )
    quota.allocate(tenant, workloads=1, vcpus=spec.vcpus, memory_mib=spec.memory_mib, disk_gib=spec.disk_gib)
    host = placement.choose_host(
        isolation=spec.isolation,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        disk_gib=spec.disk_gib,
        pinned=spec.host or volume_host,  # a workload goes to its volumes' host
        networked=bool(compartments),  # named compartments need a host that realises them
    )
    try:
        with transaction.atomic():
            workload = Workload.objects.create(
                tenant=tenant,
                name=spec.name,
                image=spec.image,
                isolation=spec.isolation,
                command=spec.command,
                args=spec.args,
                env=spec.env,
                secret_env=spec.secret_env,
                workdir=spec.workdir,
                user=spec.user,
                vcpus=spec.vcpus,
                memory_mib=spec.memory_mib,
                disk_gib=spec.disk_gib,
                restart_policy=spec.restart_policy,
                on_host_lost=spec.on_host_lost,
                privileged=spec.privileged,
                host=host,
                pinned=spec.host is not None,
                desired_running=start,
            )
    except IntegrityError:
        raise Conflict(f"A workload named {spec.name!r} exists in this tenant.", field="name") from None
    # Issue 7 (compartments): addresses in the same transaction as the row.
    allocations = network_services.join_compartments(
        actor=actor, tenant=tenant, workload=workload, compartments=compartments
    )
    if volumes:
        volume_services.attach_at_create(actor=actor, workload=workload, mounts=volumes)
    audit.record(
        actor,
        "workload.create",
        workload,
        details={
            "image": str(spec.image),
            "isolation": spec.isolation,
            "host": host.name,
            "start": start,
            **({"privileged": True} if spec.privileged else {}),
        },
    )
    return _start_op(
        actor,
        workload,
        "workload.create",
        host_tasks.create_workload,
        sent_with=(
            _spec_with_message(workload, allocations)
            if start and spec.isolation == Isolation.NAMESPACE and not spec.secret_env and not volumes
            else None
        ),
        start=start,
    )


# What an update may change in place: the process and its resources. The image, isolation, name and
# networks are the workload's identity; changing them is a new workload (desired state: a replace).
UPDATABLE_FIELDS = (
    "command",
    "args",
    "env",
    "secret_env",
    "workdir",
    "user",
    "vcpus",
    "memory_mib",
    "restart_policy",
    "on_host_lost",
)
# Fields a running workload only picks up when it starts again.
RESTART_FIELDS = frozenset(UPDATABLE_FIELDS) - {"restart_policy", "on_host_lost"}


@audit.denials_audited
@transaction.atomic
def update_workload(*, actor: Actor, workload: Workload, changes: dict[str, Any]) -> set[str]:
    """Change a workload's process and resources in place; return the names of the fields that changed.

    Validated like a create; growth is checked against the tenant's quota and the host's free capacity
    (shrinking gives both back). A running workload keeps its old process until it is restarted:
    ``RESTART_FIELDS & changed`` says whether it needs one.
    """
    unknown = set(changes) - set(UPDATABLE_FIELDS)
    if unknown:
        raise Invalid(f"These fields cannot be changed in place: {', '.join(sorted(unknown))}.")
    locked = _lock(workload)
    if locked.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.")
    current = {name: getattr(locked, name) for name in UPDATABLE_FIELDS}
    wanted = {**current, **changes}
    wanted["vcpus"] = Decimal(str(wanted["vcpus"]))
    wanted["workdir"] = wanted["workdir"] or ""
    wanted["user"] = wanted["user"] or ""
    wanted["env"] = dict(wanted["env"] or {})
    wanted["secret_env"] = dict(wanted["secret_env"] or {})
    spec = WorkloadSpec(
        name=locked.name, image=locked.image, isolation=locked.isolation, disk_gib=locked.disk_gib, **wanted
    )
    _validate(spec, locked.tenant)
    changed = {name for name in UPDATABLE_FIELDS if wanted[name] != current[name]}
    if not changed:
        return changed
    grow_vcpus = wanted["vcpus"] - locked.vcpus
    grow_memory = wanted["memory_mib"] - locked.memory_mib
    if grow_vcpus > 0 or grow_memory > 0:
        quota.allocate(locked.tenant, vcpus=max(grow_vcpus, Decimal(0)), memory_mib=max(grow_memory, 0))
        if locked.host is not None:
            placement.ensure_room(locked.host, vcpus=grow_vcpus, memory_mib=grow_memory)
    Workload.objects.filter(pk=locked.pk).update(**{name: wanted[name] for name in changed})
    if grow_vcpus < 0 or grow_memory < 0:
        quota.release(locked.tenant, vcpus=max(-grow_vcpus, Decimal(0)), memory_mib=max(-grow_memory, 0))
    audit.record(actor, "workload.update", locked, details={"fields": sorted(changed)})
    return changed


def _lock(workload: Workload) -> Workload:
    return (
        Workload.objects.select_for_update(of=("self",)).select_related("host", "tenant").get(pk=workload.pk)
    )


@transaction.atomic
def start_workload(*, actor: Actor, workload: Workload) -> Operation:
    from compute.host import tasks as host_tasks

    workload = _lock(workload)
    if workload.state in (WorkloadState.DELETING,):
        raise Conflict("The workload is being deleted.")
    Workload.objects.filter(pk=workload.pk).update(desired_running=True)
    audit.record(actor, "workload.start", workload)
    return _start_op(actor, workload, "workload.start", host_tasks.start_workload)


@transaction.atomic
def stop_workload(*, actor: Actor, workload: Workload, grace_seconds: int = 10) -> Operation:
    from compute.host import tasks as host_tasks

    workload = _lock(workload)
    if workload.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.")
    Workload.objects.filter(pk=workload.pk).update(desired_running=False)
    audit.record(actor, "workload.stop", workload, details={"grace_seconds": grace_seconds})
    return _start_op(actor, workload, "workload.stop", host_tasks.stop_workload, grace_seconds=grace_seconds)


@transaction.atomic
def restart_workload(*, actor: Actor, workload: Workload, grace_seconds: int = 10) -> Operation:
    from compute.host import tasks as host_tasks

    workload = _lock(workload)
    if workload.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.")
    Workload.objects.filter(pk=workload.pk).update(desired_running=True)
    audit.record(actor, "workload.restart", workload)
    return _start_op(
        actor, workload, "workload.restart", host_tasks.restart_workload, grace_seconds=grace_seconds
    )


@transaction.atomic
def delete_workload(*, actor: Actor, workload: Workload, grace_seconds: int = 10) -> Operation:
    """Mark deleting; the host stops it, removes everything, then the row goes and the quota is freed."""
    from compute.host import tasks as host_tasks

    workload = _lock(workload)
    Workload.objects.filter(pk=workload.pk).update(state=WorkloadState.DELETING, desired_running=False)
    audit.record(actor, "workload.delete", workload)
    return _start_op(
        actor, workload, "workload.delete", host_tasks.delete_workload, grace_seconds=grace_seconds
    )


@audit.denials_audited
@transaction.atomic
def reschedule_workload(*, actor: Actor, workload: Workload) -> Operation:
    """Run a workload of a lost host on another host: same name, identity, address and settings.

    Its captured changes stay on the lost host (there are no volumes yet): the workload starts fresh
    from its image. Placement is under the candidate hosts' row locks like a create."""
    from compute.compartments import PublishedPort
    from compute.host import tasks as host_tasks

    locked = _lock(workload)
    old = locked.host
    if old is None or old.state != HostState.LOST:
        raise Conflict("Only a workload of a lost host is moved.", audit_action="workload.reschedule")
    if locked.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.")
    # Its published ports go with it, on the same host ports (the address changes to the new host's).
    host = _place_existing(locked)
    PublishedPort.objects.filter(workload=locked).update(host=host)
    Workload.objects.filter(pk=locked.pk).update(
        host=host,
        state=WorkloadState.PENDING,
        status_message=f"moved from {old.name} (host lost)"[:500],
        exit_code=None,
        started_at=None,  # a first start on its new host (agent.ensure_running's create path)
        finished_at=None,
    )
    locked.host = host
    audit.record(actor, "workload.reschedule", locked, details={"from": old.name, "to": host.name})
    return _start_op(
        actor, locked, "workload.reschedule", host_tasks.create_workload, start=locked.desired_running
    )


@audit.denials_audited
@transaction.atomic
def move_workload(*, actor: Actor, workload: Workload) -> Operation:
    """Move a workload off its (draining) host: its host removes it, then another host creates it
    (same name, identity, address; fresh from its image). The target is chosen now, so that a move
    nobody can take is refused before anything stops."""
    from compute.host import tasks as host_tasks

    locked = _lock(workload)
    if locked.host is None or locked.host.state not in (HostState.DRAINING, HostState.MAINTENANCE):
        raise Conflict("Drain the host before moving its workloads.", audit_action="workload.move")
    if locked.pinned:
        raise Conflict(f"{locked.name} is pinned to {locked.host.name}.", audit_action="workload.move")
    if locked.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.")
    # Refused before anything stops: a move that could not land would lose the workload.
    target = _place_existing(locked, audit_action="workload.move")
    audit.record(actor, "workload.move", locked, details={"from": locked.host.name, "to": target.name})
    return _start_op(actor, locked, "workload.move", host_tasks.move_workload, to_host=str(target.pk))


def _place_existing(workload: Workload, *, pinned: Host | None = None, audit_action: str = "") -> Host:
    """Another host for an existing workload (its resources, its compartments), where its published
    ports are free too; under the candidates' row locks like a create."""
    from volumes.services import refuse_move

    refuse_move(workload, audit_action=audit_action)
    host = placement.choose_host(
        isolation=workload.isolation,
        vcpus=workload.vcpus,
        memory_mib=workload.memory_mib,
        disk_gib=workload.disk_gib,
        pinned=pinned,
        networked=workload.ip_allocations.exists(),
    )
    _refuse_port_clash(workload, host, audit_action=audit_action)
    return host


def _refuse_port_clash(workload: Workload, host: Host, audit_action: str = "") -> None:
    from compute.compartments import PublishedPort

    for port in PublishedPort.objects.filter(workload=workload):
        taken = PublishedPort.objects.filter(host=host, protocol=port.protocol, host_port=port.host_port)
        if taken.exclude(workload=workload).exists():
            raise Conflict(
                f"Port {port.protocol}/{port.host_port} of {workload.name} is taken on {host.name}.",
                audit_action=audit_action,
            )


def land_moved_workload(*, actor: Actor, workload: Workload, to_host: Any) -> Operation | None:
    """The old host removed the workload: it now belongs to `to_host`, which creates it.

    None when it cannot land: deleted meanwhile (the deletion finishes it), or the target no longer
    takes it (then it is `failed`, saying why, and an operator can start it again elsewhere)."""
    from compute.compartments import PublishedPort
    from compute.host import tasks as host_tasks

    with transaction.atomic():
        locked = _lock(workload)
        if locked.state == WorkloadState.DELETING:
            return None
        try:
            target = _place_existing(locked, pinned=Host.objects.get(pk=to_host))
        except ServiceError as error:
            Workload.objects.filter(pk=locked.pk).update(
                state=WorkloadState.FAILED, status_message=f"not moved: {error.message}"[:500]
            )
            audit.record(actor, "workload.move", locked, outcome="failed", details={"reason": error.message})
            return None
        old = locked.host
        PublishedPort.objects.filter(workload=locked).update(host=target)
        Workload.objects.filter(pk=locked.pk).update(
            host=target,
            state=WorkloadState.PENDING,
            status_message=f"moved from {old.name if old else '?'}",
            started_at=None,
            finished_at=None,
        )
        locked.host = target
        return _start_op(
            actor, locked, "workload.create", host_tasks.create_workload, start=locked.desired_running
        )


@audit.denials_audited
def evacuate_host(*, actor: Actor, host: Host) -> Operation:
    """Drain a host and move every workload it runs to other hosts; one operation follows them all."""
    from compute import tasks

    if not actor.is_operator or (actor.token is not None and actor.token.read_only):
        raise NotPermitted("Only operators evacuate hosts.", audit_action="host.evacuate")
    if host.state == HostState.REMOVED:
        raise Conflict(f"Host {host.name} was removed: it runs nothing.", audit_action="host.evacuate")
    with transaction.atomic():
        Host.objects.filter(pk=host.pk).exclude(state__in=[HostState.LOST, HostState.REMOVED]).update(
            state=HostState.DRAINING
        )
        audit.record(actor, "host.evacuate", host)
        return operations.start(
            kind="host.evacuate", task=tasks.evacuate_host, actor=actor, tenant=None, target=host
        )


@transaction.atomic
def commit_workload(*, actor: Actor, workload: Workload, name: str, tag: str) -> Operation:
    """Its captured changes become a new layer on top of its image: a new image of the tenant. The host
    makes and uploads the layer; the portal records the image (`host_reports.report_commit`)."""
    from compute.host import tasks as host_tasks

    workload = _lock(workload)
    if Image.objects.filter(tenant=workload.tenant, name=name, tag=tag).exists():
        raise Conflict(f"The image {name}:{tag} exists already.", field="name")
    audit.record(actor, "workload.commit", workload, details={"name": name, "tag": tag})
    return _start_op(actor, workload, "workload.commit", host_tasks.commit_workload, name=name, tag=tag)


def forget_workload(workload_id: Any) -> None:
    """The host removed everything: drop the row and give the quota back (idempotent)."""
    with transaction.atomic():
        workload = Workload.objects.select_for_update().filter(pk=workload_id).first()
        if workload is None:
            return
        tenant = workload.tenant
        amounts = {
            "workloads": 1,
            "vcpus": workload.vcpus,
            "memory_mib": workload.memory_mib,
            "disk_gib": workload.disk_gib,
        }
        # Issue 7 (compartments): its published ports go with it (rows cascade; quota given back here).
        from compute import network_services

        amounts["published_ports"] = network_services.release_workload(workload)
        workload.delete()
        quota.release(tenant, **amounts)
