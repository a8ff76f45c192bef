"""The host API: what a host's agent reads and reports, authenticated by the host's own credential
(`Authorization: Bearer bhh_…`). Every view acts on the host the credential belongs to and nothing
else; the services in `compute.host_reports` check that each object named is placed on it."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import NotAuthenticated
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from compute import host_reports, hosts
from compute.models import Host


class HostAPIView(APIView):
    """A view for one host's agent: `self.host` is the host whose current credential was presented."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    host: Host

    def get_authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="bulkhead-hosts"'  # a 401, not a 403, for a missing or wrong credential

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        self.host = authenticated_host(request)

    @property
    def actor(self) -> Any:
        return host_reports.host_actor(self.host)

    def body(self) -> dict[str, Any]:
        data = self.request.data
        if not isinstance(data, dict):
            from portal.errors import Invalid

            raise Invalid("The body is a JSON object.")
        return data


def authenticated_host(request: Request) -> Host:
    """The host of the presented credential; a missing, wrong, rotated or revoked one is a 401
    (throttled like any failed authentication)."""
    from tenants.authentication import check_auth_throttle, note_auth_failure

    check_auth_throttle(request)
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    host = hosts.host_for_credential(secret.strip()) if scheme.lower() == "bearer" else None
    if host is None:
        note_auth_failure(request, "bad host credential")
        raise NotAuthenticated("A host credential is needed.")
    return host


@extend_schema(exclude=True)
class HostHeartbeatView(HostAPIView):
    """POST: the host is alive."""

    def post(self, request: Request) -> Response:
        host_reports.record_heartbeat(self.host)
        return Response({"host": str(self.host.pk), "name": self.host.name, "state": self.host.state})


@extend_schema(exclude=True)
class HostFactsView(HostAPIView):
    """POST {facts}: what the host is and can do (validated; capacity never above the approved)."""

    def post(self, request: Request) -> Response:
        facts = self.body().get("facts")
        return Response(host_reports.report_facts(actor=self.actor, host=self.host, facts=facts))  # type: ignore[arg-type]


@extend_schema(exclude=True)
class HostWorkloadsView(HostAPIView):
    """GET: the host's desired set, each workload placed on it as a complete spec."""

    def get(self, request: Request) -> Response:
        return Response({"workloads": host_reports.desired_set(self.host)})


@extend_schema(exclude=True)
class HostWorkloadView(HostAPIView):
    """GET: one workload placed on this host, as its spec."""

    def get(self, request: Request, pk: str) -> Response:
        return Response(host_reports.workload_spec_on(self.host, pk))


@extend_schema(exclude=True)
class HostWorkloadStateView(HostAPIView):
    """POST {expected, changes, never_started, count_restart}: a state change the agent saw."""

    def post(self, request: Request, pk: str) -> Response:
        body = self.body()
        return Response(
            host_reports.report_workload_state(
                actor=self.actor,
                host=self.host,
                workload_id=pk,
                expected=body.get("expected"),  # type: ignore[arg-type]
                changes=body.get("changes") or {},
                never_started=bool(body.get("never_started")),
                count_restart=bool(body.get("count_restart")),
            )
        )


@extend_schema(exclude=True)
class HostWorkloadRemovedView(HostAPIView):
    """POST: the host removed everything of a workload being deleted."""

    def post(self, request: Request, pk: str) -> Response:
        return Response(
            host_reports.report_workload_removed(actor=self.actor, host=self.host, workload_id=pk)
        )


@extend_schema(exclude=True)
class HostSamplesView(HostAPIView):
    """POST {workloads: {id: figures}, host: figures}: one round of measurements."""

    def post(self, request: Request) -> Response:
        body = self.body()
        sampled = host_reports.record_samples(
            actor=self.actor,
            host=self.host,
            workloads=body.get("workloads") or {},
            host_sample=body.get("host") or {},
        )
        return Response({"sampled": sampled})


@extend_schema(exclude=True)
class HostNetworkRepairsView(HostAPIView):
    """POST {repaired, repaired_by_compartment}: what the agent restored in the host's network."""

    def post(self, request: Request) -> Response:
        body = self.body()
        return Response(
            host_reports.report_network_repairs(
                actor=self.actor,
                host=self.host,
                repaired=body.get("repaired") or [],
                repaired_by_compartment=body.get("repaired_by_compartment") or {},
            )
        )


