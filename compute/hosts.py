"""Host registration, facts, heartbeats, lost-host detection, drain, and join tokens."""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compute.choices import HostLostPolicy, HostState, WorkloadState
from compute.models import Host, HostCredential, JoinToken, Workload
from portal import events
from portal.errors import Conflict, Invalid, NotPermitted, ServiceError
from tenants import audit
from tenants.actors import Actor

log = logging.getLogger(__name__)

# Four missed heartbeats (every 10 s): with the 15 s sweep a dead host is `lost` within 55 s of its last
# heartbeat, inside issue 16's 60 s (45 s could take 60 s and a sweep's latency).
LOST_AFTER = timedelta(seconds=40)
JOIN_TOKEN_TTL = timedelta(minutes=30)


def host_state_dir(host: Host | str) -> Path:
    """Per-host state (containers, VMs, networks): separate hosts on one machine never share it."""
    host_id = host.pk if isinstance(host, Host) else host
    path = Path(settings.DATA_DIR) / "hosts" / str(host_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gather_facts(host: Host | None = None, *, probe_runtimes: bool = True) -> dict[str, Any]:
    """What this machine is and can do (`compute.host.facts`, which a joined host's agent calls too)."""
    from compute.host.facts import gather_facts as machine_facts

    return machine_facts(
        Path(settings.DATA_DIR), Path(settings.BULKHEAD_GUEST_DIR), probe_runtimes=probe_runtimes
    )


@transaction.atomic
def register_host(
    *, actor: Actor, name: str, facts: dict[str, Any], profile: dict[str, Any] | None = None
) -> Host:
    """Create or refresh a host row from the facts its agent reported (idempotent by name)."""
    profile = profile or {}
    host, created = Host.objects.select_for_update().get_or_create(name=name)
    host.facts = {**host.facts, **facts}
    if "disk_gib" in facts:
        # What the host may offer from now on: its own reports can lower it, never raise it.
        host.facts["approved_disk_gib"] = facts["disk_gib"]
    host.cpus = int(facts.get("cpus", host.cpus or 1))
    host.memory_mib = int(facts.get("memory_mib", host.memory_mib or 0))
    for field in ("cpu_overcommit", "memory_overcommit", "oci_runtime_override", "domain_type_override"):
        if field in profile:
            setattr(host, field, profile[field])
    if "labels" in profile:
        host.labels = profile["labels"]
    host.last_heartbeat = timezone.now()
    if host.state in (HostState.LOST, HostState.REMOVED):
        # A removed host joins again only with a new operator's token (or `make run` on this machine).
        host.state, host.lost_at, host.removed_at = HostState.READY, None, None
    host.save()
    audit.record(actor, "host.register" if created else "host.refresh", host, details={"name": name})
    return host


def register_local_host(*, actor: Actor) -> Host:
    """`make run`: this machine as host `local` (facts probed once per start)."""
    name = settings.BULKHEAD_HOST_NAME
    facts = gather_facts(Host.objects.filter(name=name).first() or Host(name=name))
    return register_host(actor=actor, name=name, facts=facts)


def heartbeat(host_id: Any) -> None:
    """The agent is alive: a lost host comes back as ready (its agent re-syncs workloads)."""
    now = timezone.now()
    Host.objects.filter(pk=host_id).update(last_heartbeat=now)
    if Host.objects.filter(pk=host_id, state=HostState.LOST).update(state=HostState.READY, lost_at=None):
        host = Host.objects.get(pk=host_id)
        audit.record(Actor.system("agent"), "host.recovered", host)
        events.publish(None, {"type": "host", "id": str(host_id), "state": HostState.READY})


def mark_lost_hosts(now: Any = None) -> list[str]:
    """Hosts silent for longer than LOST_AFTER become lost; their workloads unknown."""
    now = now or timezone.now()
    lost = []
    silent = Host.objects.filter(last_heartbeat__lt=now - LOST_AFTER).exclude(
        state__in=[HostState.LOST, HostState.REMOVED]
    )
    for host in silent:
        with transaction.atomic():
            marked = Host.objects.filter(pk=host.pk).exclude(state=HostState.LOST)
            if not marked.update(state=HostState.LOST, lost_at=now):
                continue
            changed = Workload.objects.filter(host=host).exclude(
                state__in=[WorkloadState.DELETING, WorkloadState.UNKNOWN]
            )
            tenants = set(changed.values_list("tenant_id", flat=True))
            changed.update(state=WorkloadState.UNKNOWN, status_message="host lost")
            audit.record(Actor.system("heartbeat"), "host.lost", host)
        for tenant_id in tenants:
            events.publish(tenant_id, {"type": "workload", "host": host.name, "state": WorkloadState.UNKNOWN})
        events.publish(None, {"type": "host", "id": str(host.pk), "state": HostState.LOST})
        lost.append(host.name)
    return lost


def reschedule_grace() -> timedelta:
    """How long a lost host may come back before its `reschedule` workloads move
    (``BULKHEAD_RESCHEDULE_GRACE_SECONDS``): a short network blip must not double a workload."""
    return timedelta(seconds=float(getattr(settings, "BULKHEAD_RESCHEDULE_GRACE_SECONDS", 30)))


def reschedule_lost_workloads(now: Any = None) -> list[str]:
    """Move the `reschedule` workloads of hosts lost for longer than the grace to other hosts.

    A workload pinned to its host by an operator stays. One that no host can take now stays `unknown`,
    says why, and is tried again at the next sweep. The lost host's copy, if the host comes back, is
    removed by its agent's re-sync (the workload no longer belongs to it)."""
    from compute import services

    now = now or timezone.now()
    moved = []
    candidates = Workload.objects.filter(
        host__state=HostState.LOST,
        host__lost_at__lte=now - reschedule_grace(),
        on_host_lost=HostLostPolicy.RESCHEDULE,
        pinned=False,
    ).exclude(state=WorkloadState.DELETING)
    for workload in candidates.select_related("host", "tenant"):
        try:
            services.reschedule_workload(actor=Actor.system("heartbeat"), workload=workload)
        except ServiceError as error:
            Workload.objects.filter(pk=workload.pk, state=WorkloadState.UNKNOWN).update(
                status_message=f"host lost; not moved yet: {error.message}"[:500]
            )
            continue
        moved.append(workload.name)
    return moved


EVACUATION_DEADLINE_SECONDS = 1800


def run_evacuation(op_id: Any, progress: Any) -> dict[str, Any]:
    """The body of a host evacuation: queue a move per workload, then wait for each to land."""
    import time

    from compute import services
    from portal.models import Operation, OperationState

    op = Operation.objects.get(pk=op_id)
    host = Host.objects.get(pk=op.target_id)
    actor = Actor(user=op.actor) if op.actor is not None else Actor.system("evacuation")
    workloads = list(Workload.objects.filter(host=host).exclude(state=WorkloadState.DELETING))
    refused: dict[str, str] = {}
    moves: dict[str, str] = {}
    for workload in workloads:
        try:
            moves[workload.name] = str(services.move_workload(actor=actor, workload=workload).pk)
        except ServiceError as error:
            refused[workload.name] = error.message
    total = max(len(moves), 1)
    progress(
        5,
        f"Moving {len(moves)} workload(s)" + (f"; {len(refused)} cannot move" if refused else ""),
        force=True,
    )
    landed: dict[str, str] = {}
    deadline = time.monotonic() + EVACUATION_DEADLINE_SECONDS
    while len(landed) < len(moves) and time.monotonic() < deadline:
        for name, move_id in moves.items():
            if name in landed:
                continue
            move = Operation.objects.get(pk=move_id)
            created = _landed_create(move, host)
            if move.state == OperationState.FAILED or (move.finished and created is None):
                landed[name] = "failed"  # the move failed, its target no longer took it, or its host lied
            elif created is not None and created.finished:
                landed[name] = str(created.state)
        progress(5 + 90 * len(landed) / total, f"Moved {len(landed)} of {len(moves)}")
        time.sleep(0.5)
    failed = sorted(name for name, state in landed.items() if state != OperationState.SUCCEEDED)
    return {
        "moved": sorted(name for name, state in landed.items() if state == OperationState.SUCCEEDED),
        "failed": failed,
        "not_moved": refused,
        "unfinished": sorted(set(moves) - set(landed)),
    }


def _landed_create(move: Any, host: Host) -> Any:
    """The create that landed a move's workload on its new host, as the move's result names it; None when
    it names none, or anything but a create of that very workload (the result is the old host's report:
    such a lie is audited as the host's)."""
    import uuid

    from portal.models import Operation

    created = (move.result or {}).get("create_operation")
    if created is None:
        return None
    try:
        create = Operation.objects.filter(
            pk=uuid.UUID(str(created)),
            kind="workload.create",
            target_type="workload",
            target_id=move.target_id,
        ).first()
    except ValueError:
        create = None
    if create is None:
        audit.record_denied(
            Actor.system(f"host {host.name}"),
            "host.operation.report",
            host=host.name,
            operation=str(move.pk),
            reason="the move's result names no create of its workload",
        )
    return create


def _require_operator(actor: Actor, action: str) -> None:
    # A scoped or read-only token of an operator is no operator.
    if not actor.is_operator:
        raise NotPermitted("Only operators manage hosts.", audit_action=action)
    if actor.token is not None and actor.token.read_only:
        raise NotPermitted("This token is read-only.", audit_action=action)


@audit.denials_audited
@transaction.atomic
def set_host_state(*, actor: Actor, host: Host, state: str) -> Host:
    _require_operator(actor, "host.update")
    if host.state == HostState.REMOVED:
        raise Conflict(f"Host {host.name} was removed: join it again with a new join token.")
    if state not in (HostState.READY, HostState.DRAINING, HostState.MAINTENANCE):
        raise Invalid(f"A host can be set to ready, draining or maintenance, not {state!r}.", field="state")
    before = host.state
    Host.objects.filter(pk=host.pk).update(state=state)
    host.refresh_from_db()
    audit.record(actor, "host.state", host, details={"from": before, "to": state})
    return host


@audit.denials_audited
@transaction.atomic
def remove_host(*, actor: Actor, host: Host) -> Host:
    """Retire a host: its credentials stop working at once, nothing is placed on it again, and its row
    stays for the audit trail. Only an empty host: evacuate it first (its workloads' data and names
    must not vanish with it)."""
    _require_operator(actor, "host.remove")
    locked = Host.objects.select_for_update().get(pk=host.pk)
    if locked.state == HostState.REMOVED:
        return locked
    workloads = list(Workload.objects.filter(host=locked).order_by("name").values_list("name", flat=True))
    if workloads:
        shown = ", ".join(workloads[:5]) + (" …" if len(workloads) > 5 else "")
        raise Conflict(
            f"Host {locked.name} still has {len(workloads)} workload(s) ({shown}): evacuate it first.",
            audit_action="host.remove",
        )
    volumes = list(locked.volumes.order_by("name").values_list("name", flat=True)[:6])
    if volumes:
        raise Conflict(
            f"Host {locked.name} still holds volume(s) {', '.join(volumes[:5])}: delete or restore them "
            "elsewhere from a backup first.",
            audit_action="host.remove",
        )
    revoke_host_credentials(actor=actor, host=locked)
    # Unused join tokens for its name would bring it back: they expire with it.
    JoinToken.objects.filter(host_name=locked.name, used_at__isnull=True).update(expires_at=timezone.now())
    before = locked.state
    locked.state, locked.removed_at, locked.lost_at = HostState.REMOVED, timezone.now(), None
    locked.save(update_fields=["state", "removed_at", "lost_at"])
    audit.record(actor, "host.remove", locked, details={"from": before})
    transaction.on_commit(
        lambda: events.publish(None, {"type": "host", "id": str(locked.pk), "state": HostState.REMOVED})
    )
    return locked


HOST_CREDENTIAL_PREFIX = "bhh_"


def issue_host_credential(*, actor: Actor, host: Host) -> str:
    """A new credential for the host (the previous one stops working); the secret, shown once."""
    secret = HOST_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    secret_hash = hash_join_secret(secret)
    with transaction.atomic():
        HostCredential.objects.filter(host=host, revoked_at__isnull=True).update(revoked_at=timezone.now())
        HostCredential.objects.create(host=host, secret_hash=secret_hash)
        audit.record(actor, "host.credential.issue", host)
        # The credential is also the password of the host's broker user: the old one is refused at once.
        transaction.on_commit(lambda: _broker_user_changed(host.pk, secret_hash))
    return secret


def _broker_user_changed(host_id: Any, secret_hash: str | None) -> None:
    """Write (or remove) the host's Redis ACL user; if the broker is away now, the beat's sweep
    (`broker_access.sync_broker_users`) does it when it answers again."""
    import redis

    from compute import broker_access

    try:
        if secret_hash is None:
            broker_access.revoke(host_id)
        else:
            broker_access.grant(host_id, secret_hash)
    except redis.exceptions.RedisError as error:
        log.warning("broker user of host %s not updated yet: %s", host_id, error)


@audit.denials_audited
def rotate_host_credential(*, actor: Actor, host: Host) -> str:
    _require_operator(actor, "host.credential.issue")
    return issue_host_credential(actor=actor, host=host)


@audit.denials_audited
@transaction.atomic
def revoke_host_credentials(*, actor: Actor, host: Host) -> int:
    """The host's credential stops working at once (a host that was stolen or retired)."""
    _require_operator(actor, "host.credential.revoke")
    active = HostCredential.objects.filter(host=host, revoked_at__isnull=True)
    revoked = active.update(revoked_at=timezone.now())
    audit.record(actor, "host.credential.revoke", host, details={"revoked": revoked})
    transaction.on_commit(lambda: _broker_user_changed(host.pk, None))
    return revoked


def host_for_credential(secret: str) -> Host | None:
    """The host whose current credential this is, or None."""
    if not secret.startswith(HOST_CREDENTIAL_PREFIX) or len(secret) > 200:
        return None
    credential = (
        HostCredential.objects.select_related("host")
        .filter(secret_hash=hash_join_secret(secret), revoked_at__isnull=True)
        .first()
    )
    return credential.host if credential is not None else None


def hash_join_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@audit.denials_audited
@transaction.atomic
def create_join_token(
    *, actor: Actor, host_name: str, profile: dict[str, Any] | None = None
) -> tuple[JoinToken, str]:
    _require_operator(actor, "host.join_token")
    # A removed host's name may join again (the same row comes back: its history stays one).
    if Host.objects.filter(name=host_name).exclude(state=HostState.REMOVED).exists():
        raise Conflict(f"A host named {host_name!r} exists already.", field="host_name")
    secret = "bhj_" + secrets.token_urlsafe(32)
    token = JoinToken.objects.create(
        secret_hash=hash_join_secret(secret),
        host_name=host_name,
        profile=profile or {},
        expires_at=timezone.now() + JOIN_TOKEN_TTL,
        created_by=actor.user,
    )
    audit.record(actor, "host.join_token", token, details={"host_name": host_name})
    return token, secret


@transaction.atomic
def redeem_join_token(
    *, secret: str, facts: dict[str, Any], address: str | None
) -> tuple[Host, dict[str, Any]]:
    """A joining host trades its single-use token for a host row and its profile."""
    token = JoinToken.objects.select_for_update().filter(secret_hash=hash_join_secret(secret)).first()
    actor = Actor(source_address=address, label_override="join")
    if token is None or token.used_at is not None or token.expires_at <= timezone.now():
        raise NotPermitted("The join token is unknown, used or expired.", audit_action="host.join")
    host = register_host(actor=actor, name=token.host_name, facts=facts, profile=token.profile)
    if address:
        Host.objects.filter(pk=host.pk).update(address=address)
    token.used_at = timezone.now()
    token.host = host
    token.save(update_fields=["used_at", "host"])
    audit.record(actor, "host.join", host, details={"name": host.name})
    profile = dict(token.profile)
    profile["credential"] = issue_host_credential(actor=actor, host=host)
    return host, profile
