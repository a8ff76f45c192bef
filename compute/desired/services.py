"""Desired-state services: revisions, rollback, plans, apply, export and the reconciler's mode.

Apply and the reconciler change resources only through compute.services (create/start/stop/restart/
delete_workload) and stamp ``managed_revision`` and ``managed_spec_hash`` on the rows they touch, so
that drift is a comparison. Both hold the tenant's claim (``DesiredState.claimed_by``) while they work:
one of them at a time per tenant.
"""

from __future__ import annotations

import hashlib
import logging
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

from compute import services as compute_services
from compute.choices import WorkloadState
from compute.desired import observe
from compute.desired.document import (
    DesiredResource,
    DocumentError,
    TenantConfig,
    ValidationIssue,
    diff_documents,
    export_document,
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
from portal.errors import Conflict, Invalid
from portal.models import Operation, OperationState
from tenants import audit, quota
from tenants.actors import Actor
from tenants.models import Tenant

log = logging.getLogger(__name__)

APPLY_LEASE_SECONDS = 900
_DIGEST = re.compile(r"^(?P<name>.+)@(?P<digest>sha256:[a-f0-9]{64})$")
_PROCESS_FIELDS = ("command", "args", "env", "workdir", "user", "vcpus", "memory_mib")


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
    ensure_state(tenant_id)
    return bool(
        DesiredState.objects.filter(tenant_id=tenant_id)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now) | Q(claimed_by=owner))
        .update(claimed_by=owner, claimed_until=now + timedelta(seconds=lease_seconds))
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


def resolve_image(tenant: Tenant | Any, reference: str) -> Image | None:
    """The image a tenant can see under ``reference`` (name:tag, name, name@sha256:...), its own first."""
    tenant_id = getattr(tenant, "pk", tenant)
    visible = Image.objects.filter(Q(tenant_id=tenant_id) | Q(tenant__isnull=True))
    match = _DIGEST.match(reference)
    if match:
        candidates = visible.filter(name=match["name"], manifest_digest=match["digest"])
    else:
        name, _, tag = reference.rpartition(":")
        if not name or "/" in tag:  # "host:5000/name" has a port, not a tag
            name, tag = reference, "latest"
        candidates = visible.filter(name=name, tag=tag)
    # Own images before public ones of the same name.
    return candidates.order_by(F("tenant_id").asc(nulls_last=True)).first()


def _unsupported(config: TenantConfig) -> list[ValidationIssue]:
    message = "network compartments and published ports are not yet supported in documents"
    issues = [
        ValidationIssue(f"spec.networks[{i}]", config.lines.get(f"network/{n.name}"), message)
        for i, n in enumerate(config.networks)
    ]
    issues += [
        ValidationIssue(f"spec.workloads[{i}].networks", config.lines.get(f"workload/{w.name}"), message)
        for i, w in enumerate(config.workloads)
        if w.networks
    ]
    issues += [
        ValidationIssue(
            f"spec.ports[{i}]", config.lines.get(f"port/{p.workload}/{p.port}/{p.protocol}"), message
        )
        for i, p in enumerate(config.ports)
    ]
    return issues


def parse_for_tenant(tenant: Tenant | Any, text: str, *, check_images: bool = True) -> TenantConfig:
    """Parse and validate ``text`` for ``tenant`` (its images); raise InvalidDocument with every issue."""
    cache: dict[str, str | None] = {}

    def resolver(reference: str) -> str | None:
        if reference not in cache:
            image = resolve_image(tenant, reference)
            cache[reference] = str(image.pk) if image is not None else None
        return cache[reference]

    try:
        config = parse_document(text, resolver if check_images else None)
        unsupported = _unsupported(config)
        if unsupported:
            raise DocumentError(unsupported)
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
    state = ensure_state(tenant)
    return export_document(observe.observed_resources(tenant, state.image_references), name=tenant.name)


# --------------------------------------------------------------------------------------------------------
# Plans


def plan_for(tenant: Tenant, config: TenantConfig, state: DesiredState | None = None) -> Plan:
    """The plan that makes the tenant's observed resources match ``config``."""
    state = state or ensure_state(tenant)
    observed = observe.observed_resources(tenant, state.image_references)
    try:
        return compute_plan(config.resources(), observed, prune=config.prune)
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
    return row


def _observed_fingerprint(tenant: Tenant) -> str:
    from compute.desired.planning import observed_fingerprint

    state = ensure_state(tenant)
    return observed_fingerprint(observe.observed_resources(tenant, state.image_references))


