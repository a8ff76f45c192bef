"""The UI of network compartments and published ports (issue 7). Same rules as frontend.views_compute:
objects through `for_user` and the current tenant (a foreign or missing object, or one the role may not
change, is a 404), changes through compute.network_services (which audits), htmx gets partials.

Who may do what mirrors compute.api.network_views: compartments are managed by owners and admins,
published ports are operated by members and up, everyone in the tenant may look.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from compute import network_services
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.models import Host, Workload
from frontend import forms as f
from frontend import forms_network as nf
from frontend.views import REFUSALS, current_tenant, get_current_tenant_for_user, may, wants_partial
from frontend.views_compute import HOST_BADGES, badge, htmx_target
from frontend.views_desired import (
    mark_managed,
    network_resource_key,
    port_resource_key,
    workload_resource_key,
)
from portal.models import Operation
from portal.permissions import Action
from tenants.actors import Actor

# --- objects for the current user, in the current tenant ------------------------------------------


def compartments_for(request: HttpRequest, action: Action = "view") -> QuerySet[Compartment]:
    tenant = current_tenant(request)
    rows = Compartment.objects.for_user(request.user, action)
    return rows.filter(tenant=tenant) if tenant else rows.none()


def get_compartment_for_user(request: HttpRequest, pk: uuid.UUID, action: Action = "view") -> Compartment:
    if current_tenant(request) is None:
        raise Http404("No tenant selected.")
    return get_object_or_404(compartments_for(request, action).select_related("tenant"), pk=pk)


def get_port_for_user(request: HttpRequest, pk: uuid.UUID, action: Action = "view") -> PublishedPort:
    tenant = current_tenant(request)
    if tenant is None:
        raise Http404("No tenant selected.")
    ports = PublishedPort.objects.for_user(request.user, action).select_related("workload", "host")
    return get_object_or_404(ports, pk=pk, tenant=tenant)


def member_workloads(request: HttpRequest, compartment: Compartment, action: Action) -> QuerySet[Workload]:
    """The tenant's workloads with an address in `compartment` (the ones a port can be published to)."""
    return (
        Workload.objects.for_user(request.user, action)
        .filter(tenant=compartment.tenant, ip_allocations__compartment=compartment)
        .distinct()
        .order_by("name")
    )


def publish_form(request: HttpRequest, compartment: Compartment, data: Any = None) -> nf.PortPublishForm:
    form = nf.PortPublishForm(data, workloads=member_workloads(request, compartment, "operate"))
    ports = network_services.published_port_range()
    form.fields[
        "host_port"
    ].help_text = f"{ports.start}-{ports.stop - 1}. Empty: the lowest free port of that range."
    return form


def host_badge(host: Host) -> Host:
    host.badge = HOST_BADGES.get(host.state, "state-failed")  # type: ignore[attr-defined]
    host.realises = network_services.network_enabled(host)  # type: ignore[attr-defined]
    return host


# --- the list -------------------------------------------------------------------------------------


def compartment_rows(request: HttpRequest) -> list[Compartment]:
    rows: list[Compartment] = list(
        compartments_for(request).annotate(
            member_count=Count("allocations", distinct=True),
            port_count=Count("allocations__workload__published_ports", distinct=True),
        )
    )
    # The hosts its members are on (one query for the page): where the compartment is realised.
    hosts: dict[Any, dict[Any, Host]] = defaultdict(dict)
    allocations = IPAllocation.objects.filter(
        compartment__in=rows, workload__host__isnull=False
    ).select_related("workload__host")
    for allocation in allocations:
        host = allocation.workload.host
        assert host is not None
        hosts[allocation.compartment_id].setdefault(host.pk, host)
    for row in rows:
        row.hosts = [  # type: ignore[attr-defined]
            host_badge(h) for h in sorted(hosts[row.pk].values(), key=lambda h: h.name)
        ]
    mark_managed(request, (rows, network_resource_key))
    return rows


def render_compartments(
    request: HttpRequest, form: nf.CompartmentCreateForm | None = None, status: int = 200
) -> HttpResponse:
    tenant = current_tenant(request)
    can_manage = may(request, "manage")
    context = {
        "tenant": tenant,
        "compartments": compartment_rows(request),
        "can_manage": can_manage,
        "form": form or (nf.CompartmentCreateForm() if can_manage else None),
    }
    target = htmx_target(request)
    if target == "compartment-table":
        return render(request, "frontend/partials/compartment_table.html", context)
    if target == "compartment-create":
        return render(request, "frontend/partials/compartment_create.html", context, status=status)
    return render(request, "frontend/compartments.html", context, status=status)


