"""`GET /metrics`: Prometheus exposition of what runs, behind a token.

Workload figures come from the latest sample each host agent recorded (`compute.sampling`), so a scrape
reads a few rows and never asks a host. What a caller sees follows the permission layer: an operator's
unscoped token sees every series (hosts and the portal's own included); any other token or session sees
the series of the tenants it may view, a tenant-scoped token those of its one tenant.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.db.models import Count, F, Q
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from rest_framework.request import Request
from rest_framework.views import APIView

from portal.models import FINISHED_STATES, MetricSeries, Operation
from portal.permissions import active_token

# Operation durations (seconds): an operation is anything from a 30 ms start to an image import.
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
QUOTA_RESOURCES = ("vcpus", "memory_mib", "workloads", "compartments", "image_bytes", "published_ports")


def is_operator(user: Any) -> bool:
    """Staff, acting with the whole installation in view (not through a token scoped to one tenant)."""
    token = active_token(user)
    return bool(user.is_staff) and (token is None or token.tenant_id is None)


def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=labels)


class PortalCollector:
    def __init__(self, user: Any) -> None:
        self.user = user

    def collect(self) -> Iterator[Metric]:
        yield from self._workloads()
        yield from self._tenants()
        if is_operator(self.user):
            yield from self._hosts()
            yield from self._portal()

    def _workloads(self) -> Iterator[Metric]:
        from compute.models import Workload

        labels = ["workload", "name", "tenant", "isolation", "host"]
        state = gauge("bulkhead_workload_state", "1 for the workload's current state", [*labels, "state"])
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "cpu_seconds": counter("bulkhead_workload_cpu_seconds", "CPU time used", labels),
            "memory_bytes": gauge("bulkhead_workload_memory_bytes", "Memory in use", labels),
            "net_rx_bytes": counter("bulkhead_workload_network_receive_bytes", "Bytes received", labels),
            "net_tx_bytes": counter("bulkhead_workload_network_transmit_bytes", "Bytes sent", labels),
            "block_read_bytes": counter("bulkhead_workload_block_read_bytes", "Bytes read from disk", labels),
            "block_write_bytes": counter(
                "bulkhead_workload_block_write_bytes", "Bytes written to disk", labels
            ),
        }
        rows = Workload.objects.for_user(self.user).values_list(
            "id", "name", "tenant__name", "isolation", "host__name", "state"
        )
        workloads = {str(row[0]): row for row in rows}
        latest = dict(
            MetricSeries.objects.filter(kind="workload", object_id__in=list(workloads)).values_list(
                "object_id", "latest"
            )
        )
        for workload_id, (_pk, name, tenant, isolation, host, current) in workloads.items():
            values = [workload_id, name, tenant, isolation, host or ""]
            state.add_metric([*values, current], 1)
            sample = latest.get(workload_id) or {}
            if current != "running":
                continue
            for source, family in families.items():
                value = sample.get(source)
                if isinstance(value, int | float):
                    family.add_metric(values, value)
        yield state
        yield from families.values()

    def _tenants(self) -> Iterator[Metric]:
        from tenants.models import Quota

        limit = gauge("bulkhead_tenant_quota_limit", "Quota limit", ["tenant", "resource"])
        used = gauge("bulkhead_tenant_quota_used", "Quota in use", ["tenant", "resource"])
        for quota in Quota.objects.for_user(self.user).select_related("tenant"):
            for resource in QUOTA_RESOURCES:
                limit.add_metric([quota.tenant.name, resource], float(getattr(quota, resource)))
                used.add_metric([quota.tenant.name, resource], float(getattr(quota, f"used_{resource}")))
        yield limit
        yield used

    def _hosts(self) -> Iterator[Metric]:
        from compute.models import Host, Workload

        labels = ["host"]
        vcpus = gauge("bulkhead_host_vcpus_capacity", "vCPUs workloads may be given", labels)
        memory = gauge("bulkhead_host_memory_capacity_bytes", "Memory workloads may be given", labels)
        allocated_vcpus = gauge("bulkhead_host_vcpus_allocated", "vCPUs given to workloads", labels)
        allocated_memory = gauge("bulkhead_host_memory_allocated_bytes", "Memory given to workloads", labels)
        used_memory = gauge("bulkhead_host_memory_used_bytes", "Memory in use on the machine", labels)
        cpu = counter("bulkhead_host_cpu_seconds", "CPU time the machine was busy", labels)
        by_state = gauge("bulkhead_host_workloads", "Workloads by state", ["host", "state"])
        lag = gauge("bulkhead_host_heartbeat_age_seconds", "Seconds since the agent's last heartbeat", labels)
        up = gauge("bulkhead_host_up", "1 when the host is ready", ["host", "state"])
        hosts = list(Host.objects.all())
        latest = dict(MetricSeries.objects.filter(kind="host").values_list("object_id", "latest"))
        counts = Workload.objects.exclude(host=None).values("host__name", "state").annotate(n=Count("pk"))
        now = timezone.now()
        for host in hosts:
            name = [host.name]
            vcpus.add_metric(name, float(host.vcpu_capacity))
            memory.add_metric(name, host.memory_capacity_mib * 1024 * 1024)
            up.add_metric([host.name, host.state], 1 if host.state == "ready" else 0)
            if host.last_heartbeat is not None:
                lag.add_metric(name, (now - host.last_heartbeat).total_seconds())
            sample = latest.get(str(host.pk)) or {}
            for family, source in (
                (allocated_vcpus, "allocated_vcpus"),
                (allocated_memory, "allocated_memory_bytes"),
                (used_memory, "memory_used_bytes"),
                (cpu, "cpu_seconds"),
            ):
                if isinstance(sample.get(source), int | float):
                    family.add_metric(name, sample[source])
        for row in counts:
            by_state.add_metric([row["host__name"], row["state"]], row["n"])
        yield from (vcpus, memory, allocated_vcpus, allocated_memory, used_memory, cpu, by_state, lag, up)

    def _portal(self) -> Iterator[Metric]:
        operations = gauge("bulkhead_operations", "Operations by kind and state", ["kind", "state"])
        for row in Operation.objects.values("kind", "state").annotate(n=Count("pk")).order_by():
            operations.add_metric([row["kind"], row["state"]], row["n"])
        yield operations
        yield self._durations()
        depth = gauge("bulkhead_queue_depth", "Tasks waiting in a broker queue", ["queue"])
        for queue, length in _queue_depths():
            depth.add_metric([queue], length)
        yield depth

    def _durations(self) -> Metric:
        """One histogram of how long finished operations took, counted in a single query."""
        finished = Q(state__in=FINISHED_STATES, started_at__isnull=False, finished_at__isnull=False)
        aggregates: dict[str, Any] = {
            f"le_{i}": Count(
                "pk", filter=finished & Q(finished_at__lte=F("started_at") + timedelta(seconds=b))
            )
            for i, b in enumerate(DURATION_BUCKETS)
        }
        aggregates["count"] = Count("pk", filter=finished)
        counts = Operation.objects.aggregate(**aggregates)
        buckets = [(str(b), counts[f"le_{i}"]) for i, b in enumerate(DURATION_BUCKETS)]
        buckets.append(("+Inf", counts["count"]))
        histogram = HistogramMetricFamily(
            "bulkhead_operation_duration_seconds", "How long finished operations took"
        )
        histogram.add_metric([], buckets, sum_value=_duration_sum())
        return histogram


def _duration_sum() -> float:
    from django.db.models import DurationField, ExpressionWrapper, Sum

    span = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    total = Operation.objects.filter(
        state__in=FINISHED_STATES, started_at__isnull=False, finished_at__isnull=False
    ).aggregate(total=Sum(span))["total"]
    return total.total_seconds() if total else 0.0


def _queue_depths() -> Iterator[tuple[str, int]]:
    """Celery's Redis transport keeps each queue as a list named after it."""
    import redis
    from django.conf import settings

    from compute.host.broker import host_id_of_queue, key_prefix
    from compute.models import Host

    queues = ["default", *(host.queue for host in Host.objects.only("id"))]
    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=2)
        with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                host_id = host_id_of_queue(queue)
                # A host's queue lives under its own key prefix (compute.host.broker).
                pipe.llen(queue if host_id is None else key_prefix(host_id) + queue)
            lengths = pipe.execute()
    except redis.exceptions.RedisError:
        return
    yield from zip(queues, lengths, strict=True)


class MetricsView(APIView):
    """Prometheus text format. Scrape with `authorization: {credentials: <API token>}`."""

    @extend_schema(exclude=True)  # not JSON: Prometheus' text format, outside the API's schema
    def get(self, request: Request) -> HttpResponse:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PortalCollector(request.user))  # type: ignore[arg-type]
        return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
