"""REST API for backups and their schedules (issue 17). Objects only through the permission layer."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from django.http import FileResponse
from django.http.response import HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from backups import services
from backups.api import serializers as s
from backups.models import Backup, BackupSchedule
from compute.api.views import accepted
from compute.models import Host
from portal.api.viewsets import ReadOnlyPermissionLayerViewSet
from portal.errors import Invalid
from portal.models import Operation, OperationState
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP, require_operator
from volumes.models import Snapshot, Volume


class BackupViewSet(ReadOnlyPermissionLayerViewSet):
    model = Backup
    serializer_class = s.BackupSerializer
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "volume", "state", "schedule"]
    ordering_fields = ["created_at", "stored_bytes"]

    def base_queryset(self) -> QuerySet[Backup]:
        return Backup.objects.select_related("tenant", "volume", "snapshot")

    @extend_schema(request=s.BackupCreateSerializer, responses={202: OperationSerializer})
    def create(self, request: Request) -> Response:
        """Back up a volume (or one of its snapshots)."""
        data = s.BackupCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        volume = Volume.objects.for_user(request.user, "operate").filter(pk=v["volume"]).first()
        if volume is None:
            raise Invalid("No such volume.", field="volume")
        snapshot = None
        if v.get("snapshot"):
            snapshot = Snapshot.objects.filter(pk=v["snapshot"], volume=volume).first()
            if snapshot is None:
                raise Invalid("No such snapshot of this volume.", field="snapshot")
        return accepted(services.create_backup(actor=self.actor, volume=volume, snapshot=snapshot))

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.delete_backup(actor=self.actor, backup=self.write_object())
        return Response(status=204)

    @extend_schema(request=s.BackupRestoreSerializer, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request: Request, pk: str) -> Response:
        """A new volume holding what this backup holds (on another host if an operator says so)."""
        backup = self.write_object()
        data = s.BackupRestoreSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        host = None
        if v.get("host"):
            require_operator(self, "place volumes on hosts")
            host = Host.objects.filter(pk=v["host"]).first()
            if host is None:
                raise Invalid("No such host.", field="host")
        return accepted(
            services.restore_backup(
                actor=self.actor, backup=backup, name=v["name"], size_gib=v.get("size_gib"), host=host
            )
        )

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk: str) -> Response:
        """Re-hash every chunk of the backup."""
        return accepted(services.verify_backup(actor=self.actor, backup=self.write_object()))

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=True, methods=["post"])
    def export(self, request: Request, pk: str) -> Response:
        """Write the backup as one tar.zst; the finished operation's result names the download URL."""
        return accepted(services.export_backup(actor=self.actor, backup=self.write_object()))

    @extend_schema(responses={(200, "application/zstd"): bytes})
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: str) -> HttpResponseBase:
        """The tar.zst an export operation of this backup wrote (`?operation=<id>`)."""
        backup = self.get_object()
        op = None
        op_id = _uuid(request.query_params.get("operation"))
        if op_id is not None:
            op = Operation.objects.filter(
                pk=op_id, kind="backup.export", target_id=str(backup.pk), state=OperationState.SUCCEEDED
            ).first()
        path = services.export_path(op.pk) if op is not None else None
        if path is None or not path.is_file():
            raise NotFound("No finished export of this backup; export it first.")
        name = f"{backup.volume_name}-{backup.created_at:%Y%m%d-%H%M%S}.tar.zst"
        return FileResponse(
            open(path, "rb"), as_attachment=True, filename=name, content_type="application/zstd"
        )


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class BackupScheduleViewSet(ReadOnlyPermissionLayerViewSet):
    model = BackupSchedule
    serializer_class = s.BackupScheduleSerializer
    lookup_value_regex = UUID_LOOKUP
    filterset_fields = ["tenant", "volume", "enabled"]

    def base_queryset(self) -> QuerySet[BackupSchedule]:
        return BackupSchedule.objects.select_related("tenant", "volume")

    @extend_schema(request=s.BackupScheduleSerializer, responses={201: s.BackupScheduleSerializer})
    def create(self, request: Request) -> Response:
        """Set the volume's schedule (one per volume; setting it again replaces it)."""
        data = s.BackupScheduleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        volume = Volume.objects.for_user(request.user, "operate").filter(pk=v["volume"].pk).first()
        if volume is None:
            raise Invalid("No such volume.", field="volume")
        schedule = services.set_schedule(
            actor=self.actor,
            volume=volume,
            every_hours=v.get("every_hours", 24),
            keep_last=v.get("keep_last", 7),
            enabled=v.get("enabled", True),
        )
        return Response(s.BackupScheduleSerializer(schedule).data, status=201)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.delete_schedule(actor=self.actor, schedule=self.write_object())
        return Response(status=204)
