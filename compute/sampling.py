"""Sampling, the portal's side: the host agent measures its workloads and itself every
BULKHEAD_SAMPLE_SECONDS (`compute.host.sampling`) and reports them through the host API; here they are
recorded.

Each sample updates one `MetricSeries` row per object: the latest raw counters (what `/metrics` serves,
so a scrape reads rows and never asks a host) and a fixed-size round-robin history (portal/rrd.py, what
the pages plot). Tenant series are the sum of their workloads, recorded by the portal's beat.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from portal.models import MetricSeries
from portal.rrd import RANGES, Archive

log = logging.getLogger(__name__)

WORKLOAD_SOURCES = (
    "cpu_seconds", "memory_bytes", "net_rx_bytes", "net_tx_bytes", "block_read_bytes", "block_write_bytes",
)  # fmt: skip
HOST_SOURCES = (
    "cpu_seconds", "memory_used_bytes", "allocated_vcpus", "allocated_memory_bytes", "workloads_running",
)  # fmt: skip
# A tenant's CPU is a gauge (cores busy, the sum of its workloads' rates): a sum of per-workload counters
# would jump whenever one of them starts or stops.
TENANT_SOURCES = ("cpu_cores", "memory_bytes", "workloads_running", "vcpus_used", "memory_mib_used")
COUNTERS = frozenset({"cpu_seconds", "net_rx_bytes", "net_tx_bytes", "block_read_bytes", "block_write_bytes"})
SOURCES_BY_KIND = {"workload": WORKLOAD_SOURCES, "host": HOST_SOURCES, "tenant": TENANT_SOURCES}


def archive_of(series: MetricSeries) -> Archive:
    sources = SOURCES_BY_KIND[series.kind]
    return Archive(sources, COUNTERS, header=series.header or {}, rings=bytearray(bytes(series.rings or b"")))


def record(kind: str, object_id: Any, tenant_id: Any, raw: dict[str, Any], timestamp: float) -> None:
    """Add one sample to the series of an object (created on first use). One writer per series."""
    record_many([(kind, object_id, tenant_id, raw)], timestamp)


def record_many(samples: list[tuple[str, Any, Any, dict[str, Any]]], timestamp: float) -> None:
    """Add one sample to each of several series: one query to read them, one to write them back."""
    if not samples:
        return
    keys = [f"{kind}:{object_id}" for kind, object_id, _tenant, _raw in samples]
    existing = {series.key: series for series in MetricSeries.objects.filter(key__in=keys)}
    now = timezone.now()
    created: list[MetricSeries] = []
    updated: list[MetricSeries] = []
    for key, (kind, object_id, tenant_id, raw) in zip(keys, samples, strict=True):
        series = existing.get(key)
        if series is None:
            series = MetricSeries(key=key, kind=kind, object_id=str(object_id), tenant_id=tenant_id)
            created.append(series)
        else:
            updated.append(series)
        history = archive_of(series)
        history.add(timestamp, {name: _number(raw.get(name)) for name in history.sources})
        latest = {name: raw.get(name) for name in history.sources}
        current = history.header["tiers"][0]
        for index, name in enumerate(history.sources):
            if name in COUNTERS and current["count"][index]:
                latest[f"{name}_rate"] = current["sum"][index] / current["count"][index]
        series.header = history.header
        series.rings = bytes(history.rings)
        series.latest = latest
        series.sampled_at = now
    with transaction.atomic():
        MetricSeries.objects.bulk_create(created, ignore_conflicts=True)
        _write_back(updated)


def _write_back(rows: list[MetricSeries]) -> None:
    """UPDATE the sampled fields of many series as one batch of one prepared statement.

    (Django's bulk_update builds a CASE expression per field and row: most of a round's CPU with 200
    workloads.) Only the model's own table and column names are formatted in; values are parameters."""
    if not rows:
        return
    meta = MetricSeries._meta
    quote = connection.ops.quote_name
    fields: list[Any] = [meta.get_field(name) for name in ("header", "rings", "latest", "sampled_at")]
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    params = [
        [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields] + [row.pk]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def history(kind: str, object_id: Any, range_name: str) -> dict[str, Any]:
    """The plotted history of one object: slot times (Unix seconds) and a list per figure; counters as
    per-second rates. Empty lists when nothing was sampled yet. The caller has checked permission."""
    if range_name not in RANGES:
        raise ValueError(f"range must be one of {', '.join(RANGES)}")
    series = MetricSeries.objects.filter(key=f"{kind}:{object_id}").first()
    archive = Archive(SOURCES_BY_KIND[kind], COUNTERS) if series is None else archive_of(series)
    return {"range": range_name, **archive.series(range_name)}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float | Decimal) else None


def sample_tenants(now: float | None = None) -> int:
    """Each tenant's series: the sum of its workloads' latest samples and its quota use (the beat)."""
    from tenants.models import Quota

    timestamp = now if now is not None else time.time()
    totals: dict[Any, dict[str, float]] = {}
    fresh = time.time() - 120  # a workload sampled more than two minutes ago is not running any more
    for tenant_id, latest, sampled_at in MetricSeries.objects.filter(kind="workload").values_list(
        "tenant_id", "latest", "sampled_at"
    ):
        if sampled_at is None or sampled_at.timestamp() < fresh:
            continue
        total = totals.setdefault(tenant_id, {"cpu_cores": 0.0, "memory_bytes": 0.0, "workloads_running": 0})
        total["cpu_cores"] += float(latest.get("cpu_seconds_rate") or 0)
        total["memory_bytes"] += float(latest.get("memory_bytes") or 0)
        total["workloads_running"] += 1
    recorded = 0
    for quota in Quota.objects.all():
        raw: dict[str, Any] = dict(totals.get(quota.tenant_id, {"workloads_running": 0}))
        raw["vcpus_used"] = float(quota.used_vcpus)
        raw["memory_mib_used"] = quota.used_memory_mib
        with transaction.atomic():
            record("tenant", quota.tenant_id, quota.tenant_id, raw, timestamp)
        recorded += 1
    return recorded
