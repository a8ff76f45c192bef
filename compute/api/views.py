"""REST API for workloads (tenants) and hosts (operators)."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, QuerySet, Sum
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from compute import broker_access, host_rpc, hosts, services
from compute.api import serializers as s
from compute.host.broker import key_prefix
from compute.models import Host, Workload
from imaging.models import Image
from portal.api.viewsets import PermissionLayerViewSet, ReadOnlyPermissionLayerViewSet
from portal.errors import Conflict, Invalid
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP, require_operator
from tenants.models import Tenant


def accepted(op: Any) -> Response:
    return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


class WorkloadViewSet(ReadOnlyPermissionLayerViewSet):
    model = Workload
    serializer_class = s.WorkloadSerializer
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "state", "isolation", "name"]
    ordering_fields = ["name", "created_at", "state"]

    def base_queryset(self) -> QuerySet[Workload]:
        return Workload.objects.select_related("host", "image").prefetch_related("volume_attachments__volume")

    def _tenant(self, tenant_id: Any) -> Tenant:
        user = self.request.user
        token = getattr(user, "active_token", None)
        if tenant_id is None and token is not None and token.tenant_id:
            tenant_id = token.tenant_id
        if tenant_id is None:
            mine = list(Tenant.objects.for_user(user, "operate")[:2])
            if len(mine) != 1:
                raise Invalid("Say which tenant the workload belongs to.", field="tenant")
            return mine[0]
        tenant = Tenant.objects.for_user(user, "operate").filter(pk=tenant_id).first()
        if tenant is None:
            if Tenant.objects.for_user(user, "view").filter(pk=tenant_id).exists():
                raise PermissionDenied("Your role does not allow creating workloads in this tenant.")
            raise Invalid("No such tenant.", field="tenant")
        return tenant

    @extend_schema(request=s.WorkloadCreateSerializer, responses={202: OperationSerializer})
    def create(self, request: Request) -> Response:
        data = s.WorkloadCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        tenant = self._tenant(v.get("tenant"))
        image = Image.objects.for_user(request.user, "view").filter(pk=v["image"]).first()
        if image is None:
            raise Invalid("No such image.", field="image")
        pinned = None
        if v.get("host"):
            require_operator(self, "pin workloads to hosts")
            pinned = Host.objects.filter(pk=v["host"]).first()
            if pinned is None:
                raise Invalid("No such host.", field="host")
        spec = services.WorkloadSpec(
            name=v["name"],
            image=image,
            isolation=v["isolation"],
            command=v.get("command"),
            args=v.get("args"),
            env=v.get("env") or {},
            secret_env=v.get("secret_env") or {},
            workdir=v.get("workdir", ""),
            user=v.get("user", ""),
            vcpus=v["vcpus"],
            memory_mib=v["memory_mib"],
            disk_gib=v["disk_gib"],
            restart_policy=v["restart_policy"],
            on_host_lost=v["on_host_lost"],
            host=pinned,
            privileged=v["privileged"],
        )
        from compute.api.network_views import resolve_compartments
        from volumes.api.views import resolve_volume_mounts

        compartments = resolve_compartments(request.user, tenant, v.get("compartments"))
        volumes = resolve_volume_mounts(request.user, tenant, v.get("volumes") or [])
        return accepted(
            services.create_workload(
                actor=self.actor,
                tenant=tenant,
                spec=spec,
                start=v["start"],
                compartments=compartments,
                volumes=volumes,
            )
        )

    @extend_schema(request=None, responses={202: OperationSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        return accepted(services.delete_workload(actor=self.actor, workload=self.write_object()))

    @extend_schema(request=s.WorkloadUpdateSerializer, responses=s.WorkloadSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        """Change the process or resources in place; restart a running workload to pick them up."""
        workload = self.write_object()
        data = s.WorkloadUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.update_workload(actor=self.actor, workload=workload, changes=dict(data.validated_data))
        workload.refresh_from_db()
        return Response(s.WorkloadSerializer(workload).data)

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        return accepted(services.start_workload(actor=self.actor, workload=self.write_object()))

    @extend_schema(request=s.StopSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        workload = self.write_object()  # resolve first: a foreign object is a 404 whatever the body
        data = s.StopSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return accepted(services.stop_workload(actor=self.actor, workload=workload, **data.validated_data))

    @extend_schema(request=s.StopSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, pk: str) -> Response:
        workload = self.write_object()
        data = s.StopSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return accepted(services.restart_workload(actor=self.actor, workload=workload, **data.validated_data))

    @extend_schema(request=s.CommitSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def commit(self, request: Request, pk: str) -> Response:
        workload = self.write_object()
        data = s.CommitSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return accepted(services.commit_workload(actor=self.actor, workload=workload, **data.validated_data))

    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str) -> Response:
        workload = self.get_object()
        tail = min(int(request.query_params.get("tail_bytes", 65536) or 65536), 4 * 1024 * 1024)
        if workload.state in ("pending",):
            return Response({"logs": ""})
        return Response({"logs": host_rpc.ask(workload, "logs", tail_bytes=tail)})

    @action(detail=True, methods=["get"])
    def stats(self, request: Request, pk: str) -> Response:
        workload = self.get_object()
        if workload.state != "running":
            return Response({})  # nothing is measured on the host but a running workload
        return Response(host_rpc.ask(workload, "stats"))

    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: str) -> Response:
        """CPU, memory, network and disk over `range` (hour, day, week, month), sampled by its host."""
        workload = self.get_object()
        return Response(history_response(request, "workload", workload.pk))

    @action(detail=True, methods=["get"])
    def changes(self, request: Request, pk: str) -> Response:
        workload = self.get_object()
        if workload.state in ("pending", "creating"):
            raise Conflict("The workload has no changes yet.")
        return Response({"changes": host_rpc.ask(workload, "changes")})


def history_response(request: Request, kind: str, object_id: Any) -> dict[str, Any]:
    from compute import sampling

    range_name = request.query_params.get("range", "hour")
    try:
        return sampling.history(kind, object_id, range_name)
    except ValueError as error:
        raise Invalid(str(error), field="range") from None


class HostViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet):
    model = Host
    serializer_class = s.HostSerializer
    lookup_value_regex = UUID_LOOKUP
    write_action = "view"
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_serializer_context(self) -> dict[str, Any]:
        usage = {
            row["host"]: {
                "vcpus": str(row["vcpus"]),
                "memory_mib": row["memory"],
                "disk_gib": row["disk"],
                "workloads": row["n"],
            }
            for row in Workload.objects.values("host").annotate(
                vcpus=Sum("vcpus"), memory=Sum("memory_mib"), disk=Sum("disk_gib"), n=Count("id")
            )
        }
        return {**super().get_serializer_context(), "usage": usage}

    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: str) -> Response:
        """The host's CPU, memory and allocation over `range` (operators)."""
        host = self.get_object()  # hosts are visible to operators only (the permission layer)
        return Response(history_response(request, "host", host.pk))

    @extend_schema(request=s.HostStateSerializer, responses=s.HostSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        host = self.get_object()
        require_operator(self, "change hosts")
        data = s.HostStateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        host = hosts.set_host_state(actor=self.actor, host=host, state=data.validated_data["state"])
        return Response(s.HostSerializer(host, context=self.get_serializer_context()).data)

    @extend_schema(request=None, responses=s.HostSerializer)
    def destroy(self, request: Request, pk: str) -> Response:
        """Remove an empty host (operators): its credentials stop working, nothing is placed on it again,
        its row stays (state `removed`) for the audit trail. Evacuate it first."""
        host = self.get_object()
        require_operator(self, "remove hosts")
        host = hosts.remove_host(actor=self.actor, host=host)
        return Response(s.HostSerializer(host, context=self.get_serializer_context()).data)

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def evacuate(self, request: Request, pk: str) -> Response:
        """Drain the host and move every workload it runs to other hosts (operators)."""
        host = self.get_object()
        require_operator(self, "evacuate hosts")
        return accepted(services.evacuate_host(actor=self.actor, host=host))

    @extend_schema(request=None, responses={201: dict, 204: None})
    @action(detail=True, methods=["post", "delete"])
    def credential(self, request: Request, pk: str) -> Response:
        """POST: a new credential for the host (shown once; the old one stops working). DELETE: revoke."""
        host = self.get_object()
        require_operator(self, "manage host credentials")
        if request.method == "DELETE":
            hosts.revoke_host_credentials(actor=self.actor, host=host)
            return Response(status=status.HTTP_204_NO_CONTENT)
        secret = hosts.rotate_host_credential(actor=self.actor, host=host)
        return Response({"credential": secret}, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.JoinTokenRequestSerializer, responses={201: dict})
    @action(detail=False, methods=["post"], url_path="join-tokens")
    def join_tokens(self, request: Request) -> Response:
        require_operator(self, "add hosts")
        data = s.JoinTokenRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        profile: dict[str, Any] = {
            k: str(v) if not isinstance(v, dict) else v for k, v in data.validated_data.items()
        }
        name = str(profile.pop("host_name"))
        token, secret = hosts.create_join_token(actor=self.actor, host_name=name, profile=profile)
        portal_url = request.build_absolute_uri("/").rstrip("/")
        command = f"make agent PORTAL={portal_url} JOIN_TOKEN={secret}"
        return Response(
            {"id": str(token.pk), "token": secret, "expires_at": token.expires_at, "command": command},
            status=status.HTTP_201_CREATED,
        )


class JoinView(APIView):
    """A new host presents its single-use join token (no user: the token is the credential)."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(request=s.JoinSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        from tenants.authentication import check_auth_throttle, note_auth_failure

        check_auth_throttle(request)
        data = s.JoinSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            host, profile = hosts.redeem_join_token(
                secret=data.validated_data["token"],
                facts=data.validated_data["facts"],
                address=request.META.get("REMOTE_ADDR"),
            )
        except Exception as exc:
            if getattr(exc, "status_code", None) == 403:
                note_auth_failure(request, "bad join token")
            raise
        credential = profile.pop("credential")
        return Response(
            {
                "host": str(host.pk),
                "name": host.name,
                "queue": host.queue,
                "profile": profile,
                # The host's own secret, shown this once (the host keeps it in its 0600 settings file).
                "credential": credential,
                # What an agent needs: the portal's URL, its own credential, its own broker user (whose
                # password is that credential) and key prefix. Never a database URL (a host's agent reads
                # and writes no row) nor the portal's broker password.
                "env": {
                    "REDIS_URL": broker_access.agent_broker_url(host.pk),
                    "BULKHEAD_BROKER_KEYPREFIX": key_prefix(host.pk),
                    "BULKHEAD_HOST_CREDENTIAL": credential,
                    "BULKHEAD_PORTAL_URL": request.build_absolute_uri("/").rstrip("/"),
                },
            },
            status=status.HTTP_201_CREATED,
        )
