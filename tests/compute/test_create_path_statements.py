"""The create path's writes as few statements as their meaning needs: a host's state report is one
`UPDATE … RETURNING`, a quota reservation does not read its locked row back, and the cache objects Django
makes per request share their Redis connections."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from compute import host_reports, hosts, services
from compute.models import Host, Workload
from portal.cache import SharedPoolRedisCache
from tenants import quota
from tenants.actors import Actor
from tenants.models import Quota
from tests.conftest import World
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def placed(world: World, name: str) -> tuple[Host, Workload]:
    facts = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100, "oci_runtimes": ["runc"]}
    host = hosts.register_host(actor=Actor.system("test"), name=f"bht-stmt-{name}", facts=facts)
    services.create_workload(
        actor=Actor(user=world.user("oscar")),
        tenant=world.acme,
        spec=services.WorkloadSpec(name=name, image=db_image(world.acme, f"img-{name}"), host=host),
        compartments=[],
    )
    return host, Workload.objects.get(tenant=world.acme, name=name)


def report(host: Host, workload: Workload, expected: list[str], **options: Any) -> dict[str, Any]:
    return host_reports.report_workload_state(
        actor=host_reports.host_actor(host),
        host=host,
        workload_id=str(workload.pk),
        expected=expected,
        changes=options.pop("changes", {}),
        **options,
    )


def test_it_records_a_hosts_state_report_in_one_statement(world: World) -> None:
    host, workload = placed(world, "one-statement")
    with CaptureQueriesContext(connection) as queries:
        answer = report(host, workload, ["pending"], changes={"state": "running", "started_at": "now"})
    assert len(queries) == 1, [q["sql"] for q in queries]
    workload.refresh_from_db()
    assert answer["applied"] is True
    assert (answer["state"], workload.state) == ("running", "running")
    assert answer["started_at"] == workload.started_at.isoformat()


def test_it_answers_an_overtaken_report_with_the_row_as_it_is(world: World) -> None:
    host, workload = placed(world, "overtaken")
    answer = report(host, workload, ["creating"], changes={"state": "running", "started_at": "now"})
    assert answer["applied"] is False
    assert answer["state"] == "pending" and answer["started_at"] is None


def test_it_counts_a_restart_and_answers_the_new_count(world: World) -> None:
    host, workload = placed(world, "restarts")
    Workload.objects.filter(pk=workload.pk).update(state="stopped")
    first = report(host, workload, ["stopped"], count_restart=True)
    second = report(host, workload, ["stopped"], count_restart=True)
    workload.refresh_from_db()
    assert (first["restart_count"], second["restart_count"], workload.restart_count) == (1, 2, 2)


def test_it_reserves_quota_without_reading_the_locked_row_back(world: World) -> None:
    before = Quota.objects.get(tenant=world.acme)
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        reserved = quota.allocate(world.acme, workloads=1, memory_mib=256)
    stored = Quota.objects.get(tenant=world.acme)
    # The lock (SELECT … FOR UPDATE) and the increment: no third statement reading it back.
    assert len(queries) == 2, [q["sql"] for q in queries]
    assert (
        (reserved.used_workloads, reserved.used_memory_mib)
        == (
            stored.used_workloads,
            stored.used_memory_mib,
        )
        == (before.used_workloads + 1, before.used_memory_mib + 256)
    )


def test_it_shares_one_redis_connection_between_the_cache_objects_of_requests() -> None:
    location = settings.CACHES["default"]["LOCATION"]
    server = redis.Redis.from_url(location)

    def connections_received() -> int:
        return int(server.info("stats")["total_connections_received"])

    params = {"OPTIONS": settings.CACHES["default"].get("OPTIONS", {}), "KEY_PREFIX": "bht-stmt"}
    # Django makes a cache object per thread and per async context: under ASGI, one per request.
    SharedPoolRedisCache(location, params).get("warm")
    before = connections_received()
    kept = []
    for _ in range(5):
        cache = SharedPoolRedisCache(location, params)
        cache.get("absent")
        kept.append(cache)
    assert connections_received() - before == 0


def test_it_reads_the_image_once_to_create_a_workload(world: World) -> None:
    facts = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100, "oci_runtimes": ["runc"]}
    host = hosts.register_host(actor=Actor.system("test"), name="bht-stmt-image", facts=facts)
    image = db_image(world.acme, "img-once")
    with CaptureQueriesContext(connection) as queries:
        services.create_workload(
            actor=Actor(user=world.user("oscar")),
            tenant=world.acme,
            spec=services.WorkloadSpec(name="image-once", image=image, host=host),
            compartments=[],
        )
    reads = [q["sql"] for q in queries if q["sql"].startswith("SELECT")]
    image_reads = [sql for sql in reads if 'FROM "imaging_image"' in sql]
    assert len(image_reads) == 1, image_reads
