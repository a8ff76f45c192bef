"""The UI of images, workloads and hosts. Same rules as frontend.views: objects through `for_user` and the
current tenant (a foreign or missing object is a 404), changes through one service, htmx gets partials.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q, QuerySet, Sum
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from compute import host_rpc, hosts
from compute import services as compute_services
from compute.choices import HostState, WorkloadState
from compute.compartments import Compartment
from compute.consumers import mint_console_token
from compute.models import Host, Workload
from frontend import forms as f
from frontend import plots
from frontend.views import (
    REFUSALS,
    current_tenant,
    get_current_tenant_for_user,
    may,
    op_card,
    operator_required,
    wants_partial,
)
from frontend.views_desired import mark_managed, workload_resource_key
from imaging import services as imaging_services
from imaging.api.views import PayloadTooLarge, StoredUpload, StoreUploadHandler, shared_layer_ids
from imaging.models import Image, ImageLayer, pull_reference
from imaging.repositories import tenant_repositories
from portal.errors import Invalid, ServiceError
from portal.models import Operation
from portal.permissions import Action
from tenants.actors import Actor
from tenants.models import Tenant

# Workload states -> the badge colours the stylesheet has.
STATE_BADGES: dict[str, str] = {
    WorkloadState.PENDING: "state-queued",
    WorkloadState.CREATING: "state-running",
    WorkloadState.RUNNING: "state-succeeded",
    WorkloadState.STOPPING: "state-running",
    WorkloadState.STOPPED: "state-cancelled",
    WorkloadState.FAILED: "state-failed",
    WorkloadState.UNKNOWN: "state-failed",
    WorkloadState.DELETING: "state-cancelled",
}
HOST_BADGES = {
    "ready": "state-succeeded",
    "draining": "state-running",
    "maintenance": "state-cancelled",
    "removed": "state-cancelled",
}


def htmx_target(request: HttpRequest) -> str:
    """The id of the element an htmx request swaps (one page, several refreshable parts)."""
    return (request.htmx.target or "") if wants_partial(request) else ""  # type: ignore[attr-defined]


# --- objects for the current user, in the current tenant ------------------------------------------


def images_for(request: HttpRequest, action: Action = "view") -> QuerySet[Image]:
    """The current tenant's images, and (to look at) the public ones."""
    tenant = current_tenant(request)
    rows = Image.objects.for_user(request.user, action)
    if action == "view":
        return (
            rows.filter(Q(tenant=tenant) | Q(tenant__isnull=True))
            if tenant
            else rows.filter(tenant__isnull=True)
        )
    return rows.filter(tenant=tenant) if tenant else rows.none()


def get_image_for_user(request: HttpRequest, pk: uuid.UUID, action: Action = "view") -> Image:
    return get_object_or_404(images_for(request, action).select_related("tenant"), pk=pk)


def get_workload_for_user(request: HttpRequest, pk: uuid.UUID, action: Action = "view") -> Workload:
    tenant = current_tenant(request)
    if tenant is None:
        raise Http404("No tenant selected.")
    workloads = Workload.objects.for_user(request.user, action).select_related("host", "image", "tenant")
    return get_object_or_404(workloads, pk=pk, tenant=tenant)


def get_host_for_user(request: HttpRequest, pk: uuid.UUID) -> Host:
    return get_object_or_404(Host.objects.for_user(request.user, "view"), pk=pk)


# --- images ---------------------------------------------------------------------------------------


def render_images(
    request: HttpRequest,
    *,
    import_form: f.ImageImportForm | None = None,
    pull_form: f.ImagePullForm | None = None,
    op: Operation | None = None,
    status: int = 200,
) -> HttpResponse:
    user = request.user
    rows = list(
        images_for(request).select_related("tenant", "operation").annotate(layer_count=Count("image_layers"))
    )
    registry_host = request.get_host()
    for image in rows:
        image.pull = pull_reference(image, registry_host)  # type: ignore[attr-defined]
    context: dict[str, Any] = {
        "tenant": current_tenant(request),
        "images": rows,
        "unpacking": any(not image.ready and not image.unpack_failed for image in rows),
        "registry_host": registry_host,
        "can_operate": may(request, "operate"),
        "import_form": import_form or f.ImageImportForm(),
        "pull_form": pull_form or f.ImagePullForm(),
        "op": op,
    }
    if htmx_target(request) == "image-table":
        return render(request, "frontend/partials/image_table.html", context)
    if user.is_staff:  # walks the store's directories: not on every table refresh
        context["usage"] = imaging_services.store_usage(user)
    template = "frontend/partials/images.html" if wants_partial(request) else "frontend/images.html"
    return render(request, template, context, status=status)


