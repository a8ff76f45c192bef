"""REST API of desired state: state and mode per tenant, revisions, plans, apply, export, schema, status.

Everything resolves through the permission layer: members (any role) read, owners and admins ("manage")
write. A tenant, revision or plan of another tenant is a 404.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from compute.desired import services
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState, ReconcileMode
from compute.desired.schema import SCHEMA
from portal.api.errors import error_response
from portal.api.viewsets import PermissionLayerViewSet, ReadOnlyPermissionLayerViewSet
from portal.errors import Invalid
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP
from tenants.models import Tenant

MAX_DOCUMENT_CHARS = 2 * 1024 * 1024


def invalid_document(error: services.InvalidDocument) -> Response:
    """400 with every issue's path, line and message (what editors and the CLI show)."""
    response = error_response(status.HTTP_400_BAD_REQUEST, error.code, error.message)
    response.data["error"]["issues"] = [issue.to_dict() for issue in error.issues]
    return response


class DesiredStateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField(source="tenant_id")
    tenant_name = serializers.CharField(source="tenant.name")
    mode = serializers.CharField()
    target_revision = serializers.IntegerField(allow_null=True)
    latest_revision = serializers.SerializerMethodField()
    observed_revision = serializers.IntegerField(allow_null=True)
    conditions = serializers.JSONField()
    drift = serializers.JSONField()
    resource_conditions = serializers.JSONField()
    last_run_at = serializers.DateTimeField(allow_null=True)
    last_success_at = serializers.DateTimeField(allow_null=True)
    last_duration_ms = serializers.IntegerField(allow_null=True)
    next_run_at = serializers.DateTimeField(allow_null=True)
    failures = serializers.IntegerField()
    last_error = serializers.CharField()

    def get_latest_revision(self, state: DesiredState) -> int | None:
        latest = DesiredRevision.objects.filter(tenant_id=state.tenant_id).order_by("-number").first()
        return latest.number if latest else None


class ModeSerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=ReconcileMode.values)


class RevisionSerializer(serializers.ModelSerializer):
    class Meta:
        model = DesiredRevision
        fields = [
            "id",
            "tenant",
            "number",
            "message",
            "author_label",
            "rolled_back_from",
            "sha256",
            "created_at",
            "text",
        ]
        read_only_fields = fields


class RevisionCreateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField(required=False)
    text = serializers.CharField(max_length=MAX_DOCUMENT_CHARS, trim_whitespace=False)
    message = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class ApplyDocumentSerializer(RevisionCreateSerializer):
    """A document to save as a revision, plan and apply at once (``bulkhead apply --yes``)."""


class RollbackSerializer(serializers.Serializer):
    message = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class PlanSerializer(serializers.ModelSerializer):
    revision_number = serializers.IntegerField(source="revision.number", allow_null=True, default=None)

    class Meta:
        model = DesiredPlan
        fields = [
            "id",
            "tenant",
            "revision",
            "revision_number",
            "state",
            "plan",
            "observed_fingerprint",
            "desired_fingerprint",
            "operation",
            "error",
            "created_at",
            "applied_at",
        ]
        read_only_fields = fields


