"""Metrics and history (issue 20): three figures, each beside a named baseline in the same run.

1. Scrape: `GET /metrics` with 1,000 running workloads in two tenants (an operator's token, every series)
   through daphne, p50/p95/p99, beside the floor: the same rows read by plain SQL (psycopg, no HTTP).
   Goal: p95 under 250 ms.
2. History size: bytes of one series after one sample, one day and 30 simulated days of 10 s samples
   (must be equal: round-robin), beside what a plain append-only log of the same samples would hold.
3. Sampling cost: CPU time the host agent spends per sampling round with N real runc containers
   (default 200), as a share of one core at the 10 s interval; beside the cost of only reading the
   containers' cgroup counters (what any monitor pays). Goal: under 2 % of one core.

Run as root: scripts/with-test-services.sh .venv/bin/python bench/bench_metrics.py [--containers 200]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from harness import free_port, percentile  # noqa: E402


def seed(workloads: int) -> str:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from compute import sampling
    from compute.models import Host, Workload
    from imaging.models import Image
    from tenants import services
    from tenants.actors import Actor
    from tenants.models import Tenant

    call_command("migrate", interactive=False, verbosity=0)
    user_model = get_user_model()
    operator = user_model.objects.filter(username="bench-op").first() or user_model.objects.create_user(
        "bench-op", password="bench-password-123", is_staff=True
    )
    actor = Actor(user=operator)
    tenants = list(Tenant.objects.filter(name__in=["bench-metrics-a", "bench-metrics-b"]))
    if not tenants:
        tenants = [
            services.create_tenant(actor=actor, name=n) for n in ("bench-metrics-a", "bench-metrics-b")
        ]
    host = Host.objects.get_or_create(name="bench-metrics-host", defaults={"cpus": 64, "memory_mib": 262144})[
        0
    ]
    have = Workload.objects.filter(host=host).count()
    now = time.time()
    for i in range(have, workloads):
        tenant = tenants[i % 2]
        image = Image.objects.get_or_create(
            tenant=tenant, name="bench", tag="1", defaults={"manifest_digest": "sha256:" + "0" * 64}
        )[0]
        workload = Workload.objects.create(
            tenant=tenant, name=f"w{i:04d}", image=image, host=host, state="running", memory_mib=64
        )
        for step in range(3):
            raw = {"cpu_seconds": 1.5 * step, "memory_bytes": 10_000_000 + i, "net_rx_bytes": 1000 * step}
            sampling.record("workload", workload.pk, tenant.pk, raw, now - 30 + 10 * step)
    _token, secret = services.create_token(actor=actor, name=f"bench-{uuid.uuid4().hex[:6]}")
    return secret


def scrape(secret: str, requests: int) -> dict[str, float]:
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BULKHEAD_DEBUG": "false", "BULKHEAD_LOG_LEVEL": "WARNING"},
    )
    timings: list[float] = []
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/metrics").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("daphne did not start")
                time.sleep(0.2)
            for _ in range(requests):
                started = time.perf_counter()
                response = client.get(f"http://127.0.0.1:{port}/metrics")
                timings.append((time.perf_counter() - started) * 1000)
                assert (
                    response.status_code == 200 and b"bulkhead_workload_cpu_seconds_total" in response.content
                )
            lines = response.text.count("\n")
    finally:
        server.terminate()
        server.wait()

    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    floor: list[float] = []
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], password=db["PASSWORD"] or None, dbname=db["NAME"]
    ) as conn:
        for _ in range(requests):
            started = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT w.id, w.name, t.name, w.isolation, h.name, w.state, s.latest "
                    "FROM compute_workload w JOIN tenants_tenant t ON t.id = w.tenant_id "
                    "LEFT JOIN compute_host h ON h.id = w.host_id "
                    "LEFT JOIN portal_metricseries s ON s.kind = 'workload' AND s.object_id = w.id::text"
                )
                cur.fetchall()
            floor.append((time.perf_counter() - started) * 1000)
    return {
        "scrape_p50_ms": round(statistics.median(timings), 1),
        "scrape_p95_ms": round(percentile(timings, 95), 1),
        "scrape_p99_ms": round(percentile(timings, 99), 1),
        "scrape_lines": lines,
        "floor_sql_p50_ms": round(statistics.median(floor), 2),
        "ratio_p50_scrape_over_sql": round(statistics.median(timings) / statistics.median(floor), 1),
    }


def history_bytes() -> dict[str, int]:
    from compute.sampling import COUNTERS, WORKLOAD_SOURCES
    from portal.rrd import Archive

    archive = Archive(WORKLOAD_SOURCES, COUNTERS)
    start = 1_800_000_000.0
    sizes: dict[int, int] = {}
    headers: dict[int, int] = {}
    samples = 30 * 24 * 360
    for i in range(samples):
        archive.add(start + 10 * i, {name: float(i) for name in WORKLOAD_SOURCES})
        if i in (0, 24 * 360 - 1, samples - 1):
            sizes[i] = len(archive.rings)
            headers[i] = len(json.dumps(archive.header))
    # An append-only log of the same samples: a timestamp and six float64 per sample.
    log_bytes = samples * (8 + 8 * len(WORKLOAD_SOURCES))
    return {
        "history_ring_bytes_after_1_sample": sizes[0],
        "history_ring_bytes_after_1_day": sizes[24 * 360 - 1],
        "history_ring_bytes_after_30_days": sizes[samples - 1],
        "history_header_json_bytes_after_1_sample": headers[0],
        "history_header_json_bytes_after_30_days": headers[samples - 1],
        "append_only_log_bytes_after_30_days": log_bytes,
    }


def sampling_cost(containers: int, rounds: int) -> dict[str, float]:
    from compute.host.context import host_context
    from compute.host.rpc import PlacedWorkloads
    from compute.hosts import register_host
    from compute.management.commands.agent import sample_host
    from compute.models import Host, Workload
    from compute.runtimes.oci import ContainerSpec
    from imaging.models import Image
    from tenants.actors import Actor
    from tenants.models import Tenant
    from tests.compute.rootfs import build_busybox_rootfs
    from tests.compute.runtimes import oci_runtime

    scratch = Path(tempfile.mkdtemp(prefix="bht-bench-metrics-"))
    image_dir = build_busybox_rootfs(scratch / "image")
    host = Host.objects.filter(name="bench-sampling").first() or register_host(
        actor=Actor.system("bench"), name="bench-sampling", facts={"oci_runtimes": ["runc"], "cpus": 2}
    )
    runtime = oci_runtime(host)
    tenant = Tenant.objects.get(name="bench-metrics-a")
    image = Image.objects.get(tenant=tenant, name="bench", tag="1")
    rows = [
        Workload.objects.create(
            tenant=tenant,
            name=f"s{uuid.uuid4().hex[:8]}",
            image=image,
            host=host,
            state="running",
            memory_mib=16,
        )
        for _ in range(containers)
    ]

    def start(workload: Workload) -> None:
        runtime.run(
            ContainerSpec(
                container_id=workload.runtime_id,
                lower_dirs=[str(image_dir)],
                args=["sleep", "600"],
                memory_mib=16,
                vcpus=0.1,
                pids_limit=8,
            )
        )

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(start, rows))
        ctx = host_context(host.pk)
        placed = PlacedWorkloads(ctx.link)
        sample_host(ctx, placed)  # creates the series rows: the first round is not a steady state
        ours: list[float] = []
        floor: list[float] = []
        for _ in range(rounds):
            started = time.process_time()
            sampled = sample_host(ctx, placed)
            ours.append(time.process_time() - started)
            assert sampled == containers, sampled
            started = time.process_time()
            for workload in rows:
                runtime.stats(workload.runtime_id)
            floor.append(time.process_time() - started)
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda w: runtime.delete(w.runtime_id), rows))
        Workload.objects.filter(pk__in=[w.pk for w in rows]).delete()
    interval = 10.0
    return {
        "sampling_containers": containers,
        "sampling_round_cpu_ms": round(statistics.median(ours) * 1000, 1),
        "sampling_share_of_one_core_pct": round(100 * statistics.median(ours) / interval, 2),
        "baseline": "reading the same cgroup counters only",
        "cgroup_read_round_cpu_ms": round(statistics.median(floor) * 1000, 1),
        "ratio_sampling_over_cgroup_read": round(statistics.median(ours) / statistics.median(floor), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workloads", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    secret = seed(options.workloads)
    figures: dict[str, object] = {"benchmark": "metrics", "load_average_1m": round(os.getloadavg()[0], 2)}
    figures.update(scrape(secret, options.requests))
    figures["goal_scrape_p95_ms"] = 250
    figures.update(history_bytes())
    if options.containers:
        figures.update(sampling_cost(options.containers, options.rounds))
        figures["goal_sampling_share_pct"] = 2
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
