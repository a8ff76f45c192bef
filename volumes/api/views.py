"""REST API for volumes and their snapshots (issue 17). Objects only through the permission layer."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from compute.api.network_views import tenant_for
from compute.api.views import accepted
from compute.models import Host, Workload
from portal.api.viewsets import ReadOnlyPermissionLayerViewSet
from portal.errors import Invalid
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP, require_operator
from tenants.models import Tenant
from volumes import services
from volumes.api import serializers as s
from volumes.models import Snapshot, Volume, VolumeAttachment


def resolve_volume_mounts(
    user: Any, tenant: Tenant, refs: list[dict[str, Any]]
) -> list[services.VolumeMount]:
    """Volumes named (by name or id) in a workload creation: the tenant's, visible to the user as
    "operate"; anything else is "no such volume" (another tenant's volume reveals nothing)."""
    visible = Volume.objects.for_user(user, "operate").filter(tenant=tenant).select_related("host", "tenant")
    mounts = []
    for ref in refs:
        name = str(ref["volume"])
        try:
            volume = visible.filter(pk=uuid.UUID(name)).first()
        except ValueError:
            volume = visible.filter(name=name).first()
        if volume is None:
            raise Invalid(f"No such volume: {name!r}.", field="volumes")
        mounts.append(
            services.VolumeMount(volume=volume, path=ref["path"], read_only=ref.get("read_only", False))
        )
    return mounts


class VolumeViewSet(ReadOnlyPermissionLayerViewSet):
    model = Volume
    serializer_class = s.VolumeSerializer
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "state", "name", "host"]
    ordering_fields = ["name", "created_at", "size_bytes"]

    def base_queryset(self) -> QuerySet[Volume]:
        return Volume.objects.select_related("host", "tenant").prefetch_related(
            "attachments__workload", "snapshots"
        )

    def _tenant(self, tenant_id: Any) -> Tenant:
        return tenant_for(self.request.user, tenant_id, "operate", "volume", view=self)

    @extend_schema(request=s.VolumeCreateSerializer, responses={202: OperationSerializer})
    def create(self, request: Request) -> Response:
        data = s.VolumeCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        tenant = self._tenant(v.get("tenant"))
        host = None
        if v.get("host"):
            require_operator(self, "place volumes on hosts")
            host = Host.objects.filter(pk=v["host"]).first()
            if host is None:
                raise Invalid("No such host.", field="host")
        return accepted(
            services.create_volume(
                actor=self.actor, tenant=tenant, name=v["name"], size_gib=v["size_gib"], host=host
            )
        )

    @extend_schema(request=None, responses={202: OperationSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        return accepted(services.delete_volume(actor=self.actor, volume=self.write_object()))

    @extend_schema(request=s.VolumeResizeSerializer, responses={202: OperationSerializer})
    def partial_update(self, request: Request, pk: str) -> Response:
        volume = self.write_object()
        data = s.VolumeResizeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return accepted(
            services.resize_volume(actor=self.actor, volume=volume, size_gib=data.validated_data["size_gib"])
        )

    def _workload(self, volume: Volume, workload_id: Any) -> Workload:
        workload = (
            Workload.objects.for_user(self.request.user, "operate")
            .filter(pk=workload_id, tenant=volume.tenant_id)
            .first()
        )
        if workload is None:
            raise Invalid("No such workload.", field="workload")
        return workload

    @extend_schema(request=s.AttachSerializer, responses=s.AttachmentSerializer)
    @action(detail=True, methods=["post"])
    def attach(self, request: Request, pk: str) -> Response:
        """Attach to a stopped workload on the volume's host; mounted at its next start."""
        volume = self.write_object()
        data = s.AttachSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        attachment = services.attach_volume(
            actor=self.actor,
            volume=volume,
            workload=self._workload(volume, v["workload"]),
            path=v["path"],
            read_only=v["read_only"],
        )
        return Response(s.AttachmentSerializer(attachment).data, status=201)

    @extend_schema(request=s.DetachSerializer, responses={204: None})
    @action(detail=True, methods=["post"])
    def detach(self, request: Request, pk: str) -> Response:
        volume = self.write_object()
        data = s.DetachSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        attachment = VolumeAttachment.objects.filter(
            volume=volume, workload_id=data.validated_data["workload"]
        ).first()
        if attachment is None:
            raise Invalid("The volume is not attached to that workload.", field="workload")
        services.detach_volume(actor=self.actor, attachment=attachment)
        return Response(status=204)

    @extend_schema(request=s.SnapshotCreateSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def snapshot(self, request: Request, pk: str) -> Response:
        volume = self.write_object()
        data = s.SnapshotCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return accepted(
            services.snapshot_volume(actor=self.actor, volume=volume, name=data.validated_data["name"])
        )


class SnapshotViewSet(ReadOnlyPermissionLayerViewSet):
    model = Snapshot
    serializer_class = s.SnapshotSerializer
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["volume", "state", "name"]
    ordering_fields = ["name", "created_at"]

    def base_queryset(self) -> QuerySet[Snapshot]:
        return Snapshot.objects.select_related("volume__tenant", "volume__host")

    @extend_schema(request=None, responses={202: OperationSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        return accepted(services.delete_snapshot(actor=self.actor, snapshot=self.write_object()))

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request: Request, pk: str) -> Response:
        """Make the volume what this snapshot holds (its workloads stopped)."""
        return accepted(services.restore_snapshot(actor=self.actor, snapshot=self.write_object()))

    @extend_schema(request=s.CloneSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def clone(self, request: Request, pk: str) -> Response:
        """A new volume holding what this snapshot holds."""
        snapshot = self.write_object()
        data = s.CloneSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        return accepted(
            services.clone_snapshot(
                actor=self.actor, snapshot=snapshot, name=v["name"], size_gib=v.get("size_gib")
            )
        )