@login_required
@require_GET
def images(request: HttpRequest) -> HttpResponse:
    return render_images(request)


@csrf_exempt  # checked by the inner view, once the upload handler is in place (Django's documented way)
@login_required
@require_POST
def image_import(request: HttpRequest) -> HttpResponse:
    """Stream the archive into the store's ingest area (imaging's handler), then start the import."""
    tenant = get_current_tenant_for_user(request, "operate")  # refused before a byte is read
    limit = int(getattr(settings, "BULKHEAD_MAX_UPLOAD_BYTES", 8 * 1024**3))
    handler = StoreUploadHandler(request, limit)
    request.upload_handlers = [handler]
    request.upload_accepted = False  # type: ignore[attr-defined]
    try:
        return _image_import(request, tenant)
    except PayloadTooLarge as error:
        form = f.ImageImportForm()  # the body was not parsed: an empty form with the reason
        form.full_clean()
        form.cleaned_data = {}
        form.add_error("archive", str(error.detail))
        return render_images(request, import_form=form, status=422 if wants_partial(request) else 413)
    finally:
        if not request.upload_accepted:  # type: ignore[attr-defined]
            handler.discard()


@csrf_protect
def _image_import(request: HttpRequest, tenant: Tenant) -> HttpResponse:
    form = f.ImageImportForm(request.POST, request.FILES)
    if form.is_valid():
        upload = form.cleaned_data["archive"]
        try:
            op = imaging_services.start_import(
                actor=Actor.from_request(request),
                tenant=tenant,
                name=form.cleaned_data["name"],
                tag=form.cleaned_data["tag"],
                upload=upload.path if isinstance(upload, StoredUpload) else None,
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            request.upload_accepted = True  # type: ignore[attr-defined]
            if wants_partial(request):
                return render_images(request, op=op)
            messages.success(request, f"Import of {op.target_label} started: follow it under Operations.")
            return redirect("images")
    return render_images(request, import_form=form, status=422)


@login_required
@require_POST
def image_pull(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "operate")
    form = f.ImagePullForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            op = imaging_services.start_pull(
                actor=Actor.from_request(request),
                tenant=tenant,
                reference=data["reference"],
                name=data["name"],
                tag=data["tag"],
                username=data["username"],
                password=data["password"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            if wants_partial(request):
                return render_images(request, op=op)
            messages.success(request, f"Pull of {data['reference']} started: follow it under Operations.")
            return redirect("images")
    return render_images(request, pull_form=form, status=422)


def render_image_detail(
    request: HttpRequest, image: Image, tag_form: f.ImageTagForm | None = None, status: int = 200
) -> HttpResponse:
    layers = list(ImageLayer.objects.filter(image=image).select_related("layer").order_by("position"))
    shared = shared_layer_ids(request.user, [image])
    for il in layers:
        il.shared = il.layer_id in shared  # type: ignore[attr-defined]
    tenant = current_tenant(request)
    context = {
        "image": image,
        "layers": layers,
        "config_json": json.dumps(image.config or {}, indent=2, sort_keys=True),
        "in_use": imaging_services.image_in_use(image),
        "workloads": Workload.objects.for_user(request.user).filter(image=image, tenant=tenant)
        if tenant
        else [],
        "can_operate": image.tenant_id is not None and may(request, "operate"),
        "tag_form": tag_form or f.ImageTagForm(initial={"name": image.name}),
        "pull_reference": pull_reference(image, request.get_host()),
        "registry_host": request.get_host(),
    }
    return render(request, "frontend/image_detail.html", context, status=status)


@login_required
@require_GET
def image_detail(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return render_image_detail(request, get_image_for_user(request, pk))


@login_required
@require_GET
def repositories(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """A tenant's registry repositories: tags, sizes, layers shared between its repositories."""
    tenant = get_object_or_404(Tenant.objects.for_user(request.user, "view"), pk=pk)
    registry_host = request.get_host()
    context = {
        "repo_tenant": tenant,
        "repositories": tenant_repositories(tenant, registry_host),
        "registry_host": registry_host,
    }
    return render(request, "frontend/repositories.html", context)


@login_required
@require_POST
def image_tag(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    image = get_image_for_user(request, pk, "operate")
    form = f.ImageTagForm(request.POST)
    if form.is_valid():
        try:
            copy = imaging_services.tag_image(
                actor=Actor.from_request(request),
                image=image,
                name=form.cleaned_data["name"],
                tag=form.cleaned_data["tag"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            messages.success(request, f"Tagged as {copy}.")
            return redirect("image-detail", pk=copy.pk)
    return render_image_detail(request, image, form, status=422)


@login_required
@require_POST
def image_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    image = get_image_for_user(request, pk, "operate")
    try:
        imaging_services.delete_image(actor=Actor.from_request(request), image=image)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return render_image_detail(request, image, status=getattr(error, "status_code", 400))
    messages.success(request, f"Image {image} deleted.")
    return redirect("images")


@operator_required
@require_POST
def image_gc(request: HttpRequest) -> HttpResponse:
    try:
        op = imaging_services.start_gc(actor=Actor.from_request(request))
    except REFUSALS as error:
        if wants_partial(request):
            return op_card(request, error=f.refusal_message(error))
        messages.error(request, f.refusal_message(error))
        return redirect("images")
    if wants_partial(request):
        return op_card(request, op)
    messages.success(request, "Garbage collection started: follow it under Operations.")
    return redirect("images")


# --- workloads ------------------------------------------------------------------------------------


def badge(workload: Workload) -> Workload:
    workload.badge = STATE_BADGES.get(workload.state, "state-queued")  # type: ignore[attr-defined]
    return workload


def workload_form(request: HttpRequest, data: Any = None) -> f.WorkloadCreateForm:
    tenant = current_tenant(request)
    usable = compute_services.usable_images(tenant) if tenant else Image.objects.none()
    networks = (
        Compartment.objects.for_user(request.user, "view").filter(tenant=tenant).order_by("name")
        if tenant
        else Compartment.objects.none()
    )
    return f.WorkloadCreateForm(data, images=usable.order_by("name", "tag"), networks=networks)


def render_workloads(
    request: HttpRequest,
    form: f.WorkloadCreateForm | None = None,
    op: Operation | None = None,
    status: int = 200,
) -> HttpResponse:
    tenant = current_tenant(request)
    rows = Workload.objects.for_user(request.user).select_related("image", "host")
    rows = rows.filter(tenant=tenant) if tenant else rows.none()
    can_operate = may(request, "operate")
    workloads = [badge(w) for w in rows]
    mark_managed(request, (workloads, workload_resource_key))
    context = {
        "tenant": tenant,
        "workloads": workloads,
        "can_operate": can_operate,
        "form": form or (workload_form(request) if can_operate else None),
        "op": op,
    }
    target = htmx_target(request)
    if target == "workload-table":
        return render(request, "frontend/partials/workload_table.html", context)
    if target == "workload-create":
        response = render(request, "frontend/partials/workload_create.html", context, status=status)
        if op is not None:
            response["HX-Trigger"] = "bulkhead:event"  # the table shows the new row at once
        return response
    return render(request, "frontend/workloads.html", context, status=status)


@login_required
@require_GET
def workloads(request: HttpRequest) -> HttpResponse:
    return render_workloads(request)


@login_required
@require_POST
def workload_create(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "operate")
    form = workload_form(request, request.POST)
    if form.is_valid():
        data = form.cleaned_data
        spec = compute_services.WorkloadSpec(
            name=data["name"],
            image=data["image"],
            isolation=data["isolation"],
            command=data["command"],
            args=data["args"],
            env=data["env"],
            secret_env=data["secret_env"],
            workdir=data["workdir"],
            user=data["user"],
            vcpus=Decimal(data["vcpus"]),
            memory_mib=data["memory_mib"],
            disk_gib=data["disk_gib"] or 1,
            restart_policy=data["restart_policy"],
            on_host_lost=data["on_host_lost"] or "wait",
        )
        try:
            op = create_with_network(request, tenant, spec, data)
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            if wants_partial(request):
                return render_workloads(request, op=op)
            messages.success(request, f"Workload {data['name']} is being created.")
            return redirect("workload-detail", pk=op.target_id)
    return render_workloads(request, form, status=422)


def create_with_network(
    request: HttpRequest, tenant: Any, spec: compute_services.WorkloadSpec, data: dict[str, Any]
) -> Operation:
    """Create the workload on its network and publish its ports, all or nothing (one transaction)."""
    from django.db import transaction

    from compute import network_services

    actor = Actor.from_request(request)
    if data["network"] == f.NETWORK_NONE:
        compartments: list[Compartment] | None = []
    elif data["network"]:
        compartment = (
            Compartment.objects.for_user(request.user, "view")
            .filter(tenant=tenant, pk=data["network"])
            .first()
        )
        if compartment is None:
            raise Invalid("Choose one of this tenant's networks.", field="network")
        compartments = [compartment]
    else:
        compartments = None
    from volumes.api.views import resolve_volume_mounts

    volumes = resolve_volume_mounts(request.user, tenant, data.get("volumes") or [])
    with transaction.atomic():
        op = compute_services.create_workload(
            actor=actor,
            tenant=tenant,
            spec=spec,
            start=data["start"],
            compartments=compartments,
            volumes=volumes,
        )
        workload = Workload.objects.get(pk=op.target_id)
        for port, protocol in data["ports"]:
            network_services.publish_port(
                actor=actor, workload=workload, workload_port=port, protocol=protocol
            )
    return op


def workload_stats(workload: Workload) -> dict[str, Any]:
    if workload.host_id is None or workload.state != WorkloadState.RUNNING:
        return {}
    try:
        stats = host_rpc.ask(workload, "stats", timeout=3)
    except Exception:  # the host does not answer or the container just ended: no figures, no error page
        return {"unavailable": True}
    if not stats:
        return {}
    return {
        "cpu_seconds": stats.get("cpu_usage_ns", 0) / 1e9,
        "memory_bytes": stats.get("memory_bytes", 0),
        "memory_limit_bytes": workload.memory_mib * 1024 * 1024,
        "memory_percent": min(
            100, round(100 * stats.get("memory_bytes", 0) / (workload.memory_mib * 1048576))
        ),
    }


def workload_logs(workload: Workload, tail_bytes: int = 16 * 1024) -> str | None:
    if workload.host_id is None or workload.state in (WorkloadState.PENDING,):
        return ""
    try:
        return str(host_rpc.ask(workload, "logs", timeout=3, tail_bytes=tail_bytes))
    except Exception:
        return None  # the host does not answer


def workload_changes(workload: Workload) -> tuple[list[dict[str, str]], str]:
    """The captured changes (A/C/D), as the API's `changes` action lists them."""
    if workload.host_id is None or workload.state in (WorkloadState.PENDING, WorkloadState.CREATING):
        return [], "The workload has no changes yet."
    try:
        changes: list[dict[str, str]] = host_rpc.ask(workload, "changes", timeout=5)
    except ServiceError as exc:
        return [], f"Changes cannot be listed now ({exc.message})."
    return changes[:1000], ""


def render_workload_detail(
    request: HttpRequest,
    workload: Workload,
    commit_form: f.WorkloadCommitForm | None = None,
    status: int = 200,
) -> HttpResponse:
    badge(workload)
    target = htmx_target(request)
    context: dict[str, Any] = {"workload": workload}
    if target == "workload-stats":
        context["stats"] = workload_stats(workload)
        return render(request, "frontend/partials/workload_stats.html", context)
    if target == "workload-logs":
        context["logs"] = workload_logs(workload)
        return render(request, "frontend/partials/workload_logs.html", context)
    if target == "workload-changes":
        context["changes"], context["changes_note"] = workload_changes(workload)
        return render(request, "frontend/partials/workload_changes.html", context)
    mark_managed(request, ([workload], workload_resource_key))
    if target == "workload-summary":
        return render(request, "frontend/partials/workload_summary.html", context)
    can_operate = Workload.objects.for_user(request.user, "operate").filter(pk=workload.pk).exists()
    context.update(
        {
            "can_operate": can_operate,
            "stats": workload_stats(workload),
            "logs": workload_logs(workload),
            "commit_form": commit_form or f.WorkloadCommitForm(initial={"name": f"{workload.name}-snapshot"}),
            "console_token": mint_console_token(request.user, workload) if can_operate else "",
            "history_url": reverse("api:workload-history", args=[workload.pk]),
            "plots": plots.WORKLOAD_PLOTS,
            "operations": Operation.objects.for_user(request.user)
            .filter(target_type="workload", target_id=str(workload.pk))
            .order_by("-created_at")[:5],
        }
    )
    response = render(request, "frontend/workload_detail.html", context, status=status)
    response["Cache-Control"] = "no-store"  # the page carries a console token
    return response


@login_required
@require_GET
def workload_detail(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return render_workload_detail(request, get_workload_for_user(request, pk))


def workload_action(request: HttpRequest, pk: uuid.UUID, start: Any) -> HttpResponse:
    workload = get_workload_for_user(request, pk, "operate")
    try:
        op = start(actor=Actor.from_request(request), workload=workload)
    except REFUSALS as error:
        if wants_partial(request):
            return op_card(request, error=f.refusal_message(error))
        messages.error(request, f.refusal_message(error))
        return redirect("workload-detail", pk=workload.pk)
    if wants_partial(request):
        return op_card(request, op)
    messages.success(request, f"{op.kind} of {workload} started.")
    return redirect("workload-detail", pk=workload.pk)


@login_required
@require_POST
def workload_start(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return workload_action(request, pk, compute_services.start_workload)


@login_required
@require_POST
def workload_stop(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return workload_action(request, pk, compute_services.stop_workload)


@login_required
@require_POST
def workload_restart(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return workload_action(request, pk, compute_services.restart_workload)


@login_required
@require_POST
def workload_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    workload = get_workload_for_user(request, pk, "operate")
    try:
        compute_services.delete_workload(actor=Actor.from_request(request), workload=workload)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return redirect("workload-detail", pk=workload.pk)
    messages.success(request, f"Workload {workload} is being deleted.")
    url = reverse("workloads")
    return HttpResponseClientRedirect(url) if wants_partial(request) else redirect(url)


@login_required
@require_POST
def workload_commit(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    workload = get_workload_for_user(request, pk, "operate")
    form = f.WorkloadCommitForm(request.POST)
    if form.is_valid():
        try:
            op = compute_services.commit_workload(
                actor=Actor.from_request(request),
                workload=workload,
                name=form.cleaned_data["name"],
                tag=form.cleaned_data["tag"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            if wants_partial(request):
                return op_card(request, op)
            messages.success(request, f"Commit of {workload} started.")
            return redirect("workload-detail", pk=workload.pk)
    if wants_partial(request):
        errors = "; ".join(str(e) for errs in form.errors.values() for e in errs)
        return op_card(request, error=errors or "Check the name and tag.")
    return render_workload_detail(request, workload, form, status=422)


@login_required
@require_POST
@never_cache
def workload_console_token(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """A fresh console token for (re)connecting: the one on the page is single-use and lives 60 s."""
    workload = get_workload_for_user(request, pk, "operate")
    return JsonResponse({"token": mint_console_token(request.user, workload)})


# --- hosts (operators) ----------------------------------------------------------------------------


def host_rows() -> list[Host]:
    usage = {
        row["host"]: row
        for row in Workload.objects.values("host").annotate(
            vcpus=Sum("vcpus"), memory=Sum("memory_mib"), n=Count("id")
        )
    }
    rows = []
    # Removed hosts last: kept for the record, nothing to act on.
    for host in sorted(Host.objects.order_by("name"), key=lambda host: host.state == HostState.REMOVED):
        used = usage.get(host.pk, {})
        vcpu_cap, mem_cap = host.vcpu_capacity, host.memory_capacity_mib
        host.badge = HOST_BADGES.get(host.state, "state-failed")  # type: ignore[attr-defined]
        host.usage = {  # type: ignore[attr-defined]
            "vcpus": used.get("vcpus") or Decimal(0),
            "memory_mib": used.get("memory") or 0,
            "workloads": used.get("n", 0),
            "vcpu_percent": min(100, int(100 * (used.get("vcpus") or 0) / vcpu_cap)) if vcpu_cap else 0,
            "memory_percent": min(100, int(100 * (used.get("memory") or 0) / mem_cap)) if mem_cap else 0,
        }
        rows.append(host)
    return rows


def render_hosts(
    request: HttpRequest,
    form: f.JoinTokenForm | None = None,
    *,
    command: str = "",
    joining: str = "",
    credential: str = "",
    credential_host: str = "",
    op: Operation | None = None,
    status: int = 200,
) -> HttpResponse:
    context = {
        "credential": credential,
        "credential_host": credential_host,
        "op": op,
        "hosts": host_rows(),
        "host_plots": plots.HOST_PLOTS,
        "form": form or f.JoinTokenForm(),
        "command": command,
        "joining": joining,
        "states": f.HostStateForm.base_fields["state"].choices,  # type: ignore[attr-defined]
    }
    template = "frontend/partials/hosts.html" if wants_partial(request) else "frontend/hosts.html"
    response = render(request, template, context, status=status)
    response["Cache-Control"] = "no-store"
    return response


@operator_required
@require_GET
def hosts_list(request: HttpRequest) -> HttpResponse:
    return render_hosts(request)


@operator_required
@require_POST
def host_state(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    host = get_host_for_user(request, pk)
    form = f.HostStateForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose ready, draining or maintenance.")
        return render_hosts(request, status=422)
    try:
        host = hosts.set_host_state(
            actor=Actor.from_request(request), host=host, state=form.cleaned_data["state"]
        )
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        messages.success(request, f"Host {host} is now {host.get_state_display().lower()}.")
    return render_hosts(request) if wants_partial(request) else redirect("hosts")


@operator_required
@require_POST
def host_evacuate(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """Drain the host and move its workloads elsewhere; the operation's progress is shown in place."""
    host = get_host_for_user(request, pk)
    try:
        op = compute_services.evacuate_host(actor=Actor.from_request(request), host=host)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return render_hosts(request, status=409) if wants_partial(request) else redirect("hosts")
    messages.success(request, f"Host {host} is draining; its workloads are being moved.")
    return render_hosts(request, op=op) if wants_partial(request) else redirect("hosts")


@operator_required
@require_POST
@never_cache
def host_credential(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """Rotate (a new secret, shown once: put it in the host's agent.env) or revoke the host's credential."""
    host = get_host_for_user(request, pk)
    actor = Actor.from_request(request)
    try:
        if request.POST.get("action") == "revoke":
            hosts.revoke_host_credentials(actor=actor, host=host)
        else:
            secret = hosts.rotate_host_credential(actor=actor, host=host)
            # Rendered, never redirected: the secret must not pass through the session or a URL.
            return render_hosts(request, credential=secret, credential_host=host.name)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return render_hosts(request, status=409) if wants_partial(request) else redirect("hosts")
    messages.success(request, f"The credential of {host} was revoked: its agent is refused from now on.")
    return render_hosts(request) if wants_partial(request) else redirect("hosts")


@operator_required
@require_POST
def host_remove(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    host = get_host_for_user(request, pk)
    try:
        hosts.remove_host(actor=Actor.from_request(request), host=host)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return render_hosts(request, status=409) if wants_partial(request) else redirect("hosts")
    messages.success(request, f"Host {host} was removed: its credential no longer works.")
    return render_hosts(request) if wants_partial(request) else redirect("hosts")


@operator_required
@require_POST
@never_cache
def host_join(request: HttpRequest) -> HttpResponse:
    form = f.JoinTokenForm(request.POST)
    if form.is_valid():
        try:
            token, secret = hosts.create_join_token(
                actor=Actor.from_request(request),
                host_name=form.cleaned_data["host_name"],
                profile=form.profile(),
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            portal_url = request.build_absolute_uri("/").rstrip("/")
            command = f"make agent PORTAL={portal_url} JOIN_TOKEN={secret}"
            # Rendered, never redirected: the secret must not pass through the session or a URL.
            return render_hosts(request, command=command, joining=token.host_name)
    return render_hosts(request, form, status=422)