@login_required
@require_GET
def compartments(request: HttpRequest) -> HttpResponse:
    return render_compartments(request)


@login_required
@require_POST
def compartment_create(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "manage")
    form = nf.CompartmentCreateForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            compartment = network_services.create_compartment(
                actor=Actor.from_request(request),
                tenant=tenant,
                name=data["name"],
                subnet=data["subnet"],
                nat=data["nat"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error, {"prefix_length": "subnet"})
        else:
            messages.success(request, f"Network {compartment.name} ({compartment.subnet}) created.")
            url = reverse("compartment-detail", args=[compartment.pk])
            return HttpResponseClientRedirect(url) if wants_partial(request) else redirect(url)
    return render_compartments(request, form, status=422)


# --- one compartment ------------------------------------------------------------------------------


def render_compartment_detail(
    request: HttpRequest,
    compartment: Compartment,
    form: nf.PortPublishForm | None = None,
    op: Operation | None = None,
    status: int = 200,
) -> HttpResponse:
    allocations = list(
        IPAllocation.objects.for_user(request.user)
        .filter(compartment=compartment)
        .select_related("workload", "workload__host")
    )
    for allocation in allocations:
        badge(allocation.workload)
    members = [a.workload_id for a in allocations]
    ports = list(
        PublishedPort.objects.for_user(request.user)
        .filter(tenant=compartment.tenant, workload_id__in=members)
        .select_related("workload", "host")
    )
    mark_managed(
        request,
        ([compartment], network_resource_key),
        ([a.workload for a in allocations], workload_resource_key),
        (ports, port_resource_key),
    )
    can_operate = may(request, "operate")
    context: dict[str, Any] = {
        "compartment": compartment,
        "allocations": allocations,
        "ports": ports,
        "hosts": [host_badge(h) for h in Host.objects.filter(workloads__pk__in=members).distinct()],
        "can_manage": may(request, "manage"),
        "can_operate": can_operate,
        "form": form or (publish_form(request, compartment) if can_operate else None),
        "op": op,
    }
    target = htmx_target(request)
    if target == "compartment-ports":
        return render(request, "frontend/partials/compartment_ports.html", context, status=status)
    return render(request, "frontend/compartment_detail.html", context, status=status)


@login_required
@require_GET
def compartment_detail(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    return render_compartment_detail(request, get_compartment_for_user(request, pk))


@login_required
@require_POST
def compartment_delete(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    compartment = get_compartment_for_user(request, pk, "manage")
    try:
        network_services.delete_compartment(actor=Actor.from_request(request), compartment=compartment)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        if wants_partial(request):  # htmx swaps no 409: reload the page, which shows the message
            return HttpResponseClientRedirect(reverse("compartment-detail", args=[compartment.pk]))
        return render_compartment_detail(request, compartment, status=getattr(error, "status_code", 400))
    messages.success(request, f"Network {compartment.name} deleted.")
    url = reverse("compartments")
    return HttpResponseClientRedirect(url) if wants_partial(request) else redirect(url)


@login_required
@require_POST
def compartment_publish(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    compartment = get_compartment_for_user(request, pk, "operate")
    form = publish_form(request, compartment, request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            port, op = network_services.publish_port(
                actor=Actor.from_request(request),
                workload=data["workload"],
                workload_port=data["workload_port"],
                protocol=data["protocol"],
                host_port=data["host_port"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            if wants_partial(request):
                return render_compartment_detail(request, compartment, op=op)
            messages.success(
                request,
                f"Published {port.protocol}/{port.host_port} on {port.host} to "
                f"{port.workload}:{port.workload_port}.",
            )
            return redirect("compartment-detail", pk=compartment.pk)
    return render_compartment_detail(request, compartment, form, status=422)


@login_required
@require_POST
def port_unpublish(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    port = get_port_for_user(request, pk, "operate")
    allocation = network_services.primary_allocation(port.workload)
    try:
        op = network_services.unpublish_port(actor=Actor.from_request(request), port=port)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        op = None
    else:
        messages.success(request, f"Unpublished {port.protocol}/{port.host_port} on {port.host}.")
    if allocation is None:  # the workload left its compartment: back to the list
        url = reverse("compartments")
        return HttpResponseClientRedirect(url) if wants_partial(request) else redirect(url)
    if wants_partial(request):
        return render_compartment_detail(request, allocation.compartment, op=op)
    return redirect("compartment-detail", pk=allocation.compartment_id)
