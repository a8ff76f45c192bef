"""Desired-state services: revisions, rollback, plans, apply, export and the reconciler's mode.

Apply and the reconciler change resources only through compute.services (create/start/stop/restart/
delete_workload) and compute.network_services (create/delete_compartment, publish/unpublish_port), and
stamp ``managed_revision`` and ``managed_spec_hash`` on the rows they touch (workloads also the image
reference the document used), so that drift is a comparison. Order: networks, workloads, ports;
deletes the other way round. Both hold the tenant's claim (``DesiredState.claimed_by``) while they work:
one of them at a time per tenant.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from compute import network_services
from compute import services as compute_services
from compute.choices import WorkloadState
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.desired import observe
from compute.desired.document import (
    DesiredResource,
    DocumentError,
    TenantConfig,
    diff_documents,
    export_document,
    issues_at,
    parse_document,
)
from compute.desired.models import (
    DesiredPlan,
    DesiredRevision,
    DesiredState,
    PlanState,
    ReconcileMode,
)
from compute.desired.planning import (
    Plan,
    PlanConflict,
    PlanStep,
    StalePlanError,
    compute_plan,
    structural_diff,
)
from compute.models import Workload
from imaging.models import Image
from portal import operations
from portal.errors import Conflict, Explained, Invalid, ServiceError, tenant_message
from portal.failpoints import failpoint
from portal.models import Operation, OperationState
from tenants import audit
from tenants.actors import Actor
from tenants.models import Quota, Tenant
from volumes import services as volume_services
from volumes.choices import VolumeState
from volumes.models import GIB, Volume, VolumeAttachment

log = logging.getLogger(__name__)

# How long an apply waits for another apply or reconciler run of its tenant to finish.
CLAIM_WAIT_SECONDS = 900
_DIGEST = re.compile(r"^(?P<name>.+)@(?P<digest>sha256:[a-f0-9]{64})$")


class InvalidDocument(Invalid):
    """The document is not valid for this tenant; ``issues`` has the path and line of each problem."""

    code = "invalid_document"

    def __init__(self, error: DocumentError) -> None:
        super().__init__(str(error), field="document")
        self.issues = error.issues


class StalePlan(Conflict):
    code = "stale_plan"


def apply_wait_seconds() -> float:
    """How long an apply waits for a deletion to finish before re-creating the same name."""
    return float(getattr(settings, "BULKHEAD_DESIRED_APPLY_WAIT_SECONDS", 600))


def apply_lease_seconds() -> float:
    """The apply's claim on its tenant lasts this long unless renewed (it is, between and during steps).

    A worker that dies mid-apply stops renewing: one lease later ``resume_interrupted_applies`` sends
    the apply again (``BULKHEAD_DESIRED_APPLY_LEASE_SECONDS``, default 60).
    """
    value = getattr(settings, "BULKHEAD_DESIRED_APPLY_LEASE_SECONDS", None)
    return float(value if value is not None else os.environ.get("BULKHEAD_DESIRED_APPLY_LEASE_SECONDS", 60))


class LeaseLost(Conflict):
    """An apply found its claim taken over (it stalled longer than its lease): another run goes on."""

    code = "lease_lost"


class Lease:
    """Keeps an apply's claim alive: call it often; it renews at most every sixth of the lease."""

    def __init__(self, tenant_id: Any, owner: str) -> None:
        self.tenant_id = tenant_id
        self.owner = owner
        self.seconds = apply_lease_seconds()
        self.renewed = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.renewed < self.seconds / 6:
            return
        renewed = DesiredState.objects.filter(tenant_id=self.tenant_id, claimed_by=self.owner).update(
            claimed_until=timezone.now() + timedelta(seconds=self.seconds)
        )
        if not renewed:
            raise LeaseLost("This apply stalled longer than its lease and another run took its tenant over.")
        self.renewed = time.monotonic()


# --------------------------------------------------------------------------------------------------------
# State and claims


def ensure_state(tenant: Tenant | Any) -> DesiredState:
    """The tenant's DesiredState row, created (mode off) on first use."""
    tenant_id = getattr(tenant, "pk", tenant)
    state, _ = DesiredState.objects.get_or_create(tenant_id=tenant_id)
    return state


def claim(tenant_id: Any, owner: str, lease_seconds: float) -> bool:
    """Take the tenant's exclusive claim (or renew ours); False when someone else holds a live one."""
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now) | Q(claimed_by=owner)
    until = now + timedelta(seconds=lease_seconds)
    if (
        DesiredState.objects.filter(tenant_id=tenant_id)
        .filter(free)
        .update(claimed_by=owner, claimed_until=until)
    ):
        return True
    # Nothing updated: held by someone else, or the tenant has no state row yet (its first apply).
    if DesiredState.objects.filter(tenant_id=tenant_id).exists():
        return False
    ensure_state(tenant_id)
    return bool(
        DesiredState.objects.filter(tenant_id=tenant_id)
        .filter(free)
        .update(claimed_by=owner, claimed_until=until)
    )


def release(tenant_id: Any, owner: str) -> None:
    """Give the claim back, if it is still ours."""
    DesiredState.objects.filter(tenant_id=tenant_id, claimed_by=owner).update(
        claimed_by="", claimed_until=None
    )


