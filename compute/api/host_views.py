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