class PlanCreateSerializer(serializers.Serializer):
    revision = serializers.UUIDField(required=False, help_text="A stored revision to plan.")
    tenant = serializers.UUIDField(required=False)
    number = serializers.IntegerField(required=False, min_value=1, help_text="Revision number in tenant.")
    text = serializers.CharField(
        max_length=MAX_DOCUMENT_CHARS,
        required=False,
        trim_whitespace=False,
        help_text="An unsaved document: a preview plan that cannot be applied.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("revision") and "text" not in attrs and "number" not in attrs:
            raise serializers.ValidationError({"revision": ["Give a revision, a number or a document text."]})
        return attrs


def tenant_for(request: Request, tenant_id: Any, act: Any) -> Tenant:
    """The tenant named in the request (or the only one the user/token has), allowed for ``act``."""
    user = request.user
    token = getattr(user, "active_token", None)
    if tenant_id is None and token is not None and token.tenant_id:
        tenant_id = token.tenant_id
    if tenant_id is None:
        mine = list(Tenant.objects.for_user(user, "view")[:2])
        if len(mine) != 1:
            raise Invalid("Say which tenant.", field="tenant")
        tenant_id = mine[0].pk
    tenant = Tenant.objects.for_user(user, act).filter(pk=tenant_id).first()
    if tenant is None:
        if Tenant.objects.for_user(user, "view").filter(pk=tenant_id).exists():
            raise PermissionDenied("Your role does not allow managing this tenant's desired state.")
        raise Invalid("No such tenant.", field="tenant")
    return tenant


class DesiredStateViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet):
    """One entry per tenant: the reconciler mode, the revisions and the last conditions."""

    model = Tenant
    write_action = "manage"
    lookup_value_regex = UUID_LOOKUP
    serializer_class = DesiredStateSerializer
    http_method_names = ["get", "post", "patch", "head", "options"]

    def list(self, request: Request) -> Response:
        tenants = self.get_queryset().order_by("name")
        page = self.paginate_queryset(tenants)
        states = [services.ensure_state(tenant) for tenant in (page if page is not None else tenants)]
        for state, tenant in zip(states, page if page is not None else tenants, strict=True):
            state.tenant = tenant
        data = DesiredStateSerializer(states, many=True).data
        return self.get_paginated_response(data) if page is not None else Response(data)

    def retrieve(self, request: Request, pk: str) -> Response:
        tenant = self.get_object()
        state = services.ensure_state(tenant)
        return Response(DesiredStateSerializer(state).data)

    @extend_schema(request=ModeSerializer, responses=DesiredStateSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        tenant = self.get_object()
        data = ModeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        state = services.set_mode(actor=self.actor, tenant=tenant, mode=data.validated_data["mode"])
        return Response(DesiredStateSerializer(state).data)

    @action(detail=True, methods=["get"])
    def status(self, request: Request, pk: str) -> Response:
        state = services.ensure_state(self.get_object())
        return Response(
            {
                "mode": state.mode,
                "target_revision": state.target_revision,
                "observed_revision": state.observed_revision,
                "conditions": state.conditions,
                "drift": state.drift,
                "resource_conditions": state.resource_conditions,
                "last_run_at": state.last_run_at,
                "next_run_at": state.next_run_at,
                "failures": state.failures,
                "last_error": state.last_error,
            }
        )

    @action(detail=True, methods=["get"])
    def export(self, request: Request, pk: str) -> Response:
        return Response({"document": services.export_for(self.get_object())})

    @extend_schema(request=ApplyDocumentSerializer, responses={202: dict, 200: dict})
    @action(detail=False, methods=["post"], url_path="apply", url_name="apply")
    def apply_document(self, request: Request) -> Response:
        """Save the document as a revision, plan it and apply the plan: the revision, the plan and the
        operation (null when nothing changes and the revision already is the target). 202 when applying."""
        data = ApplyDocumentSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = tenant_for(request, data.validated_data.get("tenant"), "manage")
        try:
            done = services.save_plan_and_apply(
                actor=self.actor,
                tenant=tenant,
                text=data.validated_data["text"],
                message=data.validated_data["message"],
            )
        except services.InvalidDocument as error:
            return invalid_document(error)
        return Response(
            {
                "revision": RevisionSerializer(done.revision).data,
                "revision_created": done.revision_created,
                "plan": PlanSerializer(done.plan).data,
                "operation": OperationSerializer(done.operation).data if done.operation else None,
            },
            status=status.HTTP_202_ACCEPTED if done.operation else status.HTTP_200_OK,
        )

    @extend_schema(responses={200: dict})
    @action(detail=False, methods=["get"], url_path="schema", url_name="schema")
    def document_schema(self, request: Request) -> Response:
        return Response(SCHEMA)


class RevisionViewSet(ReadOnlyPermissionLayerViewSet):
    model = DesiredRevision
    serializer_class = RevisionSerializer
    write_action = "manage"
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "number"]
    ordering_fields = ["number", "created_at"]

    def base_queryset(self) -> QuerySet[DesiredRevision]:
        return DesiredRevision.objects.all()

    @extend_schema(request=RevisionCreateSerializer, responses={201: RevisionSerializer})
    def create(self, request: Request) -> Response:
        data = RevisionCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = tenant_for(request, data.validated_data.get("tenant"), "manage")
        try:
            revision, created = services.save_revision(
                actor=self.actor,
                tenant=tenant,
                text=data.validated_data["text"],
                message=data.validated_data["message"],
            )
        except services.InvalidDocument as error:
            return invalid_document(error)
        return Response(
            RevisionSerializer(revision).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )

    @extend_schema(
        parameters=[OpenApiParameter("against", str, description="Revision number or id; default previous")]
    )
    @action(detail=True, methods=["get"])
    def diff(self, request: Request, pk: str) -> Response:
        revision = self.get_object()
        against = request.query_params.get("against")
        others = DesiredRevision.objects.filter(tenant=revision.tenant)
        if against is None:
            old = others.filter(number__lt=revision.number).order_by("-number").first()
            if old is None:
                old = revision
        elif against.isdigit():
            old = get_object_or_404(others, number=int(against))
        else:
            try:
                against_id = uuid.UUID(against)
            except ValueError:
                raise Invalid("against: a revision number or id.", field="against") from None
            old = get_object_or_404(others, pk=against_id)
        try:
            return Response(services.diff_revisions(old, revision))
        except services.InvalidDocument as error:
            return invalid_document(error)

    @extend_schema(request=RollbackSerializer, responses={201: RevisionSerializer})
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, pk: str) -> Response:
        revision = self.get_object()
        data = RollbackSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            new = services.rollback(
                actor=self.actor, revision=revision, message=data.validated_data["message"]
            )
        except services.InvalidDocument as error:
            return invalid_document(error)
        return Response(RevisionSerializer(new).data, status=status.HTTP_201_CREATED)