@extend_schema(exclude=True)
class HostOperationView(HostAPIView):
    """POST {event, percent, message, result, error, detail}: an operation on this host's queue."""

    def post(self, request: Request, pk: str) -> Response:
        body = self.body()
        answer = host_reports.report_operation(
            actor=self.actor,
            host=self.host,
            op_id=pk,
            event=str(body.get("event", "")),
            percent=body.get("percent", 0),
            message=str(body.get("message", "")),
            result=body.get("result"),
            error=str(body.get("error", "")),
            detail=str(body.get("detail", "")),
            before=str(body.get("before", "")),
            spec=body.get("spec") is True,
            report=body.get("report"),
        )
        return Response({"operation": answer})


@extend_schema(exclude=True)
class HostSelfView(HostAPIView):
    """GET: the host's own profile (runtime, VM domain type, network realisation)."""

    def get(self, request: Request) -> Response:
        return Response(host_reports.host_profile(self.host))


@extend_schema(exclude=True)
class HostNetworkView(HostAPIView):
    """GET: the network state the host realises (only compartments with a member on it)."""

    def get(self, request: Request) -> Response:
        return Response(host_reports.network_state(self.host))


@extend_schema(exclude=True)
class HostOperationsView(HostAPIView):
    """GET: the operations running on this host's queue (the agent's start-up re-sync)."""

    def get(self, request: Request) -> Response:
        return Response(host_reports.running_operations(self.host))


@extend_schema(exclude=True)
class HostCommitLayerView(HostAPIView):
    """PUT ?operation=&digest=&size=: the layer a running commit of this workload made, streamed (kept
    only if it matches its digest and size and fits the tenant's image quota). Under daphne the body
    arrives as it is sent (`portal.asgi_threads.StreamedBody`): what the headers already refuse is
    answered before it is read."""

    def put(self, request: Request, pk: str) -> Response:
        raw = request._request  # the raw stream, read in chunks: a layer can be large
        chunks = iter(lambda: raw.read(1 << 20), b"")
        params = request.query_params
        length = request.META.get("CONTENT_LENGTH", "")
        return Response(
            host_reports.receive_commit_layer(
                actor=self.actor,
                host=self.host,
                workload_id=pk,
                op_id=params.get("operation", ""),
                digest=params.get("digest", ""),
                size=params.get("size", ""),
                chunks=chunks,
                declared_length=int(length) if length.isdigit() else None,
            )
        )


@extend_schema(exclude=True)
class HostCommitView(HostAPIView):
    """POST {operation, layer: {digest, diff_id, size, media_type}}: a commit of this workload is done."""

    def post(self, request: Request, pk: str) -> Response:
        body = self.body()
        return Response(
            host_reports.report_commit(
                actor=self.actor,
                host=self.host,
                workload_id=pk,
                op_id=body.get("operation", ""),
                layer=body.get("layer"),
            )
        )


# --- volumes, snapshots and backups on this host (issue 17; services in volumes/ and backups/) -------
MAX_CHUNK_BODY = 16 << 20  # a chunk's frame is at most ~4 MiB
MAX_MANIFEST_BODY = 256 << 20  # a manifest of a million files ~ 200 MiB


def _raw_body(request: Request, limit: int) -> bytes:
    # The raw stream: Django's `body` refuses anything over DATA_UPLOAD_MAX_MEMORY_SIZE.
    data: bytes = request._request.read(limit + 1)
    if len(data) > limit:
        from portal.errors import Invalid

        raise Invalid("Too large.")
    return data


def _fields(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: body[name] for name in names if name in body}


@extend_schema(exclude=True)
class HostVolumeOperationsView(HostAPIView):
    """GET: this host's running volume and backup operations (the agent finds those whose worker died)."""

    def get(self, request: Request) -> Response:
        from backups import host_reports as backup_reports

        return Response({"operations": backup_reports.volume_operations(self.host)})


@extend_schema(exclude=True)
class HostVolumeOperationView(HostAPIView):
    """GET: what the host needs to do one volume, snapshot or backup operation on its queue."""

    def get(self, request: Request, pk: str) -> Response:
        from backups import host_reports as backup_reports

        return Response(backup_reports.operation_work(self.host, pk))


@extend_schema(exclude=True)
class HostVolumeOperationResumeView(HostAPIView):
    """POST: the operation's worker died (its lock on the host is free): queue it again, or fail it."""

    def post(self, request: Request, pk: str) -> Response:
        from backups import host_reports as backup_reports

        return Response(backup_reports.resume_operation(actor=self.actor, host=self.host, op_id=pk))


