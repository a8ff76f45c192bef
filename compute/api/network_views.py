"""REST API for compartments (admins manage) and published ports (members operate): issue 7."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from compute import network_services
from compute.api import serializers as s
from compute.compartments import Compartment, EgressAllowance, PublishedPort
from compute.models import Workload
from portal.api.viewsets import ReadOnlyPermissionLayerViewSet
from portal.errors import Invalid
from portal.permissions import Action
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP
from tenants.models import Tenant


def tenant_for(user: Any, tenant_id: Any, action: Action, what: str, view: Any = None) -> Tenant:
    """The tenant a new object goes into: the one named, the token's, or the user's only one.

    `view`: its `tenant_concerned` is set on a refusal, so that the tenant's admins see it audited."""
    token = getattr(user, "active_token", None)
    if tenant_id is None and token is not None and token.tenant_id:
        tenant_id = token.tenant_id
    if tenant_id is None:
        mine = list(Tenant.objects.for_user(user, action)[:2])
        if len(mine) != 1:
            raise Invalid(f"Say which tenant the {what} belongs to.", field="tenant")
        return mine[0]
    tenant = Tenant.objects.for_user(user, action).filter(pk=tenant_id).first()
    if tenant is None:
        visible = Tenant.objects.for_user(user, "view").filter(pk=tenant_id).first()
        if visible is not None:
            if view is not None:
                view.tenant_concerned = visible
            raise PermissionDenied(f"Your role does not allow creating {what}s in this tenant.")
        raise Invalid("No such tenant.", field="tenant")
    return tenant


def resolve_compartments(user: Any, tenant: Tenant, refs: list[str] | None) -> list[Compartment] | None:
    """Compartments named (by name or id) in a workload creation: the tenant's, visible to the user.

    None stays None (the default compartment); an unknown reference is a 400 naming it.
    """
    if refs is None:
        return None
    visible = Compartment.objects.for_user(user, "operate").filter(tenant=tenant)
    found: list[Compartment] = []
    for ref in refs:
        try:
            compartment = visible.filter(pk=uuid.UUID(ref)).first()
        except ValueError:
            compartment = visible.filter(name=ref).first()
        if compartment is None:
            raise Invalid(f"No such compartment: {ref!r}.", field="compartments")
        found.append(compartment)
    return found


class CompartmentViewSet(ReadOnlyPermissionLayerViewSet):
    model = Compartment
    serializer_class = s.CompartmentSerializer
    lookup_value_regex = UUID_LOOKUP
    write_action = "manage"
    filterset_fields = ["tenant", "name"]
    ordering_fields = ["name", "created_at"]

    def base_queryset(self) -> QuerySet[Compartment]:
        return Compartment.objects.select_related("tenant")

    def get_serializer_class(self) -> Any:
        return s.CompartmentDetailSerializer if self.action == "retrieve" else s.CompartmentSerializer

    @extend_schema(request=s.CompartmentCreateSerializer, responses={201: s.CompartmentDetailSerializer})
    def create(self, request: Request) -> Response:
        data = s.CompartmentCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        tenant = tenant_for(request.user, v.get("tenant"), "manage", "compartment", self)
        compartment = network_services.create_compartment(
            actor=self.actor,
            tenant=tenant,
            name=v["name"],
            subnet=v.get("subnet"),
            prefix_length=v.get("prefix_length"),
            nat=v["nat"],
        )
        return Response(s.CompartmentDetailSerializer(compartment).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        network_services.delete_compartment(actor=self.actor, compartment=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class PublishedPortViewSet(ReadOnlyPermissionLayerViewSet):
    model = PublishedPort
    serializer_class = s.PublishedPortSerializer
    lookup_value_regex = UUID_LOOKUP
    write_action = "operate"
    filterset_fields = ["tenant", "workload", "protocol", "host_port"]
    ordering_fields = ["host_port", "created_at"]

    def base_queryset(self) -> QuerySet[PublishedPort]:
        return PublishedPort.objects.select_related("workload", "host")

    @extend_schema(request=s.PublishedPortCreateSerializer, responses={201: s.PublishedPortSerializer})
    def create(self, request: Request) -> Response:
        data = s.PublishedPortCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        workload = Workload.objects.for_user(request.user, "operate").filter(pk=v["workload"]).first()
        if workload is None:
            if Workload.objects.for_user(request.user, "view").filter(pk=v["workload"]).exists():
                raise PermissionDenied("Your role does not allow publishing this workload's ports.")
            raise Invalid("No such workload.", field="workload")
        port, op = network_services.publish_port(
            actor=self.actor,
            workload=workload,
            workload_port=v["workload_port"],
            protocol=v["protocol"],
            host_port=v.get("host_port"),
        )
        body = {**s.PublishedPortSerializer(port).data, "operation": OperationSerializer(op).data}
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={202: OperationSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        op = network_services.unpublish_port(actor=self.actor, port=self.get_object())
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


class EgressAllowanceViewSet(ReadOnlyPermissionLayerViewSet):
    """Operators' exceptions to the egress policy (created under /tenants/{id}/egress-allowances/)."""

    model = EgressAllowance
    serializer_class = s.EgressAllowanceSerializer
    lookup_value_regex = UUID_LOOKUP
    # Whoever sees one reaches the service, which refuses (and audits) anyone but an operator.
    write_action = "view"
    filterset_fields = ["tenant"]
    ordering_fields = ["network", "created_at"]

    def base_queryset(self) -> QuerySet[EgressAllowance]:
        return EgressAllowance.objects.select_related("tenant")

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        network_services.revoke_egress(actor=self.actor, allowance=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
