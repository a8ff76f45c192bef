"""Backups on the volumes page (issue 17): the tenant's backups with sizes and dedup ratio; members back
a volume up, restore a backup into a new volume, verify it, export it for download, delete it, and set,
change or remove a volume's backup schedule. Objects only through the permission layer, in the current
tenant: anything else is a 404."""

from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_POST

from backups import services
from backups.models import Backup, BackupSchedule
from frontend.views import REFUSALS, done, get_current_tenant_for_user
from frontend.views_volumes import (
    get_volume_for_user,
    render_volumes,
    show_queued,
    show_refused,
)
from portal.models import Operation, OperationState
from tenants.actors import Actor
from volumes.models import Volume


class RestoreForm(forms.Form):
    name = forms.CharField(max_length=63)


# What the schedule form offers (hours between backups); the API takes any whole number from 1 to 720.
FREQUENCIES: tuple[tuple[int, str], ...] = (
    (1, "hourly"),
    (6, "every 6 hours"),
    (12, "every 12 hours"),
    (24, "daily"),
    (168, "weekly"),
)


class ScheduleForm(forms.Form):
    every_hours = forms.IntegerField(min_value=1, max_value=720, initial=24)
    keep_last = forms.IntegerField(min_value=1, max_value=services.MAX_KEEP, initial=7)
    enabled = forms.BooleanField(required=False, initial=True)


def schedule_rows(request: HttpRequest, tenant: Any) -> dict[str, Any]:
    """The tenant's schedules (each with its frequency choices) and the volumes that have none yet."""
    if tenant is None:
        return {"schedules": [], "unscheduled": [], "frequencies": FREQUENCIES}
    schedules = list(
        BackupSchedule.objects.for_user(request.user, "view").filter(tenant=tenant).select_related("volume")
    )
    rows = []
    for schedule in schedules:
        choices = list(FREQUENCIES)
        if schedule.every_hours not in dict(FREQUENCIES):  # set through the API to another period
            choices.append((schedule.every_hours, f"every {schedule.every_hours} hours"))
        rows.append({"schedule": schedule, "choices": sorted(choices)})
    scheduled = {schedule.volume_id for schedule in schedules}
    unscheduled = [
        volume
        for volume in Volume.objects.for_user(request.user, "view").filter(tenant=tenant).order_by("name")
        if volume.pk not in scheduled
    ]
    return {"schedules": rows, "unscheduled": unscheduled, "frequencies": FREQUENCIES}


def backup_rows(request: HttpRequest, tenant: Any) -> list[dict[str, Any]]:
    """The tenant's backups, newest first, each with the download URL of its latest finished export."""
    if tenant is None:
        return []
    backups = list(Backup.objects.for_user(request.user, "view").filter(tenant=tenant)[:200])
    exports = {
        op.target_id: op
        for op in Operation.objects.filter(
            kind="backup.export",
            target_id__in=[str(b.pk) for b in backups],
            state=OperationState.SUCCEEDED,
        ).order_by("finished_at")
    }
    rows = []
    for backup in backups:
        export = exports.get(str(backup.pk))
        download = (
            f"/api/v1/backups/{backup.pk}/download/?operation={export.pk}"
            if export is not None and services.export_path(export.pk).is_file()
            else None
        )
        rows.append({"backup": backup, "download": download})
    return rows


def _backup(request: HttpRequest, pk: uuid.UUID) -> Backup:
    tenant = get_current_tenant_for_user(request, "operate")
    return get_object_or_404(Backup.objects.for_user(request.user, "operate"), pk=pk, tenant=tenant)


@login_required
@require_POST
def volume_backup(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    volume = get_volume_for_user(request, pk)
    try:
        services.create_backup(actor=Actor.from_request(request), volume=volume)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"{volume.name} is being backed up.")


@login_required
@require_POST
def backup_restore(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    backup = _backup(request, pk)
    form = RestoreForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give the new volume a name.")
        return done(request, "volumes", render_volumes)
    try:
        services.restore_backup(
            actor=Actor.from_request(request), backup=backup, name=form.cleaned_data["name"]
        )
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"Volume “{form.cleaned_data['name']}” is being restored from the backup.")


@login_required
@require_POST
def backup_verify(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    backup = _backup(request, pk)
    try:
        services.verify_backup(actor=Actor.from_request(request), backup=backup)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, "Every chunk of the backup is being re-hashed.")


@login_required
@require_POST
def backup_export(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    backup = _backup(request, pk)
    try:
        services.export_backup(actor=Actor.from_request(request), backup=backup)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, "The backup is being written as a tar.zst; Download appears when ready.")


@login_required
@require_POST
def backup_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    backup = _backup(request, pk)
    try:
        services.delete_backup(actor=Actor.from_request(request), backup=backup)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, "The backup was deleted.")


@login_required
@require_POST
def volume_schedule(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """Set the volume's schedule: a new one, or a change of the one it has (one per volume)."""
    volume = get_volume_for_user(request, pk)
    form = ScheduleForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Backups of {volume.name}: " + _form_problems(form))
        return done(request, "volumes", render_volumes)
    every, keep = form.cleaned_data["every_hours"], form.cleaned_data["keep_last"]
    try:
        services.set_schedule(
            actor=Actor.from_request(request),
            volume=volume,
            every_hours=every,
            keep_last=keep,
            enabled=form.cleaned_data["enabled"],
        )
    except REFUSALS as error:
        return show_refused(request, error)
    period = dict(FREQUENCIES).get(every, f"every {every} hours")
    paused = "" if form.cleaned_data["enabled"] else " (paused)"
    return show_queued(request, f"{volume.name} is backed up {period}, keeping the last {keep}{paused}.")


@login_required
@require_POST
def schedule_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "operate")
    schedule = get_object_or_404(
        BackupSchedule.objects.for_user(request.user, "operate").select_related("volume"),
        pk=pk,
        tenant=tenant,
    )
    try:
        services.delete_schedule(actor=Actor.from_request(request), schedule=schedule)
    except REFUSALS as error:
        return show_refused(request, error)
    return show_queued(request, f"{schedule.volume.name} is no longer backed up on a schedule.")


def _form_problems(form: forms.Form) -> str:
    labels = {"every_hours": "every", "keep_last": "keep the last", "enabled": "enabled"}
    return "; ".join(
        f"{labels.get(field, field)}: {' '.join(str(e) for e in errors)}"
        for field, errors in form.errors.items()
    )
