"""The UI of a tenant's desired state: mode, conditions and drift, the document editor, plans, apply and
history. Same rules as frontend.views_compute: objects through `for_user` and the current tenant (a
foreign or missing one is a 404), changes through compute.desired.services, htmx gets partials.
Members (any role) read; owners and admins ("manage") write. The workload and network pages show their
managed rows' badges through `mark_managed` / `drift_badges_for` (one DesiredState read a page).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from compute.desired import observe
from compute.desired import services as desired_services
from compute.desired.document import network_key, port_key, workload_key
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState, PlanState
from frontend import forms_desired as fd
from frontend.forms import add_service_error, refusal_message
from frontend.views import REFUSALS, current_tenant, get_current_tenant_for_user, may, op_card, wants_partial
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import Tenant

HISTORY_SIZE = 50

# Plan actions -> the badge colours the stylesheet has (green, blue, amber, red).
ACTION_BADGES: dict[str, str] = {
    "create": "state-succeeded",
    "update": "state-running",
    "replace": "state-cancelled",
    "delete": "state-failed",
    "keep": "state-cancelled",
    "noop": "state-queued",
}
DRIFT_BADGES: dict[str, str] = {
    "missing": "state-failed",
    "changed": "state-cancelled",
    "stopped": "state-cancelled",
    "started": "state-cancelled",
    "orphaned": "state-running",
    "repaired": "state-cancelled",
}


# Per-resource conditions that are wrong when "True", the worst first: (condition, badge colour).
RESOURCE_PROBLEMS: tuple[tuple[str, str], ...] = (
    ("Flapping", "state-failed"),
    ("Degraded", "state-failed"),
    ("Drifted", "state-cancelled"),
)


# --- objects for the current user, in the current tenant ------------------------------------------


def get_revision_for_user(request: HttpRequest, pk: uuid.UUID, action: Any = "view") -> DesiredRevision:
    tenant = current_tenant(request)
    if tenant is None:
        raise Http404("No tenant selected.")
    revisions = DesiredRevision.objects.for_user(request.user, action).select_related("tenant")
    return get_object_or_404(revisions, pk=pk, tenant=tenant)


def get_plan_for_user(request: HttpRequest, pk: uuid.UUID, action: Any = "manage") -> DesiredPlan:
    tenant = current_tenant(request)
    if tenant is None:
        raise Http404("No tenant selected.")
    plans = DesiredPlan.objects.for_user(request.user, action).select_related("tenant", "revision")
    return get_object_or_404(plans, pk=pk, tenant=tenant)


# --- managed and drift badges on the resources' own pages -----------------------------------------


def resource_badge(entry: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The badge of one resource's conditions (resource_conditions[key]): the worst of Flapping, Degraded
    and Drifted that is "True", with its reason as the title; None when nothing is wrong or unknown."""
    if not entry:
        return None
    for condition, css in RESOURCE_PROBLEMS:
        if entry.get(condition) != "True":
            continue
        reason = str(entry.get("reason") or condition)
        label = condition.lower()
        if condition == "Drifted" and reason.startswith("Drift") and reason[5:].lower() in DRIFT_BADGES:
            label = reason[5:].lower()  # DriftMissing -> "missing", coloured as on the desired page
            css = DRIFT_BADGES[label]
        return {"condition": condition, "label": label, "badge": css, "title": problem_of(entry) or reason}
    return None