def claim_waiting(tenant_id: Any, owner: str, lease_seconds: float, timeout: float) -> None:
    """Wait (polling) until the claim is ours; raise Conflict after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not claim(tenant_id, owner, lease_seconds):
        if time.monotonic() > deadline:
            raise Conflict("Another apply or reconciler run of this tenant is in progress.")
        time.sleep(0.2)


@audit.denials_audited
@transaction.atomic
def set_mode(*, actor: Actor, tenant: Tenant, mode: str) -> DesiredState:
    """Turn the reconciler off, to monitor, or to autocorrect; a newly enabled one runs at the next tick."""
    if mode not in ReconcileMode.values:
        raise Invalid(f"mode must be one of {', '.join(ReconcileMode.values)}.", field="mode")
    state = ensure_state(tenant)
    state = DesiredState.objects.select_for_update().get(pk=state.pk)
    if state.mode != mode:
        DesiredState.objects.filter(pk=state.pk).update(mode=mode, next_run_at=timezone.now(), failures=0)
        audit.record(actor, "desired.mode", tenant, details={"from": state.mode, "to": mode})
    state.refresh_from_db()
    return state


# --------------------------------------------------------------------------------------------------------
# Documents


def _reference_fields(reference: str) -> dict[str, str]:
    """The image fields a reference names: name and tag (name alone: tag latest), or name and digest."""
    match = _DIGEST.match(reference)
    if match:
        return {"name": match["name"], "manifest_digest": match["digest"]}
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:  # "host:5000/name" has a port, not a tag
        name, tag = reference, "latest"
    return {"name": name, "tag": tag}


class TenantImages:
    """Resolves image references as ``tenant`` sees them (its own images before public ones of the same
    name); ``prefetch`` looks a whole document's references up in one query."""

    def __init__(self, tenant: Tenant | Any) -> None:
        self.tenant_id = getattr(tenant, "pk", tenant)
        self.found: dict[str, Image | None] = {}

    def _visible(self) -> Any:
        return Image.objects.filter(Q(tenant_id=self.tenant_id) | Q(tenant__isnull=True))

    def prefetch(self, references: Iterable[str]) -> None:
        wanted = [reference for reference in set(references) if reference not in self.found]
        if not wanted:
            return
        fields = {reference: _reference_fields(reference) for reference in wanted}
        condition = Q()
        for named in fields.values():
            condition |= Q(**named)
        # Own images before public ones of the same name: the first match of a reference wins.
        candidates = list(self._visible().filter(condition).order_by(F("tenant_id").asc(nulls_last=True)))
        for reference, named in fields.items():
            self.found[reference] = next(
                (i for i in candidates if all(getattr(i, k) == v for k, v in named.items())), None
            )

    def image(self, reference: str) -> Image | None:
        if reference not in self.found:
            self.prefetch([reference])
        return self.found[reference]

    def __call__(self, reference: str) -> str | None:
        image = self.image(reference)
        return str(image.pk) if image is not None else None


def resolve_image(tenant: Tenant | Any, reference: str) -> Image | None:
    """The image a tenant can see under ``reference`` (name:tag, name, name@sha256:...), its own first."""
    return TenantImages(tenant).image(reference)


def _tenant_compartments(tenant_id: Any) -> list[Compartment]:
    return list(Compartment.objects.filter(tenant_id=tenant_id).order_by("name"))


