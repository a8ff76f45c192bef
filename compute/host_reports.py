"""What a host reports to the portal, and what it may read: the services behind the host API.

A host acts only on itself (Kubernetes' NodeRestriction is the model): its own row and facts, the
workloads placed on it, the operations on its queue, the compartments it serves. Every function takes
the host its credential proved (never a host id from the request), validates the report, writes the
rows by conditional update and publishes the event. A report about anything else is refused as if it
did not exist (404) and audited as denied. The HTTP views (`compute/api/host_views.py`) and the agent's
in-process link for the portal's own machine (`InProcessLink` below) both call these functions, so
a host on the portal's machine goes through the same checks as one on another machine.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Network
from typing import Any

from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from backups.in_process_link import InProcessVolumeCalls
from compute.choices import WorkloadState
from compute.models import Host, Workload
from imaging.models import repository_name
from portal import events
from portal.errors import Conflict, Explained, Invalid, NotPermitted, ServiceError
from tenants import audit
from tenants.actors import Actor


class NotOnThisHost(ServiceError):
    """The object is not placed on the reporting host: answered like a missing one."""

    status_code = 404
    code = "not_found"


def host_actor(host: Host) -> Actor:
    """The audit label of a host acting with its own credential."""
    return Actor.system(f"host {host.name}")


def _refuse(
    host: Host,
    action: str,
    message: str,
    *,
    error: type[ServiceError] = NotOnThisHost,
    field: str | None = None,
    **details: Any,
) -> ServiceError:
    """A host's request refused (`error`, a 404 like a missing object unless said), audited as the host's
    here with `details`: the caller raises it."""
    audit.record_denied(host_actor(host), action, host=host.name, **details)
    refusal = error(message, field=field)
    refusal.audited = True
    return refusal


def _placed(host: Host, workload_id: Any, action: str) -> Workload:
    """The workload if it is placed on `host`; anything else (another host's, a missing one, not a uuid)
    is refused alike and audited."""
    workload = (
        Workload.objects.select_related("host").filter(pk=workload_id, host=host).first()
        if _is_uuid(workload_id)
        else None
    )
    if workload is None:
        raise _refuse(host, action, "No such workload on this host.", workload=str(workload_id)[:80])
    return workload


# --- liveness and facts ---------------------------------------------------------------------------


def record_heartbeat(host: Host) -> None:
    """The host's agent is alive (a lost host comes back as ready; its agent re-syncs)."""
    from compute.hosts import heartbeat

    heartbeat(host.pk)


RUNTIME_NAMES = ("runc", "crun")
# Facts that size the host: a report may keep or lower them, never raise them above what the portal
# approved (the host row's columns, set when the host was registered or joined with an operator's
# token, and the disk size first recorded). Placement reads the approved values.
CAPACITY_FACTS = ("cpus", "memory_mib", "disk_gib")
MAX_HOST_NETWORKS = 64


def _text(limit: int) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > limit or "\x00" in value:
            raise ValueError(f"a text of at most {limit} characters")
        return value

    return check


def _count(limit: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"a whole number from 0 to {limit}")
        return value

    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _runtimes(value: Any) -> list[str]:
    if not isinstance(value, list) or any(name not in RUNTIME_NAMES for name in value) or len(value) > 2:
        raise ValueError(f"a list of {', '.join(RUNTIME_NAMES)}")
    return list(dict.fromkeys(value))


def _probes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or any(name not in RUNTIME_NAMES for name in value):
        raise ValueError(f"reasons for {', '.join(RUNTIME_NAMES)}")
    return {name: _text(500)(reason) for name, reason in value.items()}


def _networks(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_HOST_NETWORKS:
        raise ValueError(f"at most {MAX_HOST_NETWORKS} IPv4 networks")
    if any(not isinstance(text, str) for text in value):
        raise ValueError("IPv4 networks")
    try:
        networks = sorted({str(IPv4Network(text, strict=False)) for text in value})
    except ValueError:
        raise ValueError("IPv4 networks") from None
    # A host may name its own networks (new subnets keep clear of them), not claim the address space.
    if any(IPv4Network(text).prefixlen < 8 for text in networks):
        raise ValueError("networks no larger than a /8")
    return networks


FACT_CHECKS: dict[str, Any] = {
    "cpus": _count(4096),
    "memory_mib": _count(64 * 1024 * 1024),
    "disk_gib": _count(1024 * 1024),
    "disk_free_bytes": _count(2**60),
    "kernel": _text(200),
    "cgroup_mode": _text(20),
    "hostname": _text(253),
    "oci_runtimes": _runtimes,
    "oci_runtime_probes": _probes,
    "libvirt": _flag,
    "kvm": _flag,
    "guest_kernel": _text(200),
    "networks": _networks,
}


def approved_capacity(host: Host) -> dict[str, int | None]:
    """The most of each capacity fact the portal lets this host offer."""
    disk = (host.facts or {}).get("approved_disk_gib", (host.facts or {}).get("disk_gib"))
    return {"cpus": host.cpus, "memory_mib": host.memory_mib, "disk_gib": disk}


@audit.denials_audited
def report_facts(*, actor: Actor, host: Host, facts: dict[str, Any]) -> dict[str, Any]:
    """Record what the host says it is and can do. Unknown or malformed facts are refused (400); a
    capacity above the approved one is refused (403) and audited: nothing of the report is kept."""
    if not isinstance(facts, dict):
        raise Invalid("Facts are an object.", field="facts")
    checked: dict[str, Any] = {}
    for name, value in facts.items():
        check = FACT_CHECKS.get(name)
        if check is None:
            raise Invalid(f"Unknown fact {str(name)[:40]!r}.", field="facts")
        try:
            checked[name] = check(value)
        except ValueError as error:
            raise Invalid(f"The fact {name!r} must be {error}.", field="facts") from None
    with transaction.atomic():
        locked = Host.objects.select_for_update().get(pk=host.pk)
        approved = approved_capacity(locked)
        for name in CAPACITY_FACTS:
            limit = approved[name]
            if name in checked and limit is not None and checked[name] > limit:
                raise NotPermitted(
                    f"The host reported {name} {checked[name]}, more than the {limit} approved for it.",
                    audit_action="host.facts.report",
                )
        updated = {**(locked.facts or {}), **checked}
        # The disk size first recorded is the bound from then on (a lower report must not lower it).
        if "approved_disk_gib" not in updated:
            first = approved["disk_gib"] if approved["disk_gib"] is not None else checked.get("disk_gib")
            if first is not None:
                updated["approved_disk_gib"] = first
        if updated != locked.facts:
            locked.facts = updated
            locked.save(update_fields=["facts"])
    return {name: checked[name] for name in sorted(checked)}


# --- workloads ------------------------------------------------------------------------------------

# The states a host may move a workload to (deleting and unknown belong to the portal) and from.
REPORTABLE_STATES = {
    WorkloadState.PENDING,
    WorkloadState.CREATING,
    WorkloadState.RUNNING,
    WorkloadState.STOPPING,
    WorkloadState.STOPPED,
    WorkloadState.FAILED,
}
EXPECTABLE_STATES = REPORTABLE_STATES | {WorkloadState.UNKNOWN}
# A time the host reports is the portal's "now" (a host cannot backdate a start) or cleared.
TIME_FIELDS = ("started_at", "finished_at")
EXIT_CODE_RANGE = (-(2**31), 2**31 - 1)


def _workload_changes(changes: Any) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise Invalid("Changes are an object.", field="changes")
    checked: dict[str, Any] = {}
    now = timezone.now()
    for name, value in changes.items():
        if name == "state":
            if value not in REPORTABLE_STATES:
                raise Invalid(f"A host cannot set the state {str(value)[:20]!r}.", field="state")
            checked["state"] = value
        elif name == "exit_code":
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not EXIT_CODE_RANGE[0] <= value <= EXIT_CODE_RANGE[1]
            ):
                raise Invalid("An exit code is a whole number or null.", field="exit_code")
            checked["exit_code"] = value
        elif name == "status_message":
            if not isinstance(value, str):
                raise Invalid("A status message is text.", field="status_message")
            checked["status_message"] = value[:500]
        elif name in TIME_FIELDS:
            if value not in ("now", None):
                raise Invalid(f'{name} is "now" or null.', field=name)
            checked[name] = now if value == "now" else None
        else:
            raise Invalid(f"A host cannot change {str(name)[:40]!r}.", field="changes")
    return checked


@audit.denials_audited
def report_workload_state(
    *,
    actor: Actor,
    host: Host,
    workload_id: Any,
    expected: list[str],
    changes: dict[str, Any],
    never_started: bool = False,
    count_restart: bool = False,
) -> dict[str, Any]:
    """A conditional update of a workload placed on `host`, as its agent saw it: applied only if the
    row is in one of `expected` (a concurrent change wins). Returns whether it applied and the row's
    state, exit code and times as they are now."""
    fields = _checked_report(expected, changes, count_restart=count_restart)
    if not _is_uuid(workload_id):
        raise _refuse(
            host, "host.workload.report", "No such workload on this host.", workload=str(workload_id)[:80]
        )
    # The update names the host: another host's workload matches nothing, and the read below tells a
    # refusal (not on this host) from a report that a concurrent change overtook.
    rows = Workload.objects.filter(pk=workload_id, host=host, state__in=expected)
    if never_started:
        rows = rows.filter(started_at__isnull=True)
    # The row as updated comes back with the update (one statement); only a report that changed nothing
    # reads the row to tell a refusal from an overtaken report.
    current = _update_returning(rows, fields, workload_id)
    applied = current is not None
    if current is None:
        current = Workload.objects.filter(pk=workload_id, host=host).first()
    if current is None:
        raise _refuse(
            host, "host.workload.report", "No such workload on this host.", workload=str(workload_id)[:80]
        )
    current.host = host  # the row is on `host` (the filters say so): its event names it without a query
    if applied and set(fields) - {"restart_count"}:
        events.publish(current.tenant_id, current.as_event())
    return {"applied": applied, **_row_view(current)}


def _checked_report(expected: Any, changes: Any, *, count_restart: bool = False) -> dict[str, Any]:
    """A state report's columns to update (Invalid, before anything changes, when it is not one)."""
    if not isinstance(expected, list) or not expected or any(s not in EXPECTABLE_STATES for s in expected):
        raise Invalid("Expected states are a list of states a host may see.", field="expected")
    fields = _workload_changes(changes)
    if count_restart:
        fields["restart_count"] = F("restart_count") + 1
    if not fields:
        raise Invalid("The report changes nothing.", field="changes")
    return fields


def _update_returning(rows: Any, fields: dict[str, Any], workload_id: Any) -> Workload | None:
    """`rows.update(**fields)` of at most one row, returning that row as updated (None: none matched).
    One `UPDATE … RETURNING` where the database has it (PostgreSQL, SQLite >= 3.35), else update + read."""
    from django.db import connections, router
    from django.db.models.sql import UpdateQuery

    alias = router.db_for_write(Workload)
    connection = connections[alias]
    if not connection.features.can_return_columns_from_insert:  # no UPDATE … RETURNING either
        if not rows.update(**fields):
            return None
        return Workload.objects.filter(pk=workload_id).first()
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(fields)
    query.annotations = {}
    compiler = query.get_compiler(alias)
    compiler.pre_sql_setup()
    sql, params = compiler.as_sql()
    # Django's own UPDATE statement (values as parameters), with the columns of the row asked back.
    return next(iter(Workload.objects.db_manager(alias).raw(f"{sql} RETURNING *", params)), None)


def _row_view(workload: Workload) -> dict[str, Any]:
    return {
        "state": workload.state,
        "exit_code": workload.exit_code,
        "status_message": workload.status_message,
        "restart_count": workload.restart_count,
        "started_at": workload.started_at.isoformat() if workload.started_at else None,
        "finished_at": workload.finished_at.isoformat() if workload.finished_at else None,
        "desired_running": workload.desired_running,
    }


@audit.denials_audited
def report_workload_removed(*, actor: Actor, host: Host, workload_id: Any) -> dict[str, Any]:
    """The host removed everything of a workload being deleted: the row goes, the quota comes back.
    Only a workload in `deleting` on this host (a host cannot delete a tenant's running workload)."""
    from compute.services import forget_workload

    # A repeated report (its answer was lost) finds nothing and is a 404 too: the agent takes it as done.
    workload = _placed(host, workload_id, "host.workload.removed")
    if workload.state != WorkloadState.DELETING:
        raise Conflict("Only a workload being deleted can be removed by its host.")
    forget_workload(workload.pk)
    events.publish(workload.tenant_id, {"type": "workload", "id": str(workload.pk), "state": "deleted"})
    return {"removed": True}


def _is_uuid(value: Any) -> bool:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


# --- what the host runs: its desired set, as complete specs -------------------------------------


def _spec_queryset() -> Any:
    return Workload.objects.select_related("host", "image__tenant", "tenant").prefetch_related(
        "image__image_layers__layer", "ip_allocations__compartment", "volume_attachments__volume"
    )


def desired_set(host: Host) -> list[dict[str, Any]]:
    """Every workload placed on `host`, each as the complete spec its agent runs (`workload_spec`)."""
    workloads = _spec_queryset().filter(host=host).order_by("created_at", "id")
    return [workload_spec(workload) for workload in workloads]


def new_workload_spec(workload: Workload, allocations: list[Any]) -> dict[str, Any]:
    """The spec of a workload just created with no volume (what its create's message carries), from the
    rows in hand (its addresses as `join_compartments` allocated them): one query, the image's layers."""
    layers = list(workload.image.image_layers.select_related("layer").order_by("position"))
    return workload_spec(workload, layers=layers, allocation=next(iter(allocations), None), volumes=[])


def workload_spec_on(host: Host, workload_id: Any) -> dict[str, Any]:
    """One workload's spec, only if it is placed on `host` (refused and audited otherwise)."""
    workload = _spec_queryset().filter(pk=workload_id, host=host).first() if _is_uuid(workload_id) else None
    if workload is None:
        raise _refuse(
            host, "host.workload.read", "No such workload on this host.", workload=str(workload_id)[:80]
        )
    return workload_spec(workload)


class ImageHasNoCommand(Explained, ValueError):
    """Neither the image nor the workload says what to run."""


class PrivilegedNotAllowed(Explained):
    """A privileged workload whose tenant no longer may run privileged containers."""


def process_args(workload: Workload) -> list[str]:
    """The workload's command and arguments over the image's entrypoint and cmd (Docker's rules)."""
    config = workload.image.config or {}
    entrypoint = workload.command if workload.command is not None else (config.get("entrypoint") or [])
    cmd = workload.args if workload.args is not None else (config.get("cmd") or [])
    if workload.command is not None and workload.args is None:
        cmd = []  # Docker's rule: overriding the entrypoint drops the image's cmd
    args = [*entrypoint, *cmd]
    if not args:
        raise ImageHasNoCommand("The image has no entrypoint or cmd and the workload gives none.")
    return args


def process_env(workload: Workload) -> list[str]:
    """The image's environment, the workload's, and the tenant's secret values unsealed here, for the
    spec its host receives (a host-private value: the process's environment, nowhere a tenant reads)."""
    from tenants.services import secret_values

    env: dict[str, str] = {}
    for item in (workload.image.config or {}).get("env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    env.update({str(k): str(v) for k, v in (workload.env or {}).items()})
    env.update(secret_values(workload.tenant_id, dict(workload.secret_env or {})))
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOSTNAME"] = workload.name
    return [f"{k}={v}" for k, v in env.items()]


def _volume_mounts(workload: Workload) -> list[dict[str, Any]]:
    """The volumes the workload mounts, by their name in its host's pool (server values only)."""
    attachments = sorted(workload.volume_attachments.all(), key=lambda attachment: attachment.path)
    return [
        {
            "volume": str(attachment.volume_id),
            "name": attachment.volume.name,
            "pool_name": attachment.volume.pool_name,
            "path": attachment.path,
            "read_only": attachment.read_only,
            "tag": f"bhvol{index}",
            "on_host": attachment.volume.host_id == workload.host_id,
        }
        for index, attachment in enumerate(attachments)
    ]


def workload_spec(
    workload: Workload,
    *,
    layers: list[Any] | None = None,
    allocation: Any = ...,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a host needs to run a workload, resolved by the portal: image layers by digest, the process
    (entrypoint and cmd merged, environment with the tenant's secret values unsealed), limits, network
    attachment, volumes and the row's state. The values are the portal's: the host interprets nothing.
    `layers`, `allocation`, `volumes`: already known (else read through the workload's relations)."""
    from portal.errors import tenant_message

    image = workload.image
    config = image.config or {}
    if layers is None:
        layers = sorted(image.image_layers.all(), key=lambda il: il.position)
    if allocation is ...:
        allocation = next(iter(workload.ip_allocations.all()), None)
    problem = ""
    try:
        if workload.privileged and not workload.tenant.allow_privileged_containers:
            # An operator withdrew the permission since the create: no root-mapped (re)start.
            raise PrivilegedNotAllowed("privileged containers are no longer allowed in this tenant")
        args: list[str] | None = process_args(workload)
        env: list[str] | None = process_env(workload)
    except Exception as error:  # a start would fail with this; the host reports it as the failure
        args, env, problem = None, None, tenant_message(error)
    return {
        "id": str(workload.pk),
        "runtime_id": workload.runtime_id,
        "name": workload.name,
        "tenant": str(workload.tenant_id),
        "isolation": workload.isolation,
        "state": workload.state,
        "status_message": workload.status_message,
        "desired_running": workload.desired_running,
        "restart_policy": workload.restart_policy,
        "exit_code": workload.exit_code,
        "started": workload.started_at is not None,
        "image": {
            "id": str(image.pk),
            # Where the host fetches the layers it lacks: the registry's `/v2/<repository>/blobs/…`.
            "repository": repository_name(image),
            "config_digest": image.config_digest,
            "layers": [
                {
                    "digest": il.layer.digest,
                    "diff_id": il.layer.diff_id,
                    "media_type": il.layer.media_type,
                    "size": il.layer.size,
                }
                for il in layers
            ],
        },
        "process": {
            "args": args,
            "env": env,
            "cwd": workload.workdir or config.get("workdir") or "/",
            "user": workload.user or config.get("user") or "0:0",
            "problem": problem,
        },
        "limits": {
            "vcpus": str(workload.vcpus),
            "memory_mib": workload.memory_mib,
            "disk_gib": workload.disk_gib,
        },
        # Root-mapped only while the tenant may still run privileged containers.
        "privileged": bool(workload.privileged and workload.tenant.allow_privileged_containers),
        "network": (
            {
                "compartment": allocation.compartment.network_id,
                "address": allocation.address,
                "mac": allocation.mac,
                # The compartment's gateway (its DNS server): the host writes the container's
                # resolv.conf before the compartment's network is realised (created while attaching).
                "gateway": str(allocation.compartment.gateway_address),
            }
            if allocation is not None
            else None
        ),
        "volumes": _volume_mounts(workload) if volumes is None else volumes,
    }


# --- the host itself, and the network it realises -------------------------------------------------


def host_profile(host: Host) -> dict[str, Any]:
    """What a host's agent needs to know about itself (`GET hosts/self/`): who it is, which OCI runtime
    and VM domain type it uses, whether and where it realises compartments."""
    from compute import network_services

    fresh = Host.objects.get(pk=host.pk)
    labels = fresh.labels or {}
    return {
        "id": str(fresh.pk),
        "name": fresh.name,
        "queue": fresh.queue,
        "state": fresh.state,
        "oci_runtime": fresh.oci_runtime,
        "domain_type": fresh.domain_type,
        "network": {
            "enabled": network_services.network_enabled(fresh),
            "netns": str(labels.get("netns") or "") or None,
            "uplink": str(labels.get("uplink") or network_services._setting("BULKHEAD_UPLINK", "")),
            "networks": list((fresh.facts or {}).get("networks") or []),
        },
    }


def network_state(host: Host) -> dict[str, Any]:
    """`GET hosts/self/network/`: the compartments with a member on `host` (nothing of any other), the
    ports published on it, and what no workload may reach. See `network_services.host_network_view`."""
    from compute import network_services

    return network_services.host_network_view(host)


# --- stats ----------------------------------------------------------------------------------------

WORKLOAD_SAMPLE_FIGURES = (
    "cpu_seconds",
    "memory_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
    "block_read_bytes",
    "block_write_bytes",
)
HOST_SAMPLE_FIGURES = ("cpu_seconds", "memory_used_bytes")
MAX_SAMPLE_VALUE = 2.0**63


def _figures(raw: Any, names: tuple[str, ...]) -> dict[str, float | None]:
    if not isinstance(raw, dict) or set(raw) - set(names):
        raise Invalid(f"A sample holds only {', '.join(names)}.", field="samples")
    figures: dict[str, float | None] = {}
    for name in names:
        value = raw.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < MAX_SAMPLE_VALUE
        ):
            raise Invalid(f"{name} must be a non-negative number or null.", field="samples")
        figures[name] = value
    return figures


@audit.denials_audited
def record_samples(
    *, actor: Actor, host: Host, workloads: dict[str, Any], host_sample: dict[str, Any]
) -> int:
    """Add one sample per running workload of `host` and one of the host itself. Figures the portal
    knows (what is allocated, how many run) are counted here, not taken from the host."""
    from compute import sampling

    if not isinstance(workloads, dict):
        raise Invalid("Workload samples are an object keyed by workload id.", field="workloads")
    placed = {str(w.pk): w for w in Workload.objects.filter(host=host).only("id", "tenant_id", "state")}
    foreign = [key for key in workloads if key not in placed]
    if foreign:
        raise _refuse(
            host, "host.samples.report", "No such workload on this host.", workload=str(foreign[0])[:80]
        )
    running = [w for w in placed.values() if w.state == WorkloadState.RUNNING]
    # One that stopped since the agent measured it is simply not sampled (a race, not a lie).
    samples: list[tuple[str, Any, Any, dict[str, Any]]] = [
        ("workload", placed[key].pk, placed[key].tenant_id, _figures(raw, WORKLOAD_SAMPLE_FIGURES))
        for key, raw in workloads.items()
        if placed[key].state == WorkloadState.RUNNING
    ]
    allocated = Workload.objects.filter(
        host=host, state__in=[WorkloadState.RUNNING, WorkloadState.CREATING, WorkloadState.STOPPING]
    ).aggregate(vcpus=Sum("vcpus"), memory=Sum("memory_mib"))
    samples.append(
        (
            "host",
            host.pk,
            None,
            {
                **_figures(host_sample, HOST_SAMPLE_FIGURES),
                "allocated_vcpus": float(allocated["vcpus"] or 0),
                "allocated_memory_bytes": (allocated["memory"] or 0) * 1024 * 1024,
                "workloads_running": len(running),
            },
        )
    )
    sampling.record_many(samples, time.time())
    return len(samples) - 1


# --- network --------------------------------------------------------------------------------------

MAX_REPAIR_DETAILS = 64


def served_compartment_ids(host: Host) -> set[str]:
    """Driver ids (`Compartment.network_id`) of the compartments with a member on `host` (published
    ports belong to members)."""
    from compute.compartments import Compartment

    served = Compartment.objects.filter(allocations__workload__host=host).distinct()
    return {compartment.network_id for compartment in served}


@audit.denials_audited
def report_network_repairs(
    *, actor: Actor, host: Host, repaired: list[str], repaired_by_compartment: dict[str, list[str]]
) -> dict[str, Any]:
    """What the host's agent had to restore in its network: audited, per compartment recorded as drift.
    Only compartments this host serves: others are left out and the attempt audited as denied (the
    served ones are still recorded: a member that left since the agent's apply is a race); texts
    bounded."""
    from compute import network_services

    if not isinstance(repaired_by_compartment, dict) or not isinstance(repaired, list):
        raise Invalid("Repairs are a list and an object keyed by compartment.", field="repaired")
    served = served_compartment_ids(host)
    refused = sorted(str(key)[:80] for key in repaired_by_compartment if key not in served)
    if refused:
        audit.record_denied(actor, "host.network.report", host=host.name, compartments=refused[:10])
        repaired_by_compartment = {k: v for k, v in repaired_by_compartment.items() if k in served}

    def texts(values: Any) -> list[str]:
        if not isinstance(values, list) or len(values) > MAX_REPAIR_DETAILS:
            raise Invalid(f"At most {MAX_REPAIR_DETAILS} repair notes.", field="repaired")
        return [str(value)[:200] for value in values]

    notes = texts(repaired)
    by_compartment = {key: texts(values) for key, values in repaired_by_compartment.items()}
    if not notes:
        return {"recorded": 0, "refused": refused}
    with transaction.atomic():
        audit.record(actor, "host.network.repaired", host, details={"repaired": notes})
        recorded = network_services.record_repairs(
            actor=actor, host=host, repaired_by_compartment=by_compartment
        )
    events.publish(None, {"type": "host", "id": str(host.pk), "network_repaired": notes})
    return {"recorded": recorded, "refused": refused}


def _land_moved(host: Host, op: Any) -> dict[str, Any]:
    from compute import services
    from portal.models import OperationState

    if op.kind != "workload.move" or op.state != OperationState.RUNNING:
        raise Conflict("Only a running move lands its workload.")
    workload = _placed(host, op.target_id, "host.workload.moved")
    created = services.land_moved_workload(
        actor=Actor.system("evacuation"), workload=workload, to_host=op.params["to_host"]
    )
    return {"create_operation": str(created.pk) if created is not None else None}


# --- operations on the host's queue ---------------------------------------------------------------

OPERATION_EVENTS = ("peek", "claim", "progress", "heartbeat", "finish", "fail", "interrupted", "moved")
MAX_RESULT_BYTES = 16 * 1024


def _operation_on(host: Host, op_id: Any) -> Any:
    from portal.models import Operation

    op = Operation.objects.filter(pk=op_id, queue=host.queue).first() if _is_uuid(op_id) else None
    if op is None:
        raise _refuse(
            host, "host.operation.report", "No such operation for this host.", operation=str(op_id)[:80]
        )
    return op


def _operation_view(op: Any) -> dict[str, Any]:
    return {
        "id": str(op.pk),
        "kind": op.kind,
        "state": op.state,
        "target_type": op.target_type,
        "target_id": str(op.target_id) if op.target_id else None,
        "params": op.params,
    }


@audit.denials_audited
def report_operation(
    *,
    actor: Actor,
    host: Host,
    op_id: Any,
    event: str,
    percent: float = 0,
    message: str = "",
    result: dict[str, Any] | None = None,
    error: str = "",
    detail: str = "",
    before: str = "",
    spec: bool = False,
    report: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """An operation queued for this host, as its worker runs it: claimed (answers the operation: kind,
    target, params; None when it is finished or cancelled), progress, heartbeat, finished with a result
    (bounded), failed with a tenant-facing error and an operator-only detail; for a running
    `workload.move`, "moved": the host removed the workload, which now lands on the target the portal
    chose when the move was asked (never a host the reporting host names).

    A claim of an operation on a workload may carry the worker's next two requests (one round trip
    instead of three on the create path): `report` ({expected, changes, never_started}) is the
    workload's first conditional state change, applied as `report_workload_state` applies it (answered
    as "reported": applied or not); `spec` asks for the workload's spec as it is after that report
    ("workload": None when it is not, or no longer, placed on this host)."""
    import json

    from portal import operations
    from portal.models import Operation, OperationState

    if event not in OPERATION_EVENTS:
        raise Invalid("Unknown operation event.", field="event")
    op = _operation_on(host, op_id)
    if event == "peek":  # what it is about, before the host takes the target's lock and claims it
        return operations.peek_view(op)
    if event == "interrupted":
        return {"failed": _fail_interrupted(op, before, error)}
    if event == "claim":
        if report is not None:  # checked before the claim: a refused report changes nothing
            if not isinstance(report, dict):
                raise Invalid("A report is an object.", field="report")
            _checked_report(report.get("expected"), report.get("changes") or {})
        claimed = operations.claim(op.pk)
        if claimed is None:
            return None
        answer = _operation_view(claimed)
        if (spec or report is not None) and claimed.target_type == "workload":
            answer.update(_claimed_workload(actor, host, claimed, report, spec=bool(spec)))
        return answer
    if event == "moved":
        return _land_moved(host, op)
    if event == "progress":
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise Invalid("Progress is a number.", field="percent")
        operations.Progress(op.pk, interval=0)(float(percent), str(message)[:500], force=True)
    elif event == "heartbeat":
        Operation.objects.filter(pk=op.pk, state=OperationState.RUNNING).update(heartbeat_at=timezone.now())
    elif event == "finish":
        if result is not None and (
            not isinstance(result, dict) or len(json.dumps(result, default=str)) > MAX_RESULT_BYTES
        ):
            raise Invalid(f"A result is an object of at most {MAX_RESULT_BYTES} bytes.", field="result")
        if op.kind == COMMIT_KIND and op.state == OperationState.RUNNING and "image" in (result or {}):
            # A commit's image is what `report_commit` recorded: a finish naming one is the host's word only.
            raise _refuse(
                host,
                "host.operation.report",
                "A commit's image is recorded by its report, not by finishing it.",
                error=Conflict,
                operation=str(op.pk),
                reason="commit image",
            )
        operations.finish(op.pk, result=result)
    else:
        operations.fail(op.pk, str(error)[:4000], detail=str(detail)[:8000])
    return None


def _claimed_workload(
    actor: Actor, host: Host, op: Any, report: dict[str, Any] | None, *, spec: bool
) -> dict[str, Any]:
    """The report and spec a claim carries, for the claimed operation's own workload only (the host names
    no workload here); one no longer on this host answers as the separate requests would (refused)."""
    answer: dict[str, Any] = {}
    try:
        if report is not None:
            reported = report_workload_state(
                actor=actor,
                host=host,
                workload_id=op.target_id,
                expected=report.get("expected"),  # type: ignore[arg-type]
                changes=report.get("changes") or {},
                never_started=bool(report.get("never_started")),
            )
            answer["reported"] = bool(reported["applied"])
        if spec:
            answer["workload"] = workload_spec_on(host, op.target_id)
    except NotOnThisHost:
        answer.update(reported=False, workload=None)
    return answer


def running_operations(host: Host) -> dict[str, Any]:
    """The operations running on `host`'s queue as of now (`GET hosts/self/operations/`): the agent's
    start-up re-sync fails those whose worker died (`interrupted`, conditional on `as_of`)."""
    from portal.models import Operation, OperationState

    as_of = timezone.now()
    running = Operation.objects.filter(queue=host.queue, state=OperationState.RUNNING, started_at__lt=as_of)
    return {
        "as_of": as_of.isoformat(),
        "operations": [
            {
                "id": str(op.pk),
                "kind": op.kind,
                "target_type": op.target_type,
                "target_id": str(op.target_id or "") or None,
            }
            for op in running.only("id", "kind", "target_type", "target_id")
        ],
    }


def _fail_interrupted(op: Any, before: Any, error: Any) -> bool:
    """Fail `op` as interrupted only if it is still running under a claim older than `before` (a task
    that claimed it again since is alive)."""
    from datetime import datetime

    from portal import operations
    from portal.models import Operation, OperationState

    try:
        since = datetime.fromisoformat(str(before))
    except ValueError:
        raise Invalid("before is an ISO time.", field="before") from None
    if since.tzinfo is None or since > timezone.now():
        raise Invalid("before is a past time with its zone.", field="before")
    failed = Operation.objects.filter(pk=op.pk, state=OperationState.RUNNING, started_at__lt=since).update(
        state=OperationState.FAILED, finished_at=timezone.now(), error=str(error)[:4000]
    )
    if failed:
        operations.log_step(op.pk, "failed")
    return bool(failed)


# --- commit: the host uploads the layer of a workload's changes, the portal records the image ------

COMMIT_KIND = "workload.commit"
COMMIT_MEDIA_TYPES = (
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.v1.tar+gzip",
)
LAYER_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
COMMIT_LEASE_SECONDS = 3600.0


class LayerRefused(Invalid):
    """A committed layer the portal will not take: its bytes, size or DiffID are not what was said."""


def _commit_on(
    host: Host, workload_id: Any, op_id: Any, action: str, *, settled: bool = False
) -> tuple[Workload, Any]:
    """The workload placed on `host` and the running commit of it on `host`'s queue (`settled`: or that
    commit once it succeeded, for a repeated report). Anything else is refused like a missing object."""
    from portal.models import Operation, OperationState

    workload = _placed(host, workload_id, action)
    states = [OperationState.RUNNING, *([OperationState.SUCCEEDED] if settled else [])]
    op = (
        Operation.objects.filter(
            pk=op_id,
            queue=host.queue,
            kind=COMMIT_KIND,
            target_type="workload",
            target_id=str(workload.pk),
            state__in=states,
        ).first()
        if _is_uuid(op_id)
        else None
    )
    if op is None:
        raise _refuse(host, action, "No such commit on this host.", operation=str(op_id)[:80])
    return workload, op


def _layer_digest(value: Any, field: str) -> str:
    if not isinstance(value, str) or not LAYER_DIGEST.match(value):
        raise Invalid("Not a sha256 digest.", field=field)
    return value


def _layer_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Invalid("size is a number of bytes.", field="size")
    try:
        size = int(value)
    except ValueError:
        raise Invalid("size is a number of bytes.", field="size") from None
    if size < 0:
        raise Invalid("size is a number of bytes.", field="size")
    return size


def _at_most(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The upload's chunks, cut off (refused) past the size the host declared."""
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > size:
            raise LayerRefused("The layer is larger than its declared size.", field="size")
        yield chunk


@audit.denials_audited
def receive_commit_layer(
    *,
    actor: Actor,
    host: Host,
    workload_id: Any,
    op_id: Any,
    digest: Any,
    size: Any,
    chunks: Iterable[bytes],
    declared_length: int | None = None,
) -> dict[str, Any]:
    """The layer a running commit on this host made, streamed into the portal's store: kept only if
    its bytes hash to `digest` and number `size`, and only if `size` fits in what is left of the
    tenant's image storage. The digest is noted on the operation before a byte is read (and dropped
    again if the bytes are refused): the commit uploads and names no other layer.

    Everything but the bytes is checked before the first chunk is taken (the host, the commit, the
    quota, a body length other than `size`, another layer); a body without a length is cut off past
    `size`."""
    from imaging import services as imaging_services
    from imaging.store import DigestMismatch, SizeMismatch
    from portal.models import Operation

    workload, op = _commit_on(host, workload_id, op_id, "host.commit.upload")
    digest = _layer_digest(digest, "digest")
    size = _layer_size(size)
    imaging_services.refuse_beyond_image_quota(workload.tenant, size)
    if declared_length is not None and declared_length != size:
        raise _refuse(
            host,
            "host.commit.upload",
            "The body's length is not the layer's size.",
            error=LayerRefused,
            field="size",
            digest=digest,
            operation=str(op.pk),
        )
    layer = {"digest": digest, "size": size}
    reserved = _reserve_commit_layer(actor, host, op, layer)
    store = imaging_services.get_store()
    lease = store.acquire_lease(f"commit-{op.pk}", [digest], ttl=COMMIT_LEASE_SECONDS)
    try:
        store.ingest_chunks(_at_most(chunks, size), digest=digest, size=size)
    except (DigestMismatch, SizeMismatch, LayerRefused):
        lease.release()
        if reserved:  # the slot is free again for the commit's real layer
            Operation.objects.filter(pk=op.pk, params__layer__digest=digest).update(params=op.params)
        raise _refuse(
            host,
            "host.commit.upload",
            "The layer does not match its digest and size: nothing was kept.",
            error=LayerRefused,
            field="digest",
            digest=digest,
            operation=str(op.pk),
        ) from None
    except BaseException:  # the host went away mid-body: nothing of it is kept, the slot stays its own
        lease.release()
        raise
    return layer


def _reserve_commit_layer(actor: Actor, host: Host, op: Any, layer: dict[str, Any]) -> bool:
    """Note `layer` as the commit's one layer before its bytes are read (True: noted now). A commit has
    one layer: each upload replacing the last (and its lease) would let a host keeping a commit running
    store layer after layer that no quota charges and only an operator's GC removes; a check without the
    conditional write would let concurrent uploads all pass it. The same layer again (a retry) is fine."""
    from portal.models import Operation, OperationState

    noted = op.params.get("layer")
    reserved = False
    if noted is None:
        reserved = bool(
            Operation.objects.filter(pk=op.pk, state=OperationState.RUNNING)
            .exclude(params__has_key="layer")
            .update(params={**op.params, "layer": layer})
        )
        if not reserved:
            noted = (Operation.objects.filter(pk=op.pk).values_list("params", flat=True).first() or {}).get(
                "layer"
            )
    if not reserved and noted != layer:
        raise _refuse(
            host,
            "host.commit.upload",
            "This commit has uploaded its layer already.",
            error=Conflict,
            digest=layer["digest"],
            operation=str(op.pk),
            reason="the commit has another layer",
        )
    return reserved


@audit.denials_audited
def report_commit(*, actor: Actor, host: Host, workload_id: Any, op_id: Any, layer: Any) -> dict[str, Any]:
    """A commit on this host is done: its layer (uploaded for this very operation, its DiffID proven
    here by unpacking it) on top of the workload's image becomes the tenant's new image, written with
    its tags and audit entry in one transaction that also finishes the operation with the image's id.
    Reported again, the same image is answered and nothing is written."""
    from imaging import services as imaging_services
    from imaging.models import Layer
    from imaging.store import DigestMismatch, LayerSpec, StoreError
    from portal import operations
    from portal.models import Operation, OperationState

    workload, op = _commit_on(host, workload_id, op_id, "host.commit.report", settled=True)
    if op.state == OperationState.SUCCEEDED:
        return {"image": (op.result or {}).get("image")}
    if not isinstance(layer, dict):
        raise Invalid("layer is an object.", field="layer")
    digest = _layer_digest(layer.get("digest"), "digest")
    diff_id = _layer_digest(layer.get("diff_id"), "diff_id")
    size = _layer_size(layer.get("size"))
    media_type = layer.get("media_type")
    if media_type not in COMMIT_MEDIA_TYPES:
        raise Invalid("Not a layer media type.", field="media_type")
    store = imaging_services.get_store()
    uploaded = op.params.get("layer") or {}
    present = store.has_blob(digest) and store.blob_path(digest).stat().st_size == size
    if uploaded != {"digest": digest, "size": size} or not present:
        raise _refuse(
            host,
            "host.commit.report",
            "This commit uploaded no such layer.",
            error=LayerRefused,
            field="digest",
            digest=digest,
            operation=str(op.pk),
        )
    try:
        [unpacked] = store.unpack_layers(
            [LayerSpec(blob_digest=digest, media_type=media_type, diff_id=diff_id)]
        )
    except (DigestMismatch, StoreError):
        raise _refuse(
            host,
            "host.commit.report",
            "The layer is not what its DiffID says (or cannot be unpacked).",
            error=LayerRefused,
            field="diff_id",
            digest=digest,
            diff_id=diff_id,
        ) from None
    with transaction.atomic():
        locked = Operation.objects.select_for_update().get(pk=op.pk)
        if locked.state == OperationState.SUCCEEDED:
            return {"image": (locked.result or {}).get("image")}
        if locked.state != OperationState.RUNNING:
            raise Conflict("The commit is no longer running.")
        row, _ = Layer.objects.get_or_create(
            digest=digest,
            defaults={
                "diff_id": diff_id,
                "size": size,
                "media_type": media_type,
                "unpacked_size": unpacked.size,
            },
        )
        image = imaging_services.register_committed_image(
            actor=Actor(user=op.actor, label_override="" if op.actor else "agent"),
            base=workload.image,
            tenant=workload.tenant,
            name=str(op.params.get("name", "")),
            tag=str(op.params.get("tag", "")),
            layer=row,
            source_reference=f"workload {workload.pk}",
        )
        operations.finish(op.pk, result={"image": str(image.pk)})
    store.acquire_lease(f"commit-{op.pk}", [digest], ttl=imaging_services.LEASE_AFTER_COMMIT)
    return {"image": str(image.pk)}


# --- the portal's own machine: the same services without HTTP -------------------------------------


class InProcessLink(InProcessVolumeCalls):
    """`compute.host.link.PortalLink` for a host on the portal's own machine (`make run`'s `local`, test
    agents without a portal URL): the very services the host API's views call, with the same values,
    so both kinds of host are checked alike."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def _run(self, service: Any, **kwargs: Any) -> Any:
        from compute.host.link import HostApiError

        try:
            return service(actor=host_actor(self.host), host=self.host, **kwargs)
        except ServiceError as error:
            raise HostApiError(error.status_code, error.code, error.message) from None

    def _read(self, reader: Any, *args: Any) -> Any:
        from compute.host.link import HostApiError

        try:
            return reader(self.host, *args)
        except ServiceError as error:
            raise HostApiError(error.status_code, error.code, error.message) from None

    def heartbeat(self) -> dict[str, Any]:
        record_heartbeat(self.host)
        return {"host": str(self.host.pk), "name": self.host.name}

    def thread_done(self) -> None:
        """A helper thread (an operation's heartbeat) ends: its database connection goes with it."""
        from django.db import connection

        connection.close()

    def host_self(self) -> dict[str, Any]:
        return dict(self._read(host_profile))

    def network_state(self) -> dict[str, Any]:
        return dict(self._read(network_state))

    def running_operations(self) -> dict[str, Any]:
        return dict(self._read(running_operations))

    def report_facts(self, facts: dict[str, Any]) -> dict[str, Any]:
        return dict(self._run(report_facts, facts=facts))

    def workloads(self) -> list[dict[str, Any]]:
        return desired_set(self.host)

    def workload(self, workload_id: Any) -> dict[str, Any]:
        return dict(self._read(workload_spec_on, workload_id))

    def report_state(
        self,
        workload_id: Any,
        expected: list[str],
        changes: dict[str, Any],
        *,
        never_started: bool = False,
        count_restart: bool = False,
    ) -> dict[str, Any]:
        from compute.host.link import NOT_APPLIED, NOT_FOUND, HostApiError, wire_changes

        try:
            return dict(
                self._run(
                    report_workload_state,
                    workload_id=workload_id,
                    expected=[str(state) for state in expected],
                    changes=wire_changes(changes),
                    never_started=never_started,
                    count_restart=count_restart,
                )
            )
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return dict(NOT_APPLIED)
            raise

    def report_removed(self, workload_id: Any) -> bool:
        from compute.host.link import NOT_FOUND, HostApiError

        try:
            return bool(self._run(report_workload_removed, workload_id=workload_id)["removed"])
        except HostApiError as error:
            if error.status == NOT_FOUND:
                return False
            raise

    def record_samples(self, workloads: dict[str, Any], host_sample: dict[str, Any]) -> int:
        return int(self._run(record_samples, workloads=workloads, host_sample=host_sample))

    def report_network_repairs(
        self, repaired: list[str], repaired_by_compartment: dict[str, list[str]]
    ) -> dict[str, Any]:
        return dict(
            self._run(
                report_network_repairs, repaired=repaired, repaired_by_compartment=repaired_by_compartment
            )
        )

    def operation(self, op_id: Any, event: str, **fields: Any) -> dict[str, Any] | None:
        return self._run(report_operation, op_id=op_id, event=event, **fields)  # type: ignore[no-any-return]

    def upload_commit_layer(self, workload_id: Any, op_id: Any, digest: str, size: int, path: Any) -> None:
        from compute.host.link import UPLOAD_CHUNK

        with open(path, "rb") as blob:
            self._run(
                receive_commit_layer,
                workload_id=workload_id,
                op_id=op_id,
                digest=digest,
                size=size,
                chunks=iter(lambda: blob.read(UPLOAD_CHUNK), b""),
            )

    def report_commit(self, workload_id: Any, op_id: Any, layer: dict[str, Any]) -> dict[str, Any]:
        return dict(self._run(report_commit, workload_id=workload_id, op_id=op_id, layer=layer))


_in_process_links: dict[str, InProcessLink] = {}


def in_process_link(host_id: str) -> InProcessLink:
    """The link factory of the portal's own machine (registered by compute/apps.py)."""
    link = _in_process_links.get(host_id)
    if link is None:
        link = _in_process_links[host_id] = InProcessLink(Host.objects.get(pk=host_id))
    return link
