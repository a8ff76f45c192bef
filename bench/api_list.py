"""p50/p99 of `GET /api/v1/audit/?page_size=50` with a filter, 100,000 audit entries in PostgreSQL,
through the real ASGI server (daphne), side by side with the baseline: the same page fetched by plain SQL
(psycopg, no HTTP, no Django), which is the floor any API on this database pays.

Run: scripts/with-test-services.sh .venv/bin/python bench/api_list.py   (needs DATABASE_URL on PostgreSQL)
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from harness import free_port, percentile  # noqa: E402

ENTRIES = int(os.environ.get("BENCH_ENTRIES", "100000"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "400"))


def seed() -> tuple[str, str]:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from tenants import services
    from tenants.actors import Actor
    from tenants.models import AuditEntry, Tenant

    call_command("migrate", interactive=False, verbosity=0)
    User = get_user_model()
    operator = User.objects.filter(username="bench-op").first() or User.objects.create_user(
        "bench-op", password="bench-password-123", is_staff=True
    )
    owner = User.objects.filter(username="bench-owner").first() or User.objects.create_user(
        "bench-owner", password="bench-password-123"
    )
    actor = Actor(user=operator)
    tenants = list(Tenant.objects.filter(name__startswith="bench-"))
    if not tenants:
        tenants = [services.create_tenant(actor=actor, name=f"bench-{i}", owner=owner) for i in range(20)]
    have = AuditEntry.objects.count()
    actions = ["workload.create", "workload.start", "workload.stop", "image.import", "token.create"]
    rng = random.Random(7)
    batch = []
    for i in range(max(0, ENTRIES - have)):
        batch.append(
            AuditEntry(
                actor=owner,
                actor_label="bench-owner",
                tenant=rng.choice(tenants),
                action=rng.choice(actions),
                object_type="workload",
                object_id=str(i),
                outcome=rng.choice(["ok", "ok", "ok", "denied"]),
                request_id=f"{i:032x}",
                source_address="127.0.0.1",
                details={"i": i},
            )
        )
        if len(batch) == 5000:
            AuditEntry.objects.bulk_create(batch)
            batch.clear()
    AuditEntry.objects.bulk_create(batch)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tenants_auditentry")
    _token, secret = services.create_token(actor=Actor(user=owner), name="bench")
    return secret, str(tenants[0].pk)


def main() -> None:
    secret, tenant_id = seed()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BULKHEAD_DEBUG": "false", "BULKHEAD_LOG_LEVEL": "WARNING"},
    )
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)

    url = f"http://127.0.0.1:{port}/api/v1/audit/"
    params = {"page_size": "50", "action": "workload.start", "tenant": tenant_id}
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get(url, params=params).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            api: list[float] = []
            for i in range(REQUESTS):
                page = 1 + i % 5
                t0 = time.perf_counter()
                response = client.get(url, params={**params, "page": str(page)})
                api.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 200 and len(response.json()["results"]) == 50
    finally:
        server.terminate()
        server.wait()

    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    sql: list[float] = []
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], password=db["PASSWORD"] or None, dbname=db["NAME"]
    ) as conn:
        for i in range(REQUESTS):
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM tenants_auditentry WHERE action = %s AND tenant_id = %s",
                    ("workload.start", tenant_id),
                )
                cur.fetchone()
                cur.execute(
                    "SELECT * FROM tenants_auditentry WHERE action = %s AND tenant_id = %s "
                    "ORDER BY time DESC, id DESC LIMIT 50 OFFSET %s",
                    ("workload.start", tenant_id, 50 * (i % 5)),
                )
                cur.fetchall()
            sql.append((time.perf_counter() - t0) * 1000)

    result = {
        "bench": "api_list",
        "entries": ENTRIES,
        "requests": REQUESTS,
        "api_p50_ms": round(statistics.median(api), 2),
        "api_p99_ms": round(percentile(api, 99), 2),
        "baseline": "plain SQL via psycopg (count + page), no HTTP",
        "sql_p50_ms": round(statistics.median(sql), 2),
        "sql_p99_ms": round(percentile(sql, 99), 2),
        "ratio_p50_api_over_sql": round(statistics.median(api) / statistics.median(sql), 2),
        "goal_p99_ms": 100,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
