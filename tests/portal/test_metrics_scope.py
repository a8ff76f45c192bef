"""/metrics and the history API show each caller only what the permission layer lets it see."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from compute import sampling
from compute.models import Host, Workload
from tenants import services
from tenants.actors import Actor
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def running_workload(world: World, tenant: Any, name: str) -> Workload:
    host = Host.objects.get_or_create(name="metrics-host", defaults={"cpus": 4, "memory_mib": 8192})[0]
    image = db_image(tenant, f"img-{uuid.uuid4().hex[:6]}")
    workload = Workload.objects.create(tenant=tenant, name=name, image=image, host=host, state="running")
    now = time.time()
    for i in range(3):
        raw = {"cpu_seconds": 2.0 * i, "memory_bytes": 1000 + i, "net_rx_bytes": 10 * i}
        sampling.record("workload", workload.pk, tenant.pk, raw, now - 20 + 10 * i)
    sampling.record("host", host.pk, None, {"cpu_seconds": 5.0, "memory_used_bytes": 123}, now)
    return workload


def scrape(client: Any) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def test_it_refuses_an_anonymous_scrape(world: World) -> None:
    assert client_for(world, "anonymous").get("/metrics").status_code in (401, 403)


def test_it_shows_a_tenant_token_only_its_tenants_series(world: World) -> None:
    mine = running_workload(world, world.acme, "acme-web")
    theirs = running_workload(world, world.globex, "globex-db")
    text = scrape(client_for(world, "alice_acme"))
    assert f'workload="{mine.pk}"' in text
    assert (
        'bulkhead_workload_cpu_seconds_total{host="metrics-host",isolation="namespace",name="acme-web"'
        in text
    )
    assert str(theirs.pk) not in text and "globex" not in text
    assert "bulkhead_host_" not in text and "bulkhead_operations" not in text
    text = scrape(client_for(world, "bob"))
    assert str(theirs.pk) in text and str(mine.pk) not in text and "acme" not in text


def test_it_shows_an_operator_token_scoped_to_a_tenant_only_that_tenant(world: World) -> None:
    mine = running_workload(world, world.acme, "acme-web")
    theirs = running_workload(world, world.globex, "globex-db")
    _token, secret = services.create_token(
        actor=Actor(user=world.user("oscar")), name="scoped", tenant=world.acme
    )
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    text = scrape(client)
    assert str(mine.pk) in text and str(theirs.pk) not in text
    assert "bulkhead_host_" not in text and "bulkhead_queue_depth" not in text


def test_it_shows_an_operator_everything_with_hosts_and_operations(world: World) -> None:
    running_workload(world, world.acme, "acme-web")
    running_workload(world, world.globex, "globex-db")
    text = scrape(client_for(world, "oscar"))
    assert "acme-web" in text and "globex-db" in text
    assert 'bulkhead_host_memory_used_bytes{host="metrics-host"} 123.0' in text
    assert "bulkhead_operation_duration_seconds_bucket" in text
    assert 'bulkhead_tenant_quota_limit{resource="vcpus",tenant="acme"}' in text


def test_it_answers_a_workloads_history_as_rates_and_refuses_an_unknown_range(world: World) -> None:
    workload = running_workload(world, world.acme, "acme-web")
    client = client_for(world, "vic")
    history = client.get(f"/api/v1/workloads/{workload.pk}/history/?range=hour").json()
    assert history["step"] == 10
    rates = [value for value in history["values"]["cpu_seconds"] if value is not None]
    assert rates and all(rate == pytest.approx(0.2) for rate in rates)
    assert client.get(f"/api/v1/workloads/{workload.pk}/history/?range=decade").status_code == 400
    assert client_for(world, "bob").get(f"/api/v1/workloads/{workload.pk}/history/").status_code == 404


def test_it_sums_a_tenants_workloads_into_its_series(world: World) -> None:
    running_workload(world, world.acme, "one")
    running_workload(world, world.acme, "two")
    assert sampling.sample_tenants() >= 2
    history = client_for(world, "alice").get(f"/api/v1/tenants/{world.acme.pk}/history/?range=hour").json()
    assert history["values"]["workloads_running"][-1] == 2
    assert history["values"]["cpu_cores"][-1] == pytest.approx(0.4)