def _structural_issues(config: TenantConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """What compartments can do today, independent of the tenant's state."""
    located: list[tuple[tuple[str | int, ...], str]] = []
    limit = network_services.MAX_COMPARTMENTS_PER_WORKLOAD
    on_network: set[str] = set()
    for index, workload in enumerate(config.workloads):
        if workload.networks:
            on_network.add(workload.name)
        if len(workload.networks) > limit:
            located.append(
                (
                    ("spec", "workloads", index, "networks", limit),
                    f"a workload can join at most {limit} network for now",
                )
            )
    declared_workloads = {workload.name for workload in config.workloads}
    for index, port in enumerate(config.ports):
        if port.workload in declared_workloads and port.workload not in on_network:
            located.append(
                (
                    ("spec", "ports", index, "workload"),
                    f"workload {port.workload!r} is on no network, so it has no address to publish "
                    "a port to: give it networks",
                )
            )
    return located


def _state_issues(
    config: TenantConfig, compartments: Iterable[Compartment]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Declared subnets that overlap a network of the tenant that stays (exists and is not replaced)."""
    declared = {network.name: network for network in config.networks}
    staying: list[Compartment] = []
    for compartment in compartments:
        wanted = declared.get(compartment.name)
        if wanted is None:
            if compartment.managed_revision is None and not config.prune:
                staying.append(compartment)
        elif wanted.subnet in (None, compartment.subnet) and wanted.nat == compartment.nat:
            staying.append(compartment)
    located: list[tuple[tuple[str | int, ...], str]] = []
    # Each subnet parsed once: a thousand-resource document compares every pair.
    staying_networks = [(compartment, compartment.network) for compartment in staying]
    for index, network in enumerate(config.networks):
        if network.subnet is None:
            continue
        subnet = ipaddress.IPv4Network(network.subnet)
        for compartment, existing in staying_networks:
            if compartment.name != network.name and subnet.overlaps(existing):
                located.append(
                    (
                        ("spec", "networks", index, "subnet"),
                        f"subnet {subnet} overlaps {compartment.subnet} of the tenant's existing network "
                        f"{compartment.name!r}",
                    )
                )
                break
    return located


def _tenant_volume_sizes(tenant_id: Any) -> dict[str, int]:
    """The tenant's volumes (not being deleted) by name: their sizes in GiB."""
    rows = (
        Volume.objects.filter(tenant_id=tenant_id)
        .exclude(state=VolumeState.DELETING)
        .values_list("name", "size_bytes")
    )
    return {name: size // GIB for name, size in rows}


def _volume_quota_issues(
    tenant_id: Any, config: TenantConfig, existing: dict[str, int]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Volumes to create or grow beyond the tenant's ``volume_bytes`` quota, at the first that does not fit.

    Deletions the document asks for are not counted as room: a volume's bytes come back only once its
    host has removed it, after the apply started.
    """
    quota = Quota.objects.filter(tenant_id=tenant_id).values("volume_bytes", "used_volume_bytes").first()
    if quota is None:
        return []
    needed = 0
    for index, volume in enumerate(config.volumes):
        more = max(volume.size_gib - existing.get(volume.name, 0), 0) * GIB
        if not more:
            continue
        needed += more
        if quota["used_volume_bytes"] + needed > quota["volume_bytes"]:
            free = max(quota["volume_bytes"] - quota["used_volume_bytes"], 0)
            return [
                (
                    ("spec", "volumes", index, "size_gib"),
                    f"over the tenant's volume quota: this document's new and grown volumes need "
                    f"{needed // GIB} GiB up to here, {free // GIB} GiB of {quota['volume_bytes'] // GIB} "
                    "GiB are free; nothing is applied",
                )
            ]
    return []


def volume_bytes_needed(plan: Plan, tenant: Tenant | Any) -> int:
    """Bytes of ``volume_bytes`` quota the plan's volume creates and grows take."""
    existing = _tenant_volume_sizes(getattr(tenant, "pk", tenant))
    needed = 0
    for step in plan.steps:
        if step.kind == "volume" and step.action in ("create", "update") and step.spec is not None:
            needed += max(int(step.spec["size_gib"]) - existing.get(step.spec["name"], 0), 0) * GIB
    return needed


def parse_for_tenant(
    tenant: Tenant | Any, text: str, *, check_images: bool = True, check_state: bool | None = None
) -> TenantConfig:
    """Parse and validate ``text`` for ``tenant``; raise InvalidDocument with every issue.

    Images are resolved against what the tenant can see (``check_images``). The tenant's compartments are
    networks a workload may use without declaring them (when they stay: unmanaged, prune off), and with
    ``check_state`` (default: as ``check_images``) a declared subnet overlapping one that stays is refused
    at its line, and so are volumes that would not fit the tenant's volume quota. The tenant's volumes are
    ones a workload may mount without declaring them (another tenant's are unknown, like missing ones).
    Host ports must lie in the operator's published port range.
    """
    tenant_id = getattr(tenant, "pk", tenant)
    check_state = check_images if check_state is None else check_state
    resolver = TenantImages(tenant_id)

    compartments = _tenant_compartments(tenant_id)
    if check_state:
        known = [c.name for c in compartments if c.managed_revision is None]
    else:
        known = [c.name for c in compartments]
    volumes = _tenant_volume_sizes(tenant_id)
    ports = network_services.published_port_range()
    try:
        config = parse_document(
            text,
            resolver if check_images else None,
            known_networks=known,
            known_volumes=volumes,
            host_port_range=(ports.start, ports.stop - 1),
        )
        located = _structural_issues(config)
        if check_state:
            located += _state_issues(config, compartments)
            located += _volume_quota_issues(tenant_id, config, volumes)
        if located:
            raise DocumentError(issues_at(text, located))
    except DocumentError as error:
        raise InvalidDocument(error) from None
    return config


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@audit.denials_audited
@transaction.atomic
def save_revision(
    *, actor: Actor, tenant: Tenant, text: str, message: str = ""
) -> tuple[DesiredRevision, bool]:
    """Validate and store ``text`` as the tenant's next revision; the latest one if its text is identical.

    Returns the revision and whether it is new. An invalid document stores nothing.
    """
    parse_for_tenant(tenant, text)
    state = ensure_state(tenant)
    DesiredState.objects.select_for_update().filter(pk=state.pk).first()  # numbers are allocated in turn
    latest = DesiredRevision.objects.filter(tenant=tenant).order_by("-number").first()
    if latest is not None and latest.text == text:
        return latest, False
    revision = _create_revision(actor, tenant, text, message, (latest.number if latest else 0) + 1)
    return revision, True


def _create_revision(
    actor: Actor, tenant: Tenant, text: str, message: str, number: int, rolled_back_from: int | None = None
) -> DesiredRevision:
    revision = DesiredRevision.objects.create(
        tenant=tenant,
        number=number,
        text=text,
        sha256=_sha256(text),
        message=message[:500],
        author=actor.user,
        author_label=actor.label[:200],
        rolled_back_from=rolled_back_from,
    )
    audit.record(
        actor,
        "desired.revision",
        revision,
        tenant=tenant,
        details={"number": number, "message": message[:200], "rolled_back_from": rolled_back_from},
    )
    return revision


@audit.denials_audited
@transaction.atomic
def rollback(*, actor: Actor, revision: DesiredRevision, message: str = "") -> DesiredRevision:
    """A new revision with the text of an old one (re-validated: its images may be gone)."""
    tenant = revision.tenant
    parse_for_tenant(tenant, revision.text)
    state = ensure_state(tenant)
    DesiredState.objects.select_for_update().filter(pk=state.pk).first()
    latest = DesiredRevision.objects.filter(tenant=tenant).aggregate(n=Max("number"))["n"] or 0
    return _create_revision(
        actor,
        tenant,
        revision.text,
        message or f"Rollback to revision {revision.number}",
        latest + 1,
        rolled_back_from=revision.number,
    )


def _resources_without_images(tenant: Tenant, text: str) -> list[DesiredResource]:
    return parse_for_tenant(tenant, text, check_images=False).resources()


def diff_revisions(old: DesiredRevision, new: DesiredRevision) -> dict[str, Any]:
    """Text diff and resource-level differences between two revisions of one tenant."""
    steps = structural_diff(
        _resources_without_images(old.tenant, old.text), _resources_without_images(new.tenant, new.text)
    )
    return {
        "from": old.number,
        "to": new.number,
        "diff": diff_documents(
            old.text, new.text, old_label=f"revision {old.number}", new_label=f"revision {new.number}"
        ),
        "changes": [step.to_dict() for step in steps],
    }


def export_for(tenant: Tenant) -> str:
    """The tenant's current resources as a document it can submit to adopt them."""
    return export_document(observe.observed_resources(tenant), name=tenant.name)


# --------------------------------------------------------------------------------------------------------
# Plans


def plan_for(tenant: Tenant, config: TenantConfig) -> Plan:
    """The plan that makes the tenant's observed resources match ``config``."""
    observed = observe.observed_resources(tenant)
    try:
        return compute_plan(
            config.resources(), observed, prune=config.prune, prune_volumes=config.prune_volumes
        )
    except PlanConflict as conflict:
        raise Conflict(f"The document cannot be applied: {conflict}") from None


def create_plan(
    *, actor: Actor, tenant: Tenant, revision: DesiredRevision | None = None, text: str | None = None
) -> DesiredPlan:
    """Plan a revision (or, as a preview that cannot be applied, an unsaved document) and store it."""
    if revision is None and text is None:
        raise Invalid("Give a revision or a document to plan.", field="revision")
    config = parse_for_tenant(tenant, revision.text if revision is not None else str(text))
    plan = plan_for(tenant, config)
    row = DesiredPlan.objects.create(
        tenant=tenant,
        revision=revision,
        plan=plan.to_dict(),
        observed_fingerprint=plan.observed_fingerprint,
        desired_fingerprint=plan.desired_fingerprint,
        created_by=actor.user,
    )
    audit.record(
        actor,
        "desired.plan",
        row,
        tenant=tenant,
        details={"revision": revision.number if revision else None, "summary": plan.summary()},
    )
    return row


def _observed_fingerprint(tenant: Tenant) -> str:
    from compute.desired.planning import observed_fingerprint

    return observed_fingerprint(observe.observed_resources(tenant))


def apply_plan(*, actor: Actor, plan: DesiredPlan, just_planned: bool = False) -> Operation:
    """Queue the execution of exactly this stored plan; 409 when it is stale, a preview, or not new.

    ``just_planned``: the plan was made by this very request, from what is observed now; it is not read
    again here (the task checks staleness under the tenant's claim before it runs any step)."""
    from compute.desired import tasks

    if plan.revision_id is None:
        raise Conflict("This plan is a preview of an unsaved document; save it as a revision and plan that.")
    if plan.state != PlanState.PLANNED:
        raise Conflict(f"This plan is {plan.state}; make a new plan.")
    if not just_planned and _observed_fingerprint(plan.tenant) != plan.observed_fingerprint:
        DesiredPlan.objects.filter(pk=plan.pk, state=PlanState.PLANNED).update(state=PlanState.STALE)
        raise StalePlan(
            "The tenant's resources changed since this plan was made; make a new plan and review it.",
            field="plan",
        )
    with transaction.atomic():
        locked = DesiredPlan.objects.select_for_update().get(pk=plan.pk)
        if locked.state != PlanState.PLANNED or locked.operation_id is not None:
            raise Conflict("This plan is already being applied.")
        op = operations.start(
            kind="desired.apply",
            task=tasks.apply_plan,
            actor=actor,
            tenant=plan.tenant,
            target=locked,
            params={"plan": str(plan.pk), "revision": locked.revision.number if locked.revision else None},
        )
        DesiredPlan.objects.filter(pk=plan.pk).update(operation=op)
        audit.record(
            actor,
            "desired.apply",
            locked,
            tenant=plan.tenant,
            details={"revision": op.params["revision"], "summary": plan.plan.get("summary", {})},
        )
    return op


@dataclass
class SavedAndApplied:
    revision: DesiredRevision
    revision_created: bool
    plan: DesiredPlan
    operation: Operation | None


def save_plan_and_apply(*, actor: Actor, tenant: Tenant, text: str, message: str = "") -> SavedAndApplied:
    """What ``bulkhead apply --yes`` did in three requests, in one: save the revision, plan it, apply
    the plan. Each step is its own service (validated, audited) as before. The plan is applied unless it
    changes nothing and the revision already is the tenant's target (then there is no operation)."""
    revision, created = save_revision(actor=actor, tenant=tenant, text=text, message=message)
    plan = create_plan(actor=actor, tenant=tenant, revision=revision)
    unchanged = all(step["action"] in ("noop", "keep") for step in plan.plan["steps"])
    if unchanged and ensure_state(tenant).target_revision == revision.number:
        return SavedAndApplied(revision, created, plan, None)
    return SavedAndApplied(revision, created, plan, apply_plan(actor=actor, plan=plan, just_planned=True))


# --------------------------------------------------------------------------------------------------------
# Executing steps (apply and autocorrect)


@dataclass
class StepOutcome:
    key: str
    action: str
    outcome: str  # done | submitted | skipped | waiting | failed
    detail: str = ""
    operations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "action": self.action,
            "outcome": self.outcome,
            "detail": self.detail,
            "operations": self.operations,
        }


def _in_flight(workload: Workload) -> bool:
    return Operation.objects.filter(
        target_type="workload",
        target_id=str(workload.pk),
        state__in=[OperationState.QUEUED, OperationState.RUNNING],
    ).exists()


def _compute_spec(tenant: Tenant, spec: dict[str, Any]) -> compute_services.WorkloadSpec:
    image = compute_services.usable_images(tenant).filter(pk=spec.get("image_id")).first()
    if image is None:
        raise Invalid(f"The image {spec['image']!r} is no longer available to this tenant.", field="image")
    return compute_services.WorkloadSpec(
        name=spec["name"],
        image=image,
        isolation=spec["isolation"],
        command=spec["command"],
        args=spec["args"],
        env=dict(spec["env"]),
        secret_env=dict(spec.get("secret_env") or {}),
        workdir=spec["workdir"] or "",
        user=spec["user"] or "",
        vcpus=Decimal(str(spec["vcpus"])),
        memory_mib=int(spec["memory_mib"]),
        disk_gib=int(spec.get("disk_gib", 1)),
        restart_policy=spec["restart"],
        on_host_lost=spec.get("on_host_lost") or "wait",
    )


class ApplyIncomplete(Explained, RuntimeError):
    """Some steps of an apply failed or still wait; their reasons are the tenant's to read."""


class Executor:
    """Runs plan steps through compute.services (workloads) and compute.network_services (networks and
    published ports), idempotently: a step finds what an earlier, interrupted run already did.

    ``wait`` (apply): a create whose name is still being deleted waits for the deletion, up to a deadline.
    Without it (reconciler) such a step is reported ``waiting`` and the next run does it; a workload with
    an operation in flight is left alone (``skip_in_flight``).
    """

    def __init__(
        self,
        *,
        actor: Actor,
        tenant: Tenant,
        revision: int,
        wait: bool,
        skip_in_flight: bool = False,
        progress: Callable[..., None] | None = None,
        keepalive: Callable[[], None] | None = None,
    ) -> None:
        self.actor = actor
        self.tenant = tenant
        self.revision = revision
        self.wait = wait
        self.skip_in_flight = skip_in_flight
        self.progress = progress or (lambda *a, **k: None)
        self.keepalive = keepalive or (lambda: None)
        self.outcomes: list[StepOutcome] = []

    def run(self, plan: Plan) -> list[StepOutcome]:
        """Teardown (ports, workloads, networks), then build (networks, workloads, ports)."""
        teardown, build = plan.teardown_steps(), plan.build_steps()
        total = max(1, len(teardown) + len(build))
        for done, step in enumerate(teardown):
            self.keepalive()
            self.progress(100 * done / total, f"Removing {step.key}")
            self._guarded(step, self._teardown)
            failpoint("desired.apply.after_step")
        for done, step in enumerate(build, start=len(teardown)):
            self.keepalive()
            self.progress(100 * done / total, f"{step.action.capitalize()} {step.key}")
            self._guarded(step, self._build)
            failpoint("desired.apply.after_step")
        for step in plan.keep_steps():
            self._guarded(step, self._keep_volume)
        return self.outcomes

    def _pause(self) -> None:
        """Between two polls of a wait: the claim stays ours."""
        time.sleep(0.2)
        self.keepalive()

    def _guarded(self, step: PlanStep, run: Callable[[PlanStep], StepOutcome]) -> None:
        try:
            outcome = run(step)
        except LeaseLost:
            raise
        except Exception as error:  # one failed step must not stop the others; the result says which
            log.warning("desired step %s %s failed: %s", step.action, step.key, error)
            # The result is the tenant's to read: their own errors in full, a generic text for ours.
            outcome = StepOutcome(step.key, step.action, "failed", tenant_message(error)[:500])
        self.outcomes.append(outcome)

    @staticmethod
    def _name(step: PlanStep) -> str:
        return step.key.split("/", 1)[1]

    def _workload(self, name: str) -> Workload | None:
        return Workload.objects.filter(tenant=self.tenant, name=name).select_related("host").first()

    # Teardown: deletes, and the removal half of replaces.
    def _teardown(self, step: PlanStep) -> StepOutcome:
        if step.kind == "network":
            return self._teardown_network(step)
        if step.kind == "volume":
            return self._teardown_volume(step)
        if step.kind == "port":
            return self._teardown_port(step)
        name = self._name(step)
        workload = self._workload(name)
        if workload is None:
            return StepOutcome(step.key, step.action, "done", "already gone")
        if workload.state == WorkloadState.DELETING:
            return StepOutcome(step.key, step.action, "submitted", "deletion in progress")
        op = compute_services.delete_workload(actor=self.actor, workload=workload)
        return StepOutcome(step.key, step.action, "submitted", "deleting", [str(op.pk)])

    def _wait_until_gone(self, name: str) -> bool:
        deadline = time.monotonic() + apply_wait_seconds()
        while Workload.objects.filter(tenant=self.tenant, name=name).exists():
            if not self.wait or time.monotonic() > deadline:
                return False
            self._pause()
        return True

    # Build: creates, the creation half of replaces, updates.
    def _build(self, step: PlanStep) -> StepOutcome:
        assert step.spec is not None and step.spec_hash is not None
        if step.kind == "network":
            return self._build_network(step)
        if step.kind == "volume":
            return self._build_volume(step)
        if step.kind == "port":
            return self._build_port(step)
        name = self._name(step)
        workload = self._workload(name)
        if step.action == "replace" or (workload is not None and workload.state == WorkloadState.DELETING):
            if not self._wait_until_gone(name):
                return StepOutcome(step.key, step.action, "waiting", "waiting for the old one to be deleted")
            workload = None
        if workload is None:
            return self._create(step, name)
        if self.skip_in_flight and _in_flight(workload):
            return StepOutcome(step.key, step.action, "waiting", "an operation on it is in progress")
        return self._update(step, workload)

    def _compartments(self, names: Iterable[str]) -> list[Compartment]:
        """The compartments named (in order); a missing one is a clear error, not the default network."""
        names = list(names)
        found = {c.name: c for c in Compartment.objects.filter(tenant=self.tenant, name__in=names)}
        missing = [name for name in names if name not in found]
        if missing:
            raise Conflict(f"The network {missing[0]!r} does not exist (was its creation refused?).")
        return [found[name] for name in names]

    def _create(self, step: PlanStep, name: str) -> StepOutcome:
        assert step.spec is not None
        spec = _compute_spec(self.tenant, step.spec)
        # Exactly the declared networks ([]: none): the default compartment would be drift.
        compartments = self._compartments(step.spec.get("networks") or ())
        mounts = step.spec.get("volumes") or []
        unready = self._wait_for_volumes([mount["volume"] for mount in mounts])
        if unready:
            return StepOutcome(step.key, step.action, "waiting", unready)
        with transaction.atomic():
            try:
                op = compute_services.create_workload(
                    actor=self.actor,
                    tenant=self.tenant,
                    spec=spec,
                    start=step.spec["state"] == "running",
                    compartments=compartments,
                    volumes=self._volume_mounts(mounts),
                )
            except IntegrityError:
                raise Conflict(f"A workload named {name!r} appeared meanwhile.") from None
            Workload.objects.filter(tenant=self.tenant, name=name).update(
                managed_revision=self.revision,
                managed_spec_hash=step.spec_hash,
                managed_image_reference=step.spec["image"],
            )
        return StepOutcome(step.key, step.action, "submitted", "creating", [str(op.pk)])

    def _update(self, step: PlanStep, workload: Workload) -> StepOutcome:
        assert step.spec is not None
        spec = step.spec
        wanted = _compute_spec(self.tenant, spec)
        ops: list[str] = []
        remounted = self._remount(step, workload, ops)
        if isinstance(remounted, StepOutcome):
            return remounted
        with transaction.atomic():
            changed = compute_services.update_workload(
                actor=self.actor,
                workload=workload,
                changes={name: getattr(wanted, name) for name in compute_services.UPDATABLE_FIELDS},
            )
            Workload.objects.filter(pk=workload.pk).update(
                managed_revision=self.revision,
                managed_spec_hash=step.spec_hash,
                managed_image_reference=spec["image"],
            )
            locked = Workload.objects.select_related("host", "tenant").get(pk=workload.pk)
            current = observe.run_state(locked)
            if spec["state"] == "running":
                if current == "stopped" or locked.state == WorkloadState.UNKNOWN:
                    ops.append(str(compute_services.start_workload(actor=self.actor, workload=locked).pk))
                elif changed & compute_services.RESTART_FIELDS and locked.state == WorkloadState.RUNNING:
                    ops.append(str(compute_services.restart_workload(actor=self.actor, workload=locked).pk))
            elif current == "running":
                ops.append(str(compute_services.stop_workload(actor=self.actor, workload=locked).pk))
        detail = ", ".join(sorted(changed | remounted)) or "recorded"
        return StepOutcome(step.key, step.action, "submitted" if ops else "done", detail, ops)

    # Volumes (through volumes.services: quota, placement on a pool, one writer, stopped workloads).
    def _volume(self, name: str) -> Volume | None:
        return (
            Volume.objects.filter(tenant=self.tenant, name=name)
            .exclude(state=VolumeState.DELETING)
            .select_related("host", "tenant")
            .first()
        )

    def _wait_for_volumes(self, names: Iterable[str]) -> str:
        """Wait (apply) until the named volumes are ready; "" when they are, else why not (yet)."""
        names = sorted(set(names))
        if not names:
            return ""
        deadline = time.monotonic() + apply_wait_seconds()
        while True:
            states = dict(
                Volume.objects.filter(tenant=self.tenant, name__in=names)
                .exclude(state=VolumeState.DELETING)
                .values_list("name", "state")
            )
            missing = [name for name in names if name not in states]
            if missing:
                raise Conflict(f"The volume {missing[0]!r} does not exist (was its creation refused?).")
            failed = [name for name, state in states.items() if state == VolumeState.FAILED]
            if failed:
                raise Conflict(f"The volume {failed[0]!r} failed; delete it or fix it first.")
            busy = sorted(name for name, state in states.items() if state != VolumeState.READY)
            if not busy:
                return ""
            if not self.wait or time.monotonic() > deadline:
                return f"waiting for volume {busy[0]!r} to be ready ({states[busy[0]]})"
            self._pause()

    def _volume_mounts(self, mounts: Iterable[dict[str, Any]]) -> list[volume_services.VolumeMount]:
        mounts = list(mounts)
        found = {
            volume.name: volume
            for volume in Volume.objects.filter(
                tenant=self.tenant, name__in=[mount["volume"] for mount in mounts]
            ).exclude(state=VolumeState.DELETING)
        }
        result = []
        for mount in mounts:
            volume = found.get(mount["volume"])
            if volume is None:  # the tenant's own volumes only: another tenant's reads like a missing one
                raise Conflict(f"The volume {mount['volume']!r} does not exist (was its creation refused?).")
            result.append(
                volume_services.VolumeMount(volume=volume, path=mount["path"], read_only=mount["read_only"])
            )
        return result

    def _remount(self, step: PlanStep, workload: Workload, ops: list[str]) -> set[str] | StepOutcome:
        """Make the workload's attachments the declared ones: stop it, detach and attach, in one
        transaction (the services refuse both on a running workload); the caller starts it again.

        Returns {"volumes"} when they changed, an empty set when they already matched, or the outcome to
        report while the workload is still stopping (apply waits for it; the reconciler comes back).
        """
        assert step.spec is not None
        wanted = {
            (mount["path"], mount["volume"], bool(mount["read_only"]))
            for mount in step.spec.get("volumes") or ()
        }
        current = {
            (attachment.path, attachment.volume.name, attachment.read_only): attachment
            for attachment in VolumeAttachment.objects.filter(workload=workload).select_related("volume")
        }
        if set(current) == wanted:
            return set()
        unready = self._wait_for_volumes(name for _, name, _ in wanted - set(current))
        if unready:
            return StepOutcome(step.key, step.action, "waiting", unready)
        if not self._stopped_for_remount(workload, ops):
            return StepOutcome(
                step.key, step.action, "waiting", "stopping it to change its volumes", list(ops)
            )
        locked = Workload.objects.get(pk=workload.pk)
        added = [
            {"path": path, "volume": name, "read_only": read_only}
            for path, name, read_only in sorted(wanted - set(current))
        ]
        try:
            with transaction.atomic():  # all or nothing: a refused attach keeps the old mounts
                for key in sorted(set(current) - wanted):
                    volume_services.detach_volume(actor=self.actor, attachment=current[key])
                for mount in self._volume_mounts(added):
                    volume_services.attach_volume(
                        actor=self.actor,
                        volume=mount.volume,
                        workload=locked,
                        path=mount.path,
                        read_only=mount.read_only,
                    )
        except ServiceError as error:
            # The service's own denial entry was rolled back with this transaction: record it again.
            if error.audit_action:
                audit.record_denied(self.actor, error.audit_action, tenant=self.tenant, reason=error.message)
            raise
        return {"volumes"}

    def _stopped_for_remount(self, workload: Workload, ops: list[str]) -> bool:
        """Stop the workload if it runs, and wait (apply) until the host says it stopped."""
        deadline = time.monotonic() + apply_wait_seconds()
        stop_sent = False
        while True:
            current = Workload.objects.get(pk=workload.pk)
            if current.state in volume_services.STOPPED_STATES:
                return True
            if current.state == WorkloadState.DELETING:
                raise Conflict(f"{current.name} is being deleted.")
            if not stop_sent and (current.desired_running or current.state == WorkloadState.RUNNING):
                ops.append(str(compute_services.stop_workload(actor=self.actor, workload=current).pk))
                stop_sent = True
            if not self.wait or time.monotonic() > deadline:
                return False
            self._pause()

    def _teardown_volume(self, step: PlanStep) -> StepOutcome:
        volume = self._volume(self._name(step))
        if volume is None:
            return StepOutcome(step.key, step.action, "done", "already gone")
        deadline = time.monotonic() + apply_wait_seconds()
        # Workloads being deleted still hold their attachments until their host is done with them.
        while set(
            VolumeAttachment.objects.filter(volume=volume).values_list("workload__state", flat=True)
        ) == {WorkloadState.DELETING}:
            if not self.wait or time.monotonic() > deadline:
                return StepOutcome(
                    step.key, step.action, "waiting", "waiting for its workloads' deletion to finish"
                )
            self._pause()
        op = volume_services.delete_volume(actor=self.actor, volume=volume)
        return StepOutcome(step.key, step.action, "submitted", "deleting with its data", [str(op.pk)])

    def _build_volume(self, step: PlanStep) -> StepOutcome:
        assert step.spec is not None
        spec = step.spec
        name = spec["name"]
        volume = self._volume(name)
        ops: list[str] = []
        details: list[str] = []
        # Each service runs in its own transaction (a refusal keeps its audit entry); the stamp follows.
        # Interrupted in between, the volume exists unmanaged and the resumed apply adopts it.
        if volume is None:
            op = volume_services.create_volume(
                actor=self.actor, tenant=self.tenant, name=name, size_gib=spec["size_gib"]
            )
            ops.append(str(op.pk))
            volume = Volume.objects.select_related("host", "tenant").get(tenant=self.tenant, name=name)
            details.append(f"creating ({spec['size_gib']} GiB on {volume.host.name})")
        elif spec["size_gib"] * GIB != volume.size_bytes:
            unready = self._wait_for_volumes([name])
            if unready:
                return StepOutcome(step.key, step.action, "waiting", unready)
            # A shrink never gets here: the plan refuses it; the service would too.
            op = volume_services.resize_volume(actor=self.actor, volume=volume, size_gib=spec["size_gib"])
            ops.append(str(op.pk))
            details.append(f"growing to {spec['size_gib']} GiB")
        details.extend(self._schedule(volume, spec.get("backups")))
        Volume.objects.filter(pk=volume.pk).update(
            managed_revision=self.revision, managed_spec_hash=step.spec_hash
        )
        return StepOutcome(
            step.key, step.action, "submitted" if ops else "done", "; ".join(details) or "recorded", ops
        )

    def _schedule(self, volume: Volume, wanted: dict[str, int] | None) -> list[str]:
        """Make the volume's backup schedule the declared one (None: no schedule)."""
        from backups import services as backup_services
        from backups.models import BackupSchedule

        schedule = BackupSchedule.objects.filter(volume=volume).first()
        if wanted is None:
            if schedule is None:
                return []
            if not schedule.enabled:
                return []
            backup_services.delete_schedule(actor=self.actor, schedule=schedule)
            return ["backup schedule removed"]
        every, keep = int(wanted["every_hours"]), int(wanted["keep_last"])
        if schedule is not None and (schedule.every_hours, schedule.keep_last, schedule.enabled) == (
            every,
            keep,
            True,
        ):
            return []
        backup_services.set_schedule(actor=self.actor, volume=volume, every_hours=every, keep_last=keep)
        return [f"backups every {every} h, keeping {keep}"]

    def _keep_volume(self, step: PlanStep) -> StepOutcome:
        """A volume the document dropped without allowing its deletion: kept, no longer managed."""
        Volume.objects.filter(tenant=self.tenant, name=self._name(step)).update(
            managed_revision=None, managed_spec_hash=""
        )
        return StepOutcome(step.key, step.action, "done", step.reason)

    # Networks (compartments, through compute.network_services: its quota and subnet checks).
    def _teardown_network(self, step: PlanStep) -> StepOutcome:
        name = self._name(step)
        compartment = Compartment.objects.filter(tenant=self.tenant, name=name).first()
        if compartment is None:
            return StepOutcome(step.key, step.action, "done", "already gone")
        if not self._wait_for_members(compartment):
            return StepOutcome(
                step.key, step.action, "waiting", "waiting for its workloads' deletion to finish"
            )
        network_services.delete_compartment(actor=self.actor, compartment=compartment)
        return StepOutcome(step.key, step.action, "done", "deleted")

    def _wait_for_members(self, compartment: Compartment) -> bool:
        """Wait while only workloads being deleted still hold addresses in ``compartment``.

        False when they are still there at the deadline (or at once without ``wait``); True when none are
        left, or when a member is not being deleted (delete_compartment then says which one uses it).
        """
        deadline = time.monotonic() + apply_wait_seconds()
        while True:
            states = set(
                IPAllocation.objects.filter(compartment=compartment).values_list("workload__state", flat=True)
            )
            if not states or states != {WorkloadState.DELETING}:
                return True
            if not self.wait or time.monotonic() > deadline:
                return False
            self._pause()

    def _build_network(self, step: PlanStep) -> StepOutcome:
        # The service runs in its own transaction (a refusal keeps its audit entry); the stamp follows.
        # Interrupted in between, the compartment exists unmanaged and the resumed apply adopts it.
        assert step.spec is not None
        name = self._name(step)
        compartment = Compartment.objects.filter(tenant=self.tenant, name=name).first()
        if compartment is not None and step.action == "replace":
            return StepOutcome(step.key, step.action, "waiting", "the old network is not deleted yet")
        detail = "recorded"
        if compartment is None:
            compartment = network_services.create_compartment(
                actor=self.actor,
                tenant=self.tenant,
                name=name,
                subnet=step.spec.get("subnet"),
                nat=bool(step.spec["nat"]),
            )
            detail = f"created ({compartment.subnet})"
        Compartment.objects.filter(pk=compartment.pk).update(
            managed_revision=self.revision, managed_spec_hash=step.spec_hash
        )
        return StepOutcome(step.key, step.action, "done", detail)

    # Published ports (through compute.network_services: quota, the operator's range, host uniqueness).
    def _port_rows(self, key: str) -> list[PublishedPort]:
        _, workload, port, protocol = key.split("/", 3)
        return list(
            PublishedPort.objects.filter(
                tenant=self.tenant, workload__name=workload, workload_port=int(port), protocol=protocol
            )
            .exclude(workload__state=WorkloadState.DELETING)
            .order_by("host_port", "id")
        )

    def _teardown_port(self, step: PlanStep) -> StepOutcome:
        ops = [
            str(network_services.unpublish_port(actor=self.actor, port=row).pk)
            for row in self._port_rows(step.key)
        ]
        if not ops:
            return StepOutcome(step.key, step.action, "done", "already gone")
        return StepOutcome(step.key, step.action, "submitted", "unpublished", ops)

    def _build_port(self, step: PlanStep) -> StepOutcome:
        assert step.spec is not None
        spec = step.spec
        workload = Workload.objects.filter(tenant=self.tenant, name=spec["workload"]).first()
        if workload is None or workload.state == WorkloadState.DELETING:
            return StepOutcome(
                step.key, step.action, "waiting", f"workload {spec['workload']!r} is not there yet"
            )
        rows = self._port_rows(step.key)
        if rows and step.action == "replace":
            return StepOutcome(step.key, step.action, "waiting", "the old port is not unpublished yet")
        ops: list[str] = []
        if rows:
            row = observe.managed_row(rows)
            detail = "recorded"
        else:
            # Its own transaction, as for networks; interrupted before the stamp, it is adopted later.
            row, op = network_services.publish_port(
                actor=self.actor,
                workload=workload,
                workload_port=int(spec["port"]),
                protocol=spec["protocol"],
                host_port=spec.get("host_port"),
            )
            ops.append(str(op.pk))
            detail = f"published on host port {row.host_port}"
        PublishedPort.objects.filter(pk=row.pk).update(
            managed_revision=self.revision, managed_spec_hash=step.spec_hash
        )
        return StepOutcome(step.key, step.action, "submitted" if ops else "done", detail, ops)


# --------------------------------------------------------------------------------------------------------
# Apply (the task's body)


def _plan_rows_result(outcomes: Iterable[StepOutcome]) -> dict[str, Any]:
    items = [outcome.to_dict() for outcome in outcomes]
    return {
        "steps": items,
        "failed": [item["key"] for item in items if item["outcome"] == "failed"],
        "waiting": [item["key"] for item in items if item["outcome"] == "waiting"],
    }


def execute_plan(
    plan_id: Any, *, actor_user: Any = None, progress: Callable[..., None] | None = None
) -> dict[str, Any]:
    """Run a stored plan under the tenant's claim (waiting for a running apply or reconciler run).

    A plan still ``planned`` runs exactly as stored, after a last staleness check. One found ``applying``
    is a resumption after its worker was lost (sent again by ``resume_interrupted_applies`` or redelivered
    by the broker): its steps are re-planned from what exists now against the same revision, so the apply
    resumes instead of repeating or refusing itself. The claim is renewed between and during steps.
    """
    plan_row = DesiredPlan.objects.select_related("tenant", "revision").get(pk=plan_id)
    tenant = plan_row.tenant
    revision = plan_row.revision
    if revision is None:
        raise Conflict("A preview plan cannot be applied.")
    owner = new_owner(f"apply:{plan_row.pk}")
    claim_waiting(tenant.pk, owner, apply_lease_seconds(), timeout=CLAIM_WAIT_SECONDS)
    try:
        # Read again under the claim: another delivery may have finished it while this one waited.
        plan_row = DesiredPlan.objects.select_related("created_by").get(pk=plan_id)
        actor = Actor(user=actor_user or plan_row.created_by)
        if plan_row.state == PlanState.PLANNED:
            plan = Plan.from_dict(plan_row.plan)
            if _observed_fingerprint(tenant) != plan.observed_fingerprint:
                DesiredPlan.objects.filter(pk=plan_row.pk).update(
                    state=PlanState.STALE, error="the resources changed before the apply started"
                )
                raise StalePlanError("the tenant's resources changed since this plan was made; plan again")
            DesiredPlan.objects.filter(pk=plan_row.pk, state=PlanState.PLANNED).update(
                state=PlanState.APPLYING
            )
            resumed = False
        elif plan_row.state == PlanState.APPLYING:
            plan = plan_for(tenant, parse_for_tenant(tenant, revision.text))
            resumed = True
        else:
            return {"skipped": f"plan is {plan_row.state}"}
        try:
            result = _execute(plan, plan_row, actor, revision.number, Lease(tenant.pk, owner), progress)
        except LeaseLost:
            raise  # the run that took over finishes the plan
        except Exception as error:
            # Not resumable by sending it again: say so on the plan, or the sweep would retry forever.
            _finish_plan(plan_row, actor, f"{type(error).__name__}: {error}", {"revision": revision.number})
            raise
        result["resumed"] = resumed
        problems = "; ".join(
            f"{o['key']}: {o['detail']}" for o in result["steps"] if o["outcome"] in ("failed", "waiting")
        )
        _finish_plan(plan_row, actor, problems, result)
        if problems:
            raise ApplyIncomplete(f"some steps did not complete: {problems}")
        return result
    finally:
        release(tenant.pk, owner)


def _execute(
    plan: Plan,
    plan_row: DesiredPlan,
    actor: Actor,
    revision: int,
    lease: Lease,
    progress: Callable[..., None] | None,
) -> dict[str, Any]:
    _check_volume_quota(plan, plan_row.tenant)
    DesiredState.objects.filter(tenant_id=plan_row.tenant_id).update(target_revision=revision)
    executor = Executor(
        actor=actor,
        tenant=plan_row.tenant,
        revision=revision,
        wait=True,
        progress=progress,
        keepalive=lease,
    )
    result = _plan_rows_result(executor.run(plan))
    result.update({"revision": revision, "summary": plan.summary()})
    return result


def _check_volume_quota(plan: Plan, tenant: Tenant) -> None:
    """Refuse the whole apply before its first step when its volumes no longer fit the quota (it may
    have changed since the plan): nothing is applied half-way for want of volume bytes."""
    needed = volume_bytes_needed(plan, tenant)
    if not needed:
        return
    quota = Quota.objects.get(tenant=tenant)
    if quota.used_volume_bytes + needed > quota.volume_bytes:
        free = max(quota.volume_bytes - quota.used_volume_bytes, 0)
        raise Conflict(
            f"Over the tenant's volume quota: this plan's new and grown volumes need {needed // GIB} GiB, "
            f"{free // GIB} GiB of {quota.volume_bytes // GIB} GiB are free; nothing was applied.",
            audit_action="quota.exceeded",
        )


def _finish_plan(plan_row: DesiredPlan, actor: Actor, problems: str, result: dict[str, Any]) -> None:
    """Mark the plan applied (or failed, with why) and audit the outcome."""
    DesiredPlan.objects.filter(pk=plan_row.pk).update(
        state=PlanState.FAILED if problems else PlanState.APPLIED,
        applied_at=timezone.now(),
        error=problems[:4000],
    )
    audit.record(
        actor,
        "desired.apply.failed" if problems else "desired.applied",
        plan_row,
        tenant=plan_row.tenant,
        details={
            "revision": result.get("revision"),
            "resumed": bool(result.get("resumed")),
            "summary": result.get("summary", {}),
            **({"problems": problems[:1000]} if problems else {}),
        },
    )


def resume_interrupted_applies(now: Any = None) -> list[str]:
    """Send again each apply whose worker was lost mid-way (found ``applying`` with no live claim).

    Called on every beat tick. An apply renews its claim while it works, so a plan still ``applying``
    whose tenant nobody holds has lost its worker. It is sent again (the same operation, which a
    redelivery would also run), at most once per lease; ``execute_plan`` resumes it from what exists.
    """
    from compute.desired import tasks

    now = now or timezone.now()
    lease = timedelta(seconds=apply_lease_seconds())
    resumed: list[str] = []
    stuck = DesiredPlan.objects.filter(state=PlanState.APPLYING, operation__isnull=False).select_related(
        "operation", "tenant"
    )
    for plan in stuck:
        held = DesiredState.objects.filter(tenant_id=plan.tenant_id, claimed_until__gte=now).exists()
        if held or (plan.resume_requested_at is not None and plan.resume_requested_at > now - lease):
            continue
        op = plan.operation
        assert op is not None
        if op.state not in (OperationState.QUEUED, OperationState.RUNNING):
            # Its operation ended without finishing the plan: nothing would ever resume it.
            DesiredPlan.objects.filter(pk=plan.pk, state=PlanState.APPLYING).update(
                state=PlanState.FAILED, error=f"its operation {op.state}: {op.error}"[:4000]
            )
            continue
        if not DesiredPlan.objects.filter(
            pk=plan.pk, state=PlanState.APPLYING, resume_requested_at=plan.resume_requested_at
        ).update(resume_requested_at=now):
            continue  # another tick got there first
        audit.record(
            Actor.system("reconciler"),
            "desired.apply.resumed",
            plan,
            tenant=plan.tenant,
            details={"operation": str(op.pk)},
        )
        tasks.apply_plan.apply_async(args=(str(op.pk),), queue=op.queue, retry=False)
        resumed.append(str(plan.pk))
    return resumed


def new_owner(prefix: str) -> str:
    """A claim owner id for one run."""
    return f"{prefix}:{uuid.uuid4().hex[:16]}"