@extend_schema(exclude=True)
class HostVolumeView(HostAPIView):
    """POST {event: ready | failed | usage | deleted, message, used_bytes}: a volume on this host."""

    def post(self, request: Request, pk: str) -> Response:
        from volumes import host_reports as volume_reports

        body = self.body()
        return Response(
            volume_reports.report_volume(
                actor=self.actor,
                host=self.host,
                volume_id=pk,
                event=body.get("event"),
                **_fields(body, "message", "used_bytes"),
            )
        )


@extend_schema(exclude=True)
class HostSnapshotView(HostAPIView):
    """POST {event: ready | failed | deleted, message, used_bytes}: a snapshot of a volume on this host."""

    def post(self, request: Request, pk: str) -> Response:
        from volumes import host_reports as volume_reports

        body = self.body()
        return Response(
            volume_reports.report_snapshot(
                actor=self.actor,
                host=self.host,
                snapshot_id=pk,
                event=body.get("event"),
                **_fields(body, "message", "used_bytes"),
            )
        )


@extend_schema(exclude=True)
class HostVolumePoolView(HostAPIView):
    """POST {pool: {total_bytes, used_bytes, free_bytes, embedded}}: the host's volume pool."""

    def post(self, request: Request) -> Response:
        from volumes import host_reports as volume_reports

        pool = self.body().get("pool")
        return Response(volume_reports.report_volume_pool(actor=self.actor, host=self.host, pool=pool))


@extend_schema(exclude=True)
class HostVolumeUsageView(HostAPIView):
    """POST {usage: {pool name: used bytes}}: the used bytes of this host's volumes."""

    def post(self, request: Request) -> Response:
        from volumes import host_reports as volume_reports

        usage = self.body().get("usage")
        recorded = volume_reports.report_volume_usage(actor=self.actor, host=self.host, usage=usage)
        return Response({"recorded": recorded})


@extend_schema(exclude=True)
class HostBackupView(HostAPIView):
    """POST {event: claim | finish | fail, result, message}: a backup of a volume on this host."""

    def post(self, request: Request, pk: str) -> Response:
        from backups import host_reports as backup_reports

        body = self.body()
        return Response(
            backup_reports.report_backup(
                actor=self.actor,
                host=self.host,
                backup_id=pk,
                event=body.get("event"),
                **_fields(body, "result", "message"),
            )
        )


@extend_schema(exclude=True)
class HostBackupMissingView(HostAPIView):
    """POST {manifest, chunks}: which the portal lacks, for a backup under way on this host."""

    def post(self, request: Request, pk: str) -> Response:
        from backups import host_reports as backup_reports

        body = self.body()
        return Response(
            backup_reports.backup_missing(
                actor=self.actor,
                host=self.host,
                backup_id=pk,
                manifest=body.get("manifest"),
                chunks=body.get("chunks"),
            )
        )


@extend_schema(exclude=True)
class HostBackupChunkView(HostAPIView):
    """PUT ?length=N: a chunk's zstd frame of a backup under way here (kept only if it matches its
    digest); GET: a chunk of the backup a restore on this host reads."""

    def put(self, request: Request, pk: str, digest: str) -> Response:
        from backups import host_reports as backup_reports

        added = backup_reports.put_backup_chunk(
            actor=self.actor,
            host=self.host,
            backup_id=pk,
            digest=digest,
            length=request.query_params.get("length"),
            data=_raw_body(request, MAX_CHUNK_BODY),
        )
        return Response({"added": added}, status=201 if added else 200)

    def get(self, request: Request, pk: str, digest: str) -> Any:
        from django.http import FileResponse

        from backups import host_reports as backup_reports

        path = backup_reports.backup_chunk_path(actor=self.actor, host=self.host, backup_id=pk, digest=digest)
        return FileResponse(open(path, "rb"), content_type="application/zstd")


@extend_schema(exclude=True)
class HostBackupManifestUploadView(HostAPIView):
    """PUT: the manifest of a backup under way here (validated, must hash to its name)."""

    def put(self, request: Request, pk: str, digest: str) -> Response:
        from backups import host_reports as backup_reports

        backup_reports.put_backup_manifest(
            actor=self.actor,
            host=self.host,
            backup_id=pk,
            manifest=digest,
            data=_raw_body(request, MAX_MANIFEST_BODY),
        )
        return Response({"stored": True}, status=201)


@extend_schema(exclude=True)
class HostBackupManifestView(HostAPIView):
    """GET: the manifest of the backup a restore on this host reads."""

    def get(self, request: Request, pk: str) -> Any:
        from django.http import HttpResponse

        from backups import host_reports as backup_reports

        data = backup_reports.backup_manifest(actor=self.actor, host=self.host, backup_id=pk)
        return HttpResponse(data, content_type="application/octet-stream")