def apply_plan(*, actor: Actor, plan: DesiredPlan) -> Operation:
    """Queue the execution of exactly this stored plan; 409 when it is stale, a preview, or not new."""
    from compute.desired import tasks

    if plan.revision_id is None:
        raise Conflict("This plan is a preview of an unsaved document; save it as a revision and plan that.")
    if plan.state != PlanState.PLANNED:
        raise Conflict(f"This plan is {plan.state}; make a new plan.")
    if _observed_fingerprint(plan.tenant) != plan.observed_fingerprint:
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
        workdir=spec["workdir"] or "",
        user=spec["user"] or "",
        vcpus=Decimal(str(spec["vcpus"])),
        memory_mib=int(spec["memory_mib"]),
        restart_policy=spec["restart"],
    )


def _record_reference(tenant: Tenant, name: str, spec: dict[str, Any] | None) -> None:
    """Remember the image reference a workload was applied with (under the tenant's claim)."""
    state = DesiredState.objects.select_for_update().get(tenant=tenant)
    references = dict(state.image_references)
    if spec is None:
        references.pop(name, None)
    else:
        references[name] = {"image_id": spec.get("image_id"), "reference": spec["image"]}
    if references != state.image_references:
        DesiredState.objects.filter(pk=state.pk).update(image_references=references)


