"""The tenant's secrets page: names and "set" for every role; admins add, replace and delete values,
which no page ever shows again (the value field is a password input that is never filled back)."""

from __future__ import annotations

import uuid

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET, require_POST

from frontend import forms as f
from frontend.views import (
    REFUSALS,
    current_tenant,
    done,
    get_current_tenant_for_user,
    may,
    page_or_partial,
)
from tenants import services
from tenants.actors import Actor
from tenants.models import Secret


class SecretForm(forms.Form):
    name = forms.CharField(max_length=63, help_text="Lowercase letters, digits and hyphens: db-password.")
    value = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        strip=False,
        help_text="Write-only: nobody, you included, can read it back here or through the API.",
    )


class SecretValueForm(forms.Form):
    value = forms.CharField(widget=forms.PasswordInput(render_value=False), strip=False)


def get_secret_for_user(request: HttpRequest, pk: uuid.UUID) -> Secret:
    tenant = get_current_tenant_for_user(request, "manage")
    return get_object_or_404(Secret.objects.for_user(request.user, "manage"), pk=pk, tenant=tenant)


def render_secrets(request: HttpRequest, form: SecretForm | None = None, status: int = 200) -> HttpResponse:
    tenant = current_tenant(request)
    visible = (
        Secret.objects.for_user(request.user, "view").filter(tenant=tenant)
        if tenant
        else Secret.objects.none()
    )
    rows = [(secret, services.workloads_using(secret)) for secret in visible]
    context = {
        "tenant": tenant,
        "rows": rows,
        "can_manage": may(request, "manage"),
        "form": form or SecretForm(),
    }
    page, partial = "frontend/secrets.html", "frontend/partials/secrets.html"
    return page_or_partial(request, page, partial, context, status)


@login_required
@require_GET
def secrets(request: HttpRequest) -> HttpResponse:
    return render_secrets(request)


@login_required
@require_POST
def secret_create(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "manage")
    form = SecretForm(request.POST)
    if form.is_valid():
        try:
            secret = services.create_secret(
                actor=Actor.from_request(request),
                tenant=tenant,
                name=form.cleaned_data["name"],
                value=form.cleaned_data["value"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            messages.success(request, f"Secret “{secret.name}” saved.")
            return done(request, "secrets", render_secrets)
    return render_secrets(request, form, status=422)


@login_required
@require_POST
def secret_set_value(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    secret = get_secret_for_user(request, pk)
    form = SecretValueForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give the new value.")
        return done(request, "secrets", render_secrets)
    try:
        value = form.cleaned_data["value"]
        services.set_secret_value(actor=Actor.from_request(request), secret=secret, value=value)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        messages.success(request, f"Secret “{secret.name}” changed; its workloads get it when they restart.")
    return done(request, "secrets", render_secrets)


@login_required
@require_POST
def secret_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    secret = get_secret_for_user(request, pk)
    try:
        services.delete_secret(actor=Actor.from_request(request), secret=secret)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        messages.success(request, f"Secret “{secret.name}” deleted.")
    return done(request, "secrets", render_secrets)