class PlanViewSet(ReadOnlyPermissionLayerViewSet):
    model = DesiredPlan
    serializer_class = PlanSerializer
    write_action = "manage"
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "state"]
    ordering_fields = ["created_at"]

    def base_queryset(self) -> QuerySet[DesiredPlan]:
        return DesiredPlan.objects.select_related("revision")

    @extend_schema(request=PlanCreateSerializer, responses={201: PlanSerializer})
    def create(self, request: Request) -> Response:
        data = PlanCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        revision = None
        if v.get("revision"):
            revision = (
                DesiredRevision.objects.for_user(request.user, "manage").filter(pk=v["revision"]).first()
            )
            if revision is None:
                if DesiredRevision.objects.for_user(request.user, "view").filter(pk=v["revision"]).exists():
                    raise PermissionDenied("Your role does not allow planning this tenant's desired state.")
                raise Invalid("No such revision.", field="revision")
            tenant = revision.tenant
        else:
            tenant = tenant_for(request, v.get("tenant"), "manage")
            if "number" in v:
                revision = DesiredRevision.objects.filter(tenant=tenant, number=v["number"]).first()
                if revision is None:
                    raise Invalid("No such revision.", field="number")
        try:
            plan = services.create_plan(
                actor=self.actor, tenant=tenant, revision=revision, text=None if revision else v.get("text")
            )
        except services.InvalidDocument as error:
            return invalid_document(error)
        return Response(PlanSerializer(plan).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def apply(self, request: Request, pk: str) -> Response:
        plan = self.get_object()
        op = services.apply_plan(actor=self.actor, plan=plan)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)
