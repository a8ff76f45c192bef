"""The tenant's volumes page (issue 17): size, use bar, host, attachments and snapshots; members create,
attach, snapshot, restore, clone and delete. Objects only through the permission layer, in the current
tenant: anything else is a 404."""

from __future__ import annotations

import uuid

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET, require_POST

from compute.models import Workload
from frontend import forms as f
from frontend.views import REFUSALS, current_tenant, done, get_current_tenant_for_user, may, page_or_partial
from tenants.actors import Actor
from volumes import services
from volumes.models import Snapshot, Volume, VolumeAttachment


class VolumeForm(forms.Form):
    name = forms.CharField(max_length=63, help_text="Lowercase letters, digits and hyphens: db-data.")
    size_gib = forms.IntegerField(min_value=1, initial=1, label="Size (GiB)")


class SnapshotForm(forms.Form):
    name = forms.CharField(max_length=63)


class CloneForm(forms.Form):
    name = forms.CharField(max_length=63)


class AttachForm(forms.Form):
    workload = forms.UUIDField()
    path = forms.CharField(max_length=255)
    read_only = forms.BooleanField(required=False)


def get_volume_for_user(request: HttpRequest, pk: uuid.UUID) -> Volume:
    tenant = get_current_tenant_for_user(request, "operate")
    return get_object_or_404(
        Volume.objects.for_user(request.user, "operate").select_related("host", "tenant"),
        pk=pk,
        tenant=tenant,
    )


def _snapshot(request: HttpRequest, pk: uuid.UUID) -> Snapshot:
    tenant = get_current_tenant_for_user(request, "operate")
    return get_object_or_404(
        Snapshot.objects.for_user(request.user, "operate").select_related("volume__host"),
        pk=pk,
        volume__tenant=tenant,
    )


def backup_rows(request: HttpRequest, tenant: object) -> list[dict[str, object]]:
    from frontend.views_backups import backup_rows as rows

    return rows(request, tenant)


def schedule_rows(request: HttpRequest, tenant: object) -> dict[str, object]:
    from frontend.views_backups import schedule_rows as rows

    return rows(request, tenant)


def render_volumes(request: HttpRequest, form: VolumeForm | None = None, status: int = 200) -> HttpResponse:
    tenant = current_tenant(request)
    volumes = (
        Volume.objects.for_user(request.user, "view")
        .filter(tenant=tenant)
        .select_related("host")
        .prefetch_related("attachments__workload", "snapshots")
        if tenant
        else Volume.objects.none()
    )
    rows = []
    for volume in volumes:
        percent = min(100, int(volume.used_bytes * 100 / volume.size_bytes)) if volume.size_bytes else 0
        level = "high" if percent >= 90 else "mid" if percent >= 70 else "low"
        rows.append({"volume": volume, "percent": percent, "level": level})
    workloads = (
        Workload.objects.for_user(request.user, "operate").filter(tenant=tenant).order_by("name")
        if tenant
        else []
    )
    context = {
        "tenant": tenant,
        "rows": rows,
        "workloads": workloads,
        "can_operate": may(request, "operate"),
        "form": form or VolumeForm(),
        "backups": backup_rows(request, tenant),
        **schedule_rows(request, tenant),
    }
    return page_or_partial(
        request, "frontend/volumes.html", "frontend/partials/volumes.html", context, status
    )


def show_queued(request: HttpRequest, what: str) -> HttpResponse:
    messages.success(request, what)
    return done(request, "volumes", render_volumes)


def show_refused(request: HttpRequest, error: Exception) -> HttpResponse:
    messages.error(request, f.refusal_message(error))  # type: ignore[arg-type]
    return done(request, "volumes", render_volumes)


@login_required
@require_GET
def volumes(request: HttpRequest) -> HttpResponse:
    return render_volumes(request)


@login_required
@require_POST
def volume_create(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "operate")
    form = VolumeForm(request.POST)
    if form.is_valid():
        try:
            services.create_volume(
                actor=Actor.from_request(request),
                tenant=tenant,
                name=form.cleaned_data["name"],
                size_gib=form.cleaned_data["size_gib"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            return show_queued(request, f"Volume “{form.cleaned_data['name']}” is being created.")
    return render_volumes(request, form, status=422)


@login_required
@require_POST
def volume_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    volume = get_volume_for_user(request, pk)
    try:
        services.delete_volume(actor=Actor.from_request(request), volume=volume)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"Volume “{volume.name}” is being deleted.")


@login_required
@require_POST
def volume_snapshot(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    volume = get_volume_for_user(request, pk)
    form = SnapshotForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give the snapshot a name.")
        return done(request, "volumes", render_volumes)
    try:
        services.snapshot_volume(
            actor=Actor.from_request(request), volume=volume, name=form.cleaned_data["name"]
        )
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"Snapshot “{form.cleaned_data['name']}” of {volume.name} is being taken.")


@login_required
@require_POST
def volume_attach(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    volume = get_volume_for_user(request, pk)
    form = AttachForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose a workload and an absolute path.")
        return done(request, "volumes", render_volumes)
    workload = (
        Workload.objects.for_user(request.user, "operate")
        .filter(pk=form.cleaned_data["workload"], tenant=volume.tenant)
        .first()
    )
    if workload is None:
        messages.error(request, "No such workload.")
        return done(request, "volumes", render_volumes)
    try:
        services.attach_volume(
            actor=Actor.from_request(request),
            volume=volume,
            workload=workload,
            path=form.cleaned_data["path"],
            read_only=form.cleaned_data["read_only"],
        )
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"{volume.name} attached to {workload.name}; mounted at its next start.")


@login_required
@require_POST
def volume_detach(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "operate")
    attachment = get_object_or_404(
        VolumeAttachment.objects.for_user(request.user, "operate").select_related("volume", "workload"),
        pk=pk,
        volume__tenant=tenant,
    )
    try:
        services.detach_volume(actor=Actor.from_request(request), attachment=attachment)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"{attachment.volume.name} detached from {attachment.workload.name}.")


@login_required
@require_POST
def snapshot_restore(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    snapshot = _snapshot(request, pk)
    try:
        services.restore_snapshot(actor=Actor.from_request(request), snapshot=snapshot)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"{snapshot.volume.name} is being restored to “{snapshot.name}”.")


@login_required
@require_POST
def snapshot_clone(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    snapshot = _snapshot(request, pk)
    form = CloneForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give the new volume a name.")
        return done(request, "volumes", render_volumes)
    try:
        services.clone_snapshot(
            actor=Actor.from_request(request), snapshot=snapshot, name=form.cleaned_data["name"]
        )
    except REFUSALS as error:
        return show_refused(request, error)
    name = form.cleaned_data["name"]
    return show_queued(request, f"Volume “{name}” is being cloned from “{snapshot.name}”.")


@login_required
@require_POST
def snapshot_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    snapshot = _snapshot(request, pk)
    try:
        services.delete_snapshot(actor=Actor.from_request(request), snapshot=snapshot)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"Snapshot “{snapshot.name}” is being deleted.")
