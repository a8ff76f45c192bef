"""REST API for tenants, memberships, tokens, quotas, audit, operations and users."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from compute.api.serializers import EgressAllowanceCreateSerializer, EgressAllowanceSerializer
from portal import operations
from portal.api.viewsets import PermissionLayerViewSet, ReadOnlyPermissionLayerViewSet
from portal.errors import Conflict
from portal.models import Operation
from portal.permissions import active_token, acts_as_operator
from portal.tasks import selfcheck
from tenants import audit, services
from tenants.api import serializers as s
from tenants.api.filtersets import AuditEntryFilterSet, MembershipFilterSet, OperationFilterSet
from tenants.models import ApiToken, AuditEntry, Membership, Quota, Secret, Tenant

UUID_LOOKUP = r"[0-9a-fA-F-]{36}"


def require_operator(view: PermissionLayerViewSet, what: str) -> None:
    """Operator endpoints: staff through a session or an unrestricted token (never a scoped one)."""
    user = view.request.user
    token = getattr(user, "active_token", None)
    if user.is_staff and token is not None and token.tenant_id is not None:
        raise PermissionDenied(f"A token scoped to a tenant cannot {what}.")
    if not user.is_staff:
        raise PermissionDenied(f"Only operators may {what}.")
    if token is not None and token.read_only:
        raise PermissionDenied("This token is read-only.")


class TenantViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.UpdateModelMixin, PermissionLayerViewSet
):
    model = Tenant
    serializer_class = s.TenantSerializer
    write_action = "own"
    # Egress allowances are the operators' to change: every member reaches the service, which refuses
    # (and audits) anyone else under the allowance's own action.
    action_overrides = {"egress_allowances": "view"}
    lookup_value_regex = UUID_LOOKUP
    ordering_fields = ["name", "created_at"]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    @extend_schema(request=s.TenantCreateSerializer, responses={201: s.TenantSerializer})
    def create(self, request: Request) -> Response:
        require_operator(self, "create tenants")
        serializer = s.TenantCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tenant = services.create_tenant(
            actor=self.actor,
            name=serializer.validated_data["name"],
            display_name=serializer.validated_data.get("display_name", ""),
            owner=serializer.validated_data.get("owner"),
        )
        return Response(s.TenantSerializer(tenant).data, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: Any) -> None:
        tenant = self.get_object()
        changes = serializer.validated_data
        if "allow_privileged_containers" in changes:
            tenant = services.set_privileged_containers(
                actor=self.actor, tenant=tenant, allowed=changes["allow_privileged_containers"]
            )
        if "display_name" in changes or "allow_privileged_containers" not in changes:
            tenant = services.update_tenant(
                actor=self.actor, tenant=tenant, display_name=changes.get("display_name", "")
            )
        serializer.instance = tenant

    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: str) -> Response:
        """The tenant's CPU, memory and quota use over `range` (hour, day, week, month)."""
        from compute.api.views import history_response

        tenant = self.get_object()
        return Response(history_response(request, "tenant", tenant.pk))

    @extend_schema(
        request=EgressAllowanceCreateSerializer,
        responses={200: EgressAllowanceSerializer(many=True), 201: EgressAllowanceSerializer},
    )
    @action(detail=True, methods=["get", "post"], url_path="egress-allowances")
    def egress_allowances(self, request: Request, pk: str) -> Response:
        """The protected networks an operator opened to the tenant's workloads; operators add one (POST
        {"network": CIDR, "note": why}). One is closed again by DELETE /api/v1/egress-allowances/{id}/."""
        from compute import network_services
        from compute.compartments import EgressAllowance

        tenant = self.get_object()
        if request.method == "GET":
            allowances = EgressAllowance.objects.for_user(request.user).filter(tenant=tenant)
            return Response(EgressAllowanceSerializer(allowances, many=True).data)
        # The service refuses anyone but an operator before it looks at the body.
        body = request.data if isinstance(request.data, dict) else {}
        allowance, _ops = network_services.allow_egress(
            actor=self.actor, tenant=tenant, network=body.get("network", ""), note=body.get("note", "")
        )
        return Response(EgressAllowanceSerializer(allowance).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str) -> Response:
        tenant = self.get_object()
        require_operator(self, "delete tenants")
        services.delete_tenant(actor=self.actor, tenant=tenant)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MembershipViewSet(ReadOnlyPermissionLayerViewSet):
    model = Membership
    serializer_class = s.MembershipSerializer
    filterset_class = MembershipFilterSet
    write_action = "manage"
    ordering_fields = ["created_at", "role"]

    def base_queryset(self) -> QuerySet[Membership]:
        return Membership.objects.select_related("user", "tenant")

    @extend_schema(request=s.MembershipCreateSerializer, responses={201: s.MembershipSerializer})
    def create(self, request: Request) -> Response:
        serializer = s.MembershipCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tenant = self._tenant_for(serializer.validated_data["tenant"], "manage")
        membership = services.add_member(
            actor=self.actor,
            tenant=tenant,
            username=serializer.validated_data["username"],
            role=serializer.validated_data["role"],
        )
        return Response(s.MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.MembershipUpdateSerializer, responses=s.MembershipSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        membership = self.get_object()
        serializer = s.MembershipUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.change_role(
            actor=self.actor, membership=membership, role=serializer.validated_data["role"]
        )
        return Response(s.MembershipSerializer(membership).data)

    def destroy(self, request: Request, pk: str) -> Response:
        services.remove_member(actor=self.actor, membership=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _tenant_for(self, tenant_id: Any, action_name: Any) -> Tenant:
        tenant = Tenant.objects.for_user(self.request.user, action_name).filter(pk=tenant_id).first()
        if tenant is None:
            self.tenant_concerned = get_object_or_404(
                Tenant.objects.for_user(self.request.user, "view"), pk=tenant_id
            )
            raise PermissionDenied("Your role does not allow managing members of this tenant.")
        return tenant


class SecretViewSet(ReadOnlyPermissionLayerViewSet):
    """A tenant's secrets: every role sees names; admins set values, which nobody reads back."""

    model = Secret
    serializer_class = s.SecretSerializer
    lookup_value_regex = UUID_LOOKUP
    write_action = "manage"
    filterset_fields = ["tenant", "name"]
    ordering_fields = ["name", "updated_at"]
    http_method_names = ["get", "post", "put", "delete", "head", "options"]

    def base_queryset(self) -> QuerySet[Secret]:
        return Secret.objects.select_related("tenant")

    @extend_schema(request=s.SecretCreateSerializer, responses={201: s.SecretSerializer})
    def create(self, request: Request) -> Response:
        from compute.api.network_views import tenant_for

        data = s.SecretCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = tenant_for(request.user, data.validated_data.get("tenant"), "manage", "secret", self)
        v = data.validated_data
        secret = services.create_secret(actor=self.actor, tenant=tenant, name=v["name"], value=v["value"])
        return Response(s.SecretSerializer(secret).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.SecretValueSerializer, responses=s.SecretSerializer)
    def update(self, request: Request, pk: str) -> Response:
        secret = self.get_object()
        data = s.SecretValueSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        value = data.validated_data["value"]
        secret = services.set_secret_value(actor=self.actor, secret=secret, value=value)
        return Response(s.SecretSerializer(secret).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.delete_secret(actor=self.actor, secret=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class ApiTokenViewSet(ReadOnlyPermissionLayerViewSet):
    model = ApiToken
    serializer_class = s.ApiTokenSerializer
    lookup_value_regex = UUID_LOOKUP
    ordering_fields = ["created_at", "last_used_at"]

    def base_queryset(self) -> QuerySet[ApiToken]:
        return ApiToken.objects.select_related("user")

    def get_queryset(self) -> QuerySet[ApiToken]:
        return ApiToken.objects.for_user(self.request.user).select_related("user")

    @extend_schema(request=s.ApiTokenSerializer, responses={201: s.ApiTokenCreatedSerializer})
    def create(self, request: Request) -> Response:
        serializer = s.ApiTokenSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tenant = serializer.validated_data.get("tenant")
        if (
            tenant is not None
            and not Tenant.objects.for_user(request.user, "view").filter(pk=tenant.pk).exists()
        ):
            raise PermissionDenied("You are not a member of that tenant.")
        token, secret = services.create_token(
            actor=self.actor,
            name=serializer.validated_data["name"],
            tenant=tenant,
            read_only=serializer.validated_data.get("read_only", False),
            expires_at=serializer.validated_data.get("expires_at"),
        )
        data = s.ApiTokenCreatedSerializer(token, context={"secret": secret}).data
        return Response(data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, pk: str) -> Response:
        token = self.get_object()
        own = getattr(request.user, "active_token", None)
        # A restricted token sees only itself (get_object): it may revoke itself, nothing else.
        if own is not None and own.read_only and own.pk != token.pk:
            raise PermissionDenied("This token is read-only.")
        services.revoke_token(actor=self.actor, token=token)
        return Response(status=status.HTTP_204_NO_CONTENT)


class QuotaViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet):
    model = Quota
    serializer_class = s.QuotaSerializer
    filterset_fields = ["tenant"]
    write_action = "view"  # operators only; checked in partial_update
    http_method_names = ["get", "patch", "head", "options"]

    def base_queryset(self) -> QuerySet[Quota]:
        return Quota.objects.select_related("tenant")

    def partial_update(self, request: Request, pk: str) -> Response:
        quota = self.get_object()
        require_operator(self, "change quotas")
        serializer = s.QuotaSerializer(quota, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        quota = services.update_quota(actor=self.actor, quota=quota, **serializer.validated_data)
        return Response(s.QuotaSerializer(quota).data)


class AuditEntryViewSet(ReadOnlyPermissionLayerViewSet):
    model = AuditEntry
    serializer_class = s.AuditEntrySerializer
    filterset_class = AuditEntryFilterSet
    ordering_fields = ["time"]

    def permission_action(self) -> Any:
        return "audit"


class OperationViewSet(ReadOnlyPermissionLayerViewSet):
    model = Operation
    serializer_class = s.OperationSerializer
    filterset_class = OperationFilterSet
    lookup_value_regex = UUID_LOOKUP
    ordering_fields = ["created_at"]

    @extend_schema(request=None, responses=s.OperationSerializer)
    @extend_schema(responses=s.OperationLogSerializer)
    @action(detail=True, methods=["get"])
    def log(self, request: Request, pk: str) -> Response:
        """Every step of the operation with its time and progress, and the error that ended it."""
        op = self.get_object()
        entries = op.log_entries.all()
        return Response(s.OperationLogSerializer({"operation": op, "entries": entries}).data)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        op = self.get_object()
        if not operations.cancel(op):
            raise Conflict("Only a queued operation can be cancelled.")
        audit.record(self.actor, "operation.cancel", op, tenant=op.tenant)
        op.refresh_from_db()
        return Response(s.OperationSerializer(op).data)

    @extend_schema(request=None, responses={202: s.OperationSerializer})
    @action(detail=False, methods=["post"])
    def selfcheck(self, request: Request) -> Response:
        require_operator(self, "run the self-check")
        op = start_selfcheck(self.actor, steps=int(request.data.get("steps", 0) or 0))
        return Response(s.OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


def start_selfcheck(actor: Any, steps: int = 0) -> Operation:
    from django.db import transaction

    with transaction.atomic():
        op = operations.start(
            kind="portal.selfcheck", task=selfcheck, actor=actor, params={"steps": max(0, min(steps, 20))}
        )
        audit.record(actor, "operation.selfcheck", op)
    return op


class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet):
    serializer_class = s.UserSerializer
    model = get_user_model()

    def get_queryset(self) -> QuerySet[Any]:
        user = self.request.user
        users = get_user_model().objects.order_by("username")
        return users if acts_as_operator(user) else users.filter(pk=user.pk)  # type: ignore[misc]

    def get_object(self) -> Any:
        return get_object_or_404(self.get_queryset(), pk=self.kwargs["pk"])

    def create(self, request: Request) -> Response:
        require_operator(self, "create users")
        serializer = s.UserSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = services.create_user(actor=self.actor, **serializer.validated_data)
        return Response(s.UserSerializer(user).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.PasswordChangeSerializer, responses={204: None})
    @action(detail=False, methods=["post"], url_path="me/password")
    def password(self, request: Request) -> Response:
        """Change your own password (the current one is required). Not with a restricted token."""
        token = active_token(request.user)
        if token is not None and (token.read_only or token.tenant_id is not None):
            audit.record_denied(self.actor, "user.password_change", reason="restricted token")
            raise PermissionDenied("A read-only or tenant-scoped token cannot change a password.")
        data = s.PasswordChangeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.change_password(actor=self.actor, user=request.user, **data.validated_data)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=s.UserSerializer)
    @action(detail=True, methods=["post"])
    def deactivate(self, request: Request, pk: str) -> Response:
        """Operators: the user's sessions end at once and its tokens stop working."""
        user = self.get_object()
        require_operator(self, "deactivate users")
        return Response(
            s.UserSerializer(services.update_user(actor=self.actor, user=user, is_active=False)).data
        )

    @extend_schema(request=None, responses=s.UserSerializer)
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str) -> Response:
        user = self.get_object()
        require_operator(self, "activate users")
        return Response(
            s.UserSerializer(services.update_user(actor=self.actor, user=user, is_active=True)).data
        )

    @extend_schema(request=s.UserUpdateSerializer, responses=s.UserSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        target = self.get_object()
        require_operator(self, "change users")
        serializer = s.UserUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = services.update_user(actor=self.actor, user=target, **serializer.validated_data)
        return Response(s.UserSerializer(user).data)

    @action(detail=False, methods=["get"])
    def me(self, request: Request) -> Response:
        memberships = Membership.objects.filter(user=request.user).select_related("tenant")  # type: ignore[misc]
        token = active_token(request.user)
        if token is not None and token.tenant_id is not None:
            memberships = memberships.filter(tenant_id=token.tenant_id)
        return Response(
            {
                **s.UserSerializer(request.user).data,
                "memberships": [
                    {"tenant": str(m.tenant_id), "tenant_name": m.tenant.name, "role": m.role}
                    for m in memberships
                ],
            }
        )
