"""Reconciler cost for 100 tenants with nothing to do: one beat tick plus one run per tenant.

Each tenant has an applied revision of 5 workloads that all match (mode monitor, then autocorrect). A
round is what the beat does every interval: ``due_tenants`` (pick and push next_run_at) and one
``reconcile_tenant`` per tenant (claim, parse the revision with image checks, observe, drift, write
conditions, release). Baseline, side by side: the floor any reconciler pays to look at the state, one
``SELECT`` of each tenant's workload rows (no claim, no document, no status write).

Run: scripts/with-test-services.sh .venv/bin/python bench/bench_desired_reconcile.py   (PostgreSQL)
Prints one JSON line. Figures are medians of ``--repeat`` rounds, wall time in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

WORKLOADS = 5


def document() -> str:
    lines = ["apiVersion: bulkhead/v1", "kind: TenantConfig", "spec:", "  workloads:"]
    for n in range(WORKLOADS):
        lines += [
            f"    - name: w{n}",
            "      image: app:1",
            f'      command: [/bin/sleep, "{1000 + n}"]',
            "      memory_mib: 64",
            f"      env: {{INDEX: '{n}'}}",
        ]
    return "\n".join(lines) + "\n"


def seed(tenants: int) -> list[Any]:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from compute.desired import services
    from compute.desired.models import DesiredState
    from compute.models import Host, Workload
    from imaging.models import Image
    from tenants import services as tenant_services
    from tenants.actors import Actor
    from tenants.models import Quota, Tenant

    call_command("migrate", interactive=False, verbosity=0)
    user_model = get_user_model()
    operator = user_model.objects.filter(username="bench-op").first() or user_model.objects.create_user(
        "bench-op", password="bench-password-123", is_staff=True
    )
    actor = Actor(user=operator)
    Host.objects.get_or_create(
        name="bench-host", defaults={"cpus": 4096, "memory_mib": 1 << 30, "facts": {"oci_runtimes": ["runc"]}}
    )
    ids = list(Tenant.objects.filter(name__startswith="bench-").values_list("pk", flat=True))
    for index in range(len(ids), tenants):
        tenant = tenant_services.create_tenant(actor=actor, name=f"bench-{index}", owner=operator)
        Quota.objects.filter(tenant=tenant).update(workloads=100, vcpus=100, memory_mib=1 << 20)
        Image.objects.create(tenant=tenant, name="app", tag="1", manifest_digest="m", config_digest="c")
        revision, _ = services.save_revision(actor=actor, tenant=tenant, text=document())
        plan = services.create_plan(actor=actor, tenant=tenant, revision=revision)
        services.execute_plan(plan.pk)
        ids.append(tenant.pk)
    Workload.objects.update(state="running")
    DesiredState.objects.update(mode="monitor", next_run_at=None)
    return ids[:tenants]


def round_of_reconcile(ids: list[Any], now: Any) -> tuple[float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from compute.desired import reconciler
    from compute.desired.models import DesiredState

    DesiredState.objects.filter(tenant_id__in=ids).update(next_run_at=None)
    started = time.perf_counter()
    picked = reconciler.due_tenants(now=now)
    for tenant_id in picked:
        result = reconciler.reconcile_tenant(tenant_id, now=now)
        assert result["drift"] == [] and result["corrected"] == [], result
    elapsed = (time.perf_counter() - started) * 1000
    assert len(picked) == len(ids), (len(picked), len(ids))
    connection.queries_log.clear()  # a full log (DEBUG) makes the context count nothing
    with CaptureQueriesContext(connection) as queries:
        reconciler.reconcile_tenant(ids[0], now=now)
    return elapsed, len(queries)


def round_of_floor(ids: list[Any]) -> float:
    from compute.models import Workload

    started = time.perf_counter()
    for tenant_id in ids:
        list(Workload.objects.filter(tenant_id=tenant_id).values_list("name", "state", "managed_spec_hash"))
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    ids = seed(args.tenants)

    from django.db import connection
    from django.utils import timezone

    from compute.desired import services
    from compute.desired.models import DesiredState

    now = timezone.now()
    monitor = []
    query_counts = []
    cpu = []
    for _ in range(args.repeat):
        cpu_start = time.process_time()
        elapsed, queries = round_of_reconcile(ids, now)
        cpu.append((time.process_time() - cpu_start) * 1000)
        monitor.append(elapsed)
        query_counts.append(queries)
    DesiredState.objects.update(mode="autocorrect")
    autocorrect = [round_of_reconcile(ids, now)[0] for _ in range(args.repeat)]
    floor = [round_of_floor(ids) for _ in range(args.repeat)]
    from compute.desired.models import DesiredRevision

    revision = DesiredRevision.objects.filter(tenant_id=ids[0]).first()
    assert revision is not None
    parse = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        for tenant_id in ids:
            services.parse_for_tenant(tenant_id, revision.text)
        parse.append((time.perf_counter() - started) * 1000)

    median = statistics.median
    print(
        json.dumps(
            {
                "bench": "desired_reconcile",
                "database": connection.vendor,
                "tenants": len(ids),
                "workloads_per_tenant": WORKLOADS,
                "round_monitor_ms": round(median(monitor), 1),
                "round_monitor_cpu_ms": round(median(cpu), 1),
                "round_autocorrect_ms": round(median(autocorrect), 1),
                "per_tenant_ms": round(median(monitor) / len(ids), 2),
                "queries_per_tenant_run": median(query_counts),
                "parse_with_image_checks_ms": round(median(parse), 1),
                "baseline": "one SELECT of each tenant's workload rows (the floor of looking)",
                "baseline_floor_ms": round(median(floor), 1),
                "ratio_round_vs_floor": round(median(monitor) / median(floor), 1),
                "share_of_30s_interval_pct": round(100 * median(monitor) / 30000, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