class Executor:
    """Runs plan steps on workloads through compute.services, idempotently.

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
    ) -> None:
        self.actor = actor
        self.tenant = tenant
        self.revision = revision
        self.wait = wait
        self.skip_in_flight = skip_in_flight
        self.progress = progress or (lambda *a, **k: None)
        self.outcomes: list[StepOutcome] = []

    def run(self, plan: Plan) -> list[StepOutcome]:
        """Teardown (ports, workloads, networks), then build (networks, workloads, ports)."""
        teardown, build = plan.teardown_steps(), plan.build_steps()
        total = max(1, len(teardown) + len(build))
        for done, step in enumerate(teardown):
            self.progress(100 * done / total, f"Removing {step.key}")
            self._guarded(step, self._teardown)
        for done, step in enumerate(build, start=len(teardown)):
            self.progress(100 * done / total, f"{step.action.capitalize()} {step.key}")
            self._guarded(step, self._build)
        return self.outcomes

    def _guarded(self, step: PlanStep, run: Callable[[PlanStep], StepOutcome]) -> None:
        if step.kind != "workload":
            self.outcomes.append(StepOutcome(step.key, step.action, "skipped", "kind not yet supported"))
            return
        try:
            outcome = run(step)
        except Exception as error:  # one failed step must not stop the others; the result says which
            log.warning("desired step %s %s failed: %s", step.action, step.key, error)
            message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            outcome = StepOutcome(step.key, step.action, "failed", str(message)[:500])
        self.outcomes.append(outcome)

    @staticmethod
    def _name(step: PlanStep) -> str:
        return step.key.split("/", 1)[1]

    def _workload(self, name: str) -> Workload | None:
        return Workload.objects.filter(tenant=self.tenant, name=name).select_related("host").first()

    # Teardown: deletes, and the removal half of replaces.
    def _teardown(self, step: PlanStep) -> StepOutcome:
        name = self._name(step)
        workload = self._workload(name)
        if workload is None:
            return StepOutcome(step.key, step.action, "done", "already gone")
        if workload.state == WorkloadState.DELETING:
            return StepOutcome(step.key, step.action, "submitted", "deletion in progress")
        op = compute_services.delete_workload(actor=self.actor, workload=workload)
        if step.action == "delete":
            with transaction.atomic():
                _record_reference(self.tenant, name, None)
        return StepOutcome(step.key, step.action, "submitted", "deleting", [str(op.pk)])

    def _wait_until_gone(self, name: str) -> bool:
        deadline = time.monotonic() + apply_wait_seconds()
        while Workload.objects.filter(tenant=self.tenant, name=name).exists():
            if not self.wait or time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    # Build: creates, the creation half of replaces, updates.
    def _build(self, step: PlanStep) -> StepOutcome:
        assert step.spec is not None and step.spec_hash is not None
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

    def _create(self, step: PlanStep, name: str) -> StepOutcome:
        assert step.spec is not None
        spec = _compute_spec(self.tenant, step.spec)
        with transaction.atomic():
            try:
                op = compute_services.create_workload(
                    actor=self.actor, tenant=self.tenant, spec=spec, start=step.spec["state"] == "running"
                )
            except IntegrityError:
                raise Conflict(f"A workload named {name!r} appeared meanwhile.") from None
            Workload.objects.filter(tenant=self.tenant, name=name).update(
                managed_revision=self.revision, managed_spec_hash=step.spec_hash
            )
            _record_reference(self.tenant, name, step.spec)
        return StepOutcome(step.key, step.action, "submitted", "creating", [str(op.pk)])

    def _update(self, step: PlanStep, workload: Workload) -> StepOutcome:
        assert step.spec is not None
        spec = step.spec
        wanted = _compute_spec(self.tenant, spec)
        ops: list[str] = []
        with transaction.atomic():
            locked = Workload.objects.select_for_update().get(pk=workload.pk)
            fields: dict[str, Any] = {
                "command": wanted.command,
                "args": wanted.args,
                "env": wanted.env,
                "workdir": wanted.workdir,
                "user": wanted.user,
                "vcpus": wanted.vcpus,
                "memory_mib": wanted.memory_mib,
            }
            changed = {name for name, value in fields.items() if getattr(locked, name) != value}
            delta_vcpus = wanted.vcpus - locked.vcpus
            delta_memory = wanted.memory_mib - locked.memory_mib
            if delta_vcpus > 0 or delta_memory > 0:
                quota.allocate(
                    self.tenant, vcpus=max(delta_vcpus, Decimal(0)), memory_mib=max(delta_memory, 0)
                )
            Workload.objects.filter(pk=locked.pk).update(
                **{name: fields[name] for name in changed},
                restart_policy=wanted.restart_policy,
                managed_revision=self.revision,
                managed_spec_hash=step.spec_hash,
            )
            if delta_vcpus < 0 or delta_memory < 0:
                quota.release(
                    self.tenant, vcpus=max(-delta_vcpus, Decimal(0)), memory_mib=max(-delta_memory, 0)
                )
            _record_reference(self.tenant, locked.name, spec)
            if changed:
                audit.record(self.actor, "workload.update", locked, details={"fields": sorted(changed)})
            current = observe.run_state(locked)
            if spec["state"] == "running":
                if current == "stopped" or locked.state == WorkloadState.UNKNOWN:
                    ops.append(str(compute_services.start_workload(actor=self.actor, workload=locked).pk))
                elif changed and locked.state == WorkloadState.RUNNING:
                    ops.append(str(compute_services.restart_workload(actor=self.actor, workload=locked).pk))
            elif current == "running":
                ops.append(str(compute_services.stop_workload(actor=self.actor, workload=locked).pk))
        detail = ", ".join(sorted(changed)) or "recorded"
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
    is a redelivery after a worker was lost: its steps are re-planned from what exists now against the
    same revision, so the apply resumes instead of repeating or refusing itself.
    """
    plan_row = DesiredPlan.objects.select_related("tenant", "revision", "created_by").get(pk=plan_id)
    tenant = plan_row.tenant
    revision = plan_row.revision
    if revision is None:
        raise Conflict("A preview plan cannot be applied.")
    owner = f"apply:{plan_row.pk}"
    claim_waiting(tenant.pk, owner, APPLY_LEASE_SECONDS, timeout=APPLY_LEASE_SECONDS)
    actor = Actor(user=actor_user or plan_row.created_by)
    try:
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
        DesiredState.objects.filter(tenant=tenant).update(target_revision=revision.number)
        executor = Executor(
            actor=actor, tenant=tenant, revision=revision.number, wait=True, progress=progress
        )
        result = _plan_rows_result(executor.run(plan))
        result.update({"revision": revision.number, "resumed": resumed, "summary": plan.summary()})
        problems = "; ".join(
            f"{o['key']}: {o['detail']}" for o in result["steps"] if o["outcome"] in ("failed", "waiting")
        )
        DesiredPlan.objects.filter(pk=plan_row.pk).update(
            state=PlanState.FAILED if problems else PlanState.APPLIED,
            applied_at=timezone.now(),
            error=problems,
        )
        if problems:
            raise RuntimeError(f"some steps did not complete: {problems}")
        return result
    finally:
        release(tenant.pk, owner)


def new_owner(prefix: str) -> str:
    """A claim owner id for one run."""
    return f"{prefix}:{uuid.uuid4().hex[:16]}"
