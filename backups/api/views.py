"""REST API for backups and their schedules (issue 17). Objects only through the permission layer."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from django.http import FileResponse
from django.http.response import HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import action
from rest_framework.exceptions import NotAuthenticated, NotFound
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from backups import services
from backups.api import serializers as s
from backups.models import Backup, BackupSchedule
from compute import hosts
from compute.api.views import DIGEST_PATTERN, accepted
from compute.models import Host
from imaging.store import DigestMismatch, LimitExceeded, UnsafeEntry
from portal.api.viewsets import ReadOnlyPermissionLayerViewSet
from portal.errors import Invalid
from portal.models import Operation, OperationState
from tenants import audit
from tenants.actors import Actor
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


class _HostView(APIView):
    """Authenticated by the host's own credential (`Authorization: Bearer bhh_…`), like host blobs."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def get_authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="bulkhead-hosts"'

    def host(self, request: Request) -> Host:
        from tenants.authentication import check_auth_throttle, note_auth_failure

        check_auth_throttle(request)
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        host = hosts.host_for_credential(secret.strip()) if scheme.lower() == "bearer" else None
        if host is None:
            note_auth_failure(request, "bad host credential")
            raise NotAuthenticated("A host credential is needed.")
        return host

    def refuse(self, host: Host, action: str, digest: str) -> NotFound:
        audit.record_denied(Actor.system(f"host {host.name}"), action, digest=digest[:80], host=host.name)
        return NotFound("No such backup data for this host.")


class HostBackupManifestView(_HostView):
    """`GET /api/v1/hosts/backup-manifests/<digest>/`: a backup's manifest, only to a host restoring
    that backup into a volume placed on it (another host's or nobody's answers 404, audited)."""

    @extend_schema(exclude=True)
    def get(self, request: Request, pk: str) -> HttpResponseBase:
        digest = pk
        host = self.host(request)
        if not (DIGEST_PATTERN.match(digest) and services.restoring_on(host, digest)):
            raise self.refuse(host, "host.backup_manifest.fetch", digest)
        path = services.backup_store().root / "manifests" / digest.removeprefix("sha256:")
        if not path.is_file():
            raise self.refuse(host, "host.backup_manifest.fetch", digest)
        return FileResponse(open(path, "rb"), content_type="application/json")

    @extend_schema(exclude=True)
    def put(self, request: Request, pk: str) -> Response:
        """A manifest from a host running a backup: validated as hostile input, named by its digest."""
        digest = pk
        host = self.host(request)
        if not (DIGEST_PATTERN.match(digest) and services.backing_up_on(host)):
            raise self.refuse(host, "host.backup_manifest.upload", digest)
        try:
            stored = services.backup_store().put_manifest(_body(request, MAX_UPLOAD * 4))
        except (UnsafeEntry, LimitExceeded, ValueError):
            raise Invalid("Not a valid backup manifest.") from None
        if stored != digest:
            raise Invalid("The manifest does not match its digest.")
        return Response(status=201)


MAX_UPLOAD = 64 << 20  # a chunk's frame is at most ~4 MiB; a manifest of a million files ~ 200 MiB


def _body(request: Request, limit: int) -> bytes:
    # The raw stream: Django's `body` refuses anything over DATA_UPLOAD_MAX_MEMORY_SIZE.
    data: bytes = request._request.read(limit + 1)
    if len(data) > limit:
        raise Invalid("Too large.")
    return data


class HostBackupMissingView(_HostView):
    """`POST /api/v1/hosts/backup-missing/` `{"chunks": [digest, ...]}`: which of these chunks the
    portal's store lacks, for a host that is running a backup (it uploads only those)."""

    @extend_schema(exclude=True)
    def post(self, request: Request) -> Response:
        host = self.host(request)
        if not services.backing_up_on(host):
            raise self.refuse(host, "host.backup_chunk.upload", "")
        chunks = request.data.get("chunks") if isinstance(request.data, dict) else None
        if not isinstance(chunks, list) or len(chunks) > 100_000:
            raise Invalid("Give at most 100,000 chunk digests.", field="chunks")
        store = services.backup_store()
        missing = [
            d
            for d in chunks
            if isinstance(d, str) and DIGEST_PATTERN.match(d) and not store.chunk_path(d).is_file()
        ]
        return Response({"missing": missing})


class HostBackupChunkView(_HostView):
    """`GET /api/v1/hosts/backup-chunks/<digest>/`: a chunk's zstd frame, only to a host restoring a
    backup that uses it into a volume placed on it."""

    @extend_schema(exclude=True)
    def get(self, request: Request, pk: str) -> HttpResponseBase:
        digest = pk
        host = self.host(request)
        if not (DIGEST_PATTERN.match(digest) and services.chunk_restoring_on(host, digest)):
            raise self.refuse(host, "host.backup_chunk.fetch", digest)
        path = services.backup_store().chunk_path(digest)
        if not path.is_file():
            raise self.refuse(host, "host.backup_chunk.fetch", digest)
        return FileResponse(open(path, "rb"), content_type="application/zstd")

    @extend_schema(exclude=True)
    def put(self, request: Request, pk: str) -> Response:
        """A chunk's zstd frame from a host running a backup (`?length=<uncompressed bytes>`); kept
        only if it inflates to that many bytes hashing to `digest`."""
        digest = pk
        host = self.host(request)
        if not (DIGEST_PATTERN.match(digest) and services.backing_up_on(host)):
            raise self.refuse(host, "host.backup_chunk.upload", digest)
        try:
            length = int(request.query_params.get("length", ""))
        except ValueError:
            raise Invalid("length is the chunk's uncompressed size.", field="length") from None
        try:
            added = services.backup_store().add_chunk(digest, length, _body(request, MAX_UPLOAD))
        except (DigestMismatch, LimitExceeded):
            audit.record_denied(
                Actor.system(f"host {host.name}"), "host.backup_chunk.upload", digest=digest, host=host.name
            )
            raise Invalid("The chunk does not match its digest.") from None
        return Response(status=201 if added else 200)