def drift_badges_for(request: HttpRequest, keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Drift badges of the current tenant's resources `keys` (only those with a problem), from the
    tenant's DesiredState read through the permission layer: one query, none without a key."""
    wanted = set(keys)
    tenant = current_tenant(request)
    if not wanted or tenant is None:
        return {}
    conditions = (
        DesiredState.objects.for_user(request.user, "view")
        .filter(tenant=tenant)
        .values_list("resource_conditions", flat=True)
        .first()
    ) or {}
    badges = {key: resource_badge(conditions.get(key)) for key in wanted}
    return {key: badge for key, badge in badges.items() if badge is not None}


def workload_resource_key(workload: Any) -> str:
    return workload_key(workload.name)


def network_resource_key(compartment: Any) -> str:
    return network_key(compartment.name)


def port_resource_key(port: Any) -> str:
    return port_key(port.workload.name, port.workload_port, port.protocol)


RowGroup = tuple[Sequence[Any], Callable[[Any], str]]


def mark_managed(request: HttpRequest, *groups: RowGroup) -> None:
    """Give each row of `groups` ((rows, key of a row), ...) a `desired` attribute for
    partials/managed_badge.html: {"revision", "key", "drift"} when a document manages the row, None
    otherwise. One DesiredState query for all the groups, none when no row is managed."""
    managed = [(row, key(row)) for rows, key in groups for row in rows if row.managed_revision is not None]
    badges = drift_badges_for(request, [key for _, key in managed])
    for rows, _ in groups:
        for row in rows:
            row.desired = None
    for row, key in managed:
        row.desired = {"revision": row.managed_revision, "key": key, "drift": badges.get(key)}


# --- presentation helpers -------------------------------------------------------------------------


def condition_rows(state: DesiredState) -> list[dict[str, Any]]:
    """The four conditions in a fixed order, with a badge: green when healthy, red/amber when not."""
    rows = []
    for kind in ("Ready", "Drifted", "Degraded", "Flapping"):
        c = state.condition(kind) or {}
        status = c.get("status", "Unknown")
        healthy = status == ("True" if kind == "Ready" else "False")
        if status == "Unknown":
            badge = "state-queued"
        elif healthy:
            badge = "state-succeeded"
        else:
            badge = "state-cancelled" if kind == "Drifted" else "state-failed"
        rows.append(
            {
                "type": kind,
                "status": status,
                "reason": c.get("reason", ""),
                "message": c.get("message", ""),
                "since": c.get("lastTransitionTime", ""),
                "badge": badge,
            }
        )
    return rows


def problem_of(entry: Mapping[str, Any] | None) -> str:
    """The reason (and message) of a resource's conditions: "Unhealthy: is failed", "DriftChanged"."""
    entry = entry or {}
    reason, message = str(entry.get("reason") or ""), str(entry.get("message") or "")
    return f"{reason}: {message}" if reason and message else reason or message


def resource_condition_cells(entry: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Ready, Degraded and Flapping of one resource (resource_conditions[key]) as badges, the reason as
    the title of the ones that are not healthy. Unknown (grey) before the reconciler saw the resource."""
    problem = problem_of(entry)
    entry = entry or {}
    cells = []
    for condition in ("Ready", "Degraded", "Flapping"):
        status = str(entry.get(condition, "Unknown"))
        if status not in ("True", "False"):
            badge, status = "state-queued", "Unknown"
        elif status == ("True" if condition == "Ready" else "False"):
            badge = "state-succeeded"
        else:
            badge = "state-failed"
        title = problem if badge == "state-failed" else ""
        cells.append({"type": condition, "status": status, "badge": badge, "title": title})
    return cells


def resource_rows(tenant: Tenant, state: DesiredState) -> list[dict[str, Any]]:
    """Every resource (existing, or missing by the drift), with its drift badge and its conditions."""
    drift = {item.get("key"): item for item in state.drift or []}
    per_resource: dict[str, Any] = state.resource_conditions or {}
    try:
        observed = observe.observed_resources(tenant)
    except Exception:  # a runtime not reachable from here: the drift alone
        observed = []
    found: list[tuple[str, str, bool]] = [(r.key, r.kind, r.managed) for r in observed]
    seen = {key for key, _, _ in found}
    found += [(key, item.get("resource_kind") or "", True) for key, item in drift.items() if key not in seen]
    rows: list[dict[str, Any]] = []
    for key, kind, managed in found:
        item = drift.get(key)
        entry = per_resource.get(key)
        rows.append(
            {
                "key": key,
                "kind": kind,
                "managed": managed,
                "drift": item.get("kind") if item else "",
                "changes": item.get("changes", []) if item else [],
                "badge": DRIFT_BADGES.get(item.get("kind", ""), "state-failed") if item else "",
                "conditions": resource_condition_cells(entry) if managed or entry else [],
                "observed_revision": (entry or {}).get("observedRevision"),
                "problem": problem_of(entry),
            }
        )
    return rows


def plan_steps(plan: DesiredPlan) -> list[dict[str, Any]]:
    """The plan's steps that change something, each with its colour."""
    steps = []
    for step in plan.plan.get("steps", []):
        if step.get("action") == "noop":
            continue
        steps.append({**step, "badge": ACTION_BADGES.get(step.get("action", ""), "state-queued")})
    return steps


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """A unified diff as (css class, line) pairs."""
    lines = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            css = "diff-file"
        elif line.startswith("@@"):
            css = "diff-hunk"
        elif line.startswith("+"):
            css = "diff-add"
        elif line.startswith("-"):
            css = "diff-del"
        else:
            css = "diff-ctx"
        lines.append((css, line))
    return lines


def issues_of(error: desired_services.InvalidDocument) -> list[dict[str, Any]]:
    return [issue.to_dict() for issue in error.issues]


def plan_context(plan: DesiredPlan | None, error: str = "") -> dict[str, Any]:
    """What partials/desired_plan.html needs (only managers plan, so the Apply button is theirs)."""
    return {"plan": plan, "steps": plan_steps(plan) if plan else [], "plan_error": error, "can_manage": True}


# --- the page -------------------------------------------------------------------------------------


def render_desired(
    request: HttpRequest,
    *,
    form: fd.DocumentForm | None = None,
    issues: list[dict[str, Any]] | None = None,
    plan: DesiredPlan | None = None,
    plan_error: str = "",
    status: int = 200,
) -> HttpResponse:
    tenant = current_tenant(request)
    context: dict[str, Any] = {"tenant": tenant}
    if tenant is None or not may(request, "view"):
        context["tenant"] = None
        return render(request, "frontend/desired.html", context, status=status)
    desired_services.ensure_state(tenant)  # made (mode off) on first use; read like any tenant row:
    state = get_object_or_404(DesiredState.objects.for_user(request.user), tenant=tenant)
    revisions = list(
        DesiredRevision.objects.for_user(request.user)
        .filter(tenant=tenant)
        .select_related("author")
        .order_by("-number")[:HISTORY_SIZE]
    )
    latest = revisions[0] if revisions else None
    if form is None:
        source = request.GET.get("source", "")
        if latest is not None and source != "export":
            text = latest.text
        else:
            try:
                text = desired_services.export_for(tenant)
            except Exception:  # resources not readable now: start from an empty document
                text = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {}\n"
        form = fd.DocumentForm(initial={"text": text})
    if plan is None and not plan_error:
        plan = (
            DesiredPlan.objects.for_user(request.user)
            .filter(tenant=tenant, state=PlanState.PLANNED, revision__isnull=False)
            .select_related("revision")
            .order_by("-created_at")
            .first()
        )
    context.update(
        {
            "state": state,
            "conditions": condition_rows(state),
            "resources": resource_rows(tenant, state),
            "revisions": revisions,
            "latest": latest,
            "form": form,
            "issues": issues,
            "mode_form": fd.ModeForm(initial={"mode": state.mode}),
            **plan_context(plan, plan_error),
            "can_manage": may(request, "manage"),
        }
    )
    return render(request, "frontend/desired.html", context, status=status)


@login_required
@require_GET
def desired(request: HttpRequest) -> HttpResponse:
    return render_desired(request)


@login_required
@require_POST
def desired_mode(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "manage")
    form = fd.ModeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose off, monitor or autocorrect.")
        return render_desired(request, status=422)
    try:
        state = desired_services.set_mode(
            actor=Actor.from_request(request), tenant=tenant, mode=form.cleaned_data["mode"]
        )
    except REFUSALS as error:
        messages.error(request, refusal_message(error))
        return render_desired(request, status=getattr(error, "status_code", 400))
    messages.success(request, f"The reconciler is now {state.get_mode_display().lower()}.")
    return redirect("desired")


@login_required
@require_POST
def desired_validate(request: HttpRequest) -> HttpResponse:
    """Validate the editor's text as the tenant would save it; stores nothing."""
    tenant = get_current_tenant_for_user(request, "manage")
    form = fd.DocumentForm(request.POST)
    issues: list[dict[str, Any]] = []
    error = ""
    if not form.is_valid():
        error = "; ".join(str(e) for e in form.errors.get("text", [])) or "Write a document."
    else:
        try:
            desired_services.parse_for_tenant(tenant, form.cleaned_data["text"])
        except desired_services.InvalidDocument as invalid:
            issues = issues_of(invalid)
            error = invalid.message
    context = {"issues": issues, "validation_error": error, "validated": True}
    return render(request, "frontend/partials/desired_issues.html", context)


@login_required
@require_POST
def desired_save(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "manage")
    form = fd.DocumentForm(request.POST)
    issues = None
    if form.is_valid():
        try:
            revision, created = desired_services.save_revision(
                actor=Actor.from_request(request),
                tenant=tenant,
                text=form.cleaned_data["text"],
                message=form.cleaned_data["message"],
            )
        except desired_services.InvalidDocument as error:
            issues = issues_of(error)
            add_service_error(form, error, {"document": "text"})
        except REFUSALS as error:
            add_service_error(form, error, {"document": "text"})
        else:
            if created:
                messages.success(request, f"Saved revision {revision.number}.")
            else:
                messages.info(request, f"No change: the document is revision {revision.number}.")
            return redirect("desired")
    return render_desired(request, form=form, issues=issues, status=422)


@login_required
@require_POST
def desired_plan(request: HttpRequest) -> HttpResponse:
    """Plan a revision (the latest unless a number is given) and show what applying it would change."""
    tenant = get_current_tenant_for_user(request, "manage")
    form = fd.PlanForm(request.POST)
    revisions = DesiredRevision.objects.for_user(request.user, "manage").filter(tenant=tenant)
    number = form.cleaned_data.get("number") if form.is_valid() else None
    revision = revisions.filter(number=number).first() if number else revisions.order_by("-number").first()
    if revision is None:
        error, status = "Save a revision first, then plan it.", 422
    else:
        try:
            plan = desired_services.create_plan(
                actor=Actor.from_request(request), tenant=tenant, revision=revision
            )
        except REFUSALS as refusal:
            error, status = refusal_message(refusal), getattr(refusal, "status_code", 400)
        else:
            if wants_partial(request):
                return render(request, "frontend/partials/desired_plan.html", plan_context(plan))
            return render_desired(request, plan=plan)
    if wants_partial(request):  # swapped in (htmx swaps 2xx and 422 only): the reason, where the plan goes
        return render(request, "frontend/partials/desired_plan.html", plan_context(None, error))
    return render_desired(request, plan_error=error, status=status)


@login_required
@require_POST
def desired_apply(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    plan = get_plan_for_user(request, pk, "manage")
    try:
        op: Operation = desired_services.apply_plan(actor=Actor.from_request(request), plan=plan)
    except REFUSALS as error:
        if wants_partial(request):
            return op_card(request, error=refusal_message(error))
        messages.error(request, refusal_message(error))
        return render_desired(
            request, plan_error=refusal_message(error), status=getattr(error, "status_code", 400)
        )
    if wants_partial(request):
        return op_card(request, op)
    revision = plan.revision.number if plan.revision else "?"
    messages.success(request, f"Applying revision {revision}: follow it under Operations.")
    return redirect("desired")


# --- history --------------------------------------------------------------------------------------


def diff_context(base: DesiredRevision | None, revision: DesiredRevision) -> dict[str, Any]:
    """What partials/desired_diff.html shows of the way from `base` to `revision` (None: the first)."""
    context: dict[str, Any] = {"base": base, "lines": [], "changes": [], "diff_error": ""}
    if base is None:
        return context
    try:
        diff = desired_services.diff_revisions(base, revision)
    except desired_services.InvalidDocument as error:
        context["diff_error"] = error.message
    else:
        context["lines"] = diff_lines(diff["diff"])
        context["changes"] = [
            {**c, "badge": ACTION_BADGES.get(c.get("action", ""), "state-queued")}
            for c in diff["changes"]
            if c.get("action") != "noop"
        ]
    return context


@login_required
@require_GET
def desired_revision(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """One revision: its text, and what changed since the previous one or since the revision the user
    picked (?against=<number>; htmx gets the diff alone). Both revisions through the permission layer:
    a number the user cannot see, or that does not exist, is a 404."""
    revision = get_revision_for_user(request, pk)
    siblings = DesiredRevision.objects.for_user(request.user, "view").filter(tenant=revision.tenant)
    form = fd.CompareForm(request.GET)
    if not form.is_valid():
        raise Http404("No such revision.")
    against = form.cleaned_data["against"]
    previous = siblings.filter(number__lt=revision.number).order_by("-number").first()
    base = get_object_or_404(siblings, number=against) if against is not None else previous
    numbers = list(
        siblings.exclude(number=revision.number)
        .order_by("-number")
        .values_list("number", flat=True)[:HISTORY_SIZE]
    )
    if base is not None and base.number not in numbers:
        numbers.append(base.number)
    context: dict[str, Any] = {
        "revision": revision,
        "previous": previous,
        "picked": against is not None,
        "compare_numbers": numbers,
        **diff_context(base, revision),
    }
    if wants_partial(request):
        return render(request, "frontend/partials/desired_diff.html", context)
    context.update({"can_manage": may(request, "manage"), "rollback_form": fd.RollbackForm()})
    return render(request, "frontend/desired_revision.html", context)


@login_required
@require_POST
def desired_rollback(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    revision = get_revision_for_user(request, pk, "manage")
    form = fd.RollbackForm(request.POST)
    message = form.cleaned_data["message"] if form.is_valid() else ""
    try:
        new = desired_services.rollback(actor=Actor.from_request(request), revision=revision, message=message)
    except REFUSALS as error:
        messages.error(request, refusal_message(error))
        return redirect("desired-revision", pk=revision.pk)
    messages.success(
        request,
        f"Saved revision {new.number} with the text of revision {revision.number}: plan and apply it.",
    )
    return redirect("desired")
