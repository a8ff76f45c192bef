"""The agent never writes the database: a host's worker and agent loop whose database role may only
read run a container's whole life (create, exit, stop, start, delete) and every change reaches the
portal through the host API with the host's own credential."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from compute import hosts
from compute.models import Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, serve_registry, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

READ_ONLY_ROLE = "bulkhead_host_readonly"


def read_only_database_url() -> str:
    """The test database through a role that may SELECT and nothing else."""
    assert connection.vendor == "postgresql", "the tests run on PostgreSQL (scripts/with-test-services.sh)"
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [READ_ONLY_ROLE])
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE ROLE {READ_ONLY_ROLE} LOGIN")
        cursor.execute(f"GRANT USAGE ON SCHEMA public TO {READ_ONLY_ROLE}")
        cursor.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READ_ONLY_ROLE}")
    s = connection.settings_dict
    return f"postgres://{READ_ONLY_ROLE}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


def test_it_runs_a_workloads_life_on_a_host_that_may_only_read_the_database(
    world: World, busybox: Any, store_dir: Path
) -> None:
    host = make_host("bht-readonly")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    mia = client_for(world, "mia")
    try:
        with (
            serve_registry(store_dir) as portal,
            host_agent(
                host,
                DATABASE_URL=read_only_database_url(),
                BULKHEAD_STORE_DIR=str(store_dir),
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_HOST_CREDENTIAL=secret,
                BULKHEAD_SAMPLE_SECONDS="1",
            ),
        ):
            response = create(
                world,
                "mia",
                name="readonly",
                image=str(busybox.pk),
                command=["/bin/sh", "-c", "echo started; trap 'exit 3' TERM; sleep 300 & wait"],
            )
            op = finished(response.json()["id"], timeout=120)
            assert op.state == "succeeded", (op.error, op.operator_details)
            workload = workload_in("readonly", {"running"})
            assert workload.started_at is not None

            stopped = finished(mia.post(f"/api/v1/workloads/{workload.pk}/stop/", {}).json()["id"])
            assert stopped.state == "succeeded", (stopped.error, stopped.operator_details)
            workload.refresh_from_db()
            assert (workload.state, workload.exit_code) == ("stopped", 3)

            started = finished(mia.post(f"/api/v1/workloads/{workload.pk}/start/", {}).json()["id"])
            assert started.state == "succeeded", (started.error, started.operator_details)
            workload_in("readonly", {"running"})
            # The host's heartbeat and samples come through the host API too.
            beat = host.last_heartbeat
            wait_until(
                lambda: type(host).objects.get(pk=host.pk).last_heartbeat != beat,
                timeout=30,
                what="a heartbeat through the host API",
            )

            deleted = finished(mia.delete(f"/api/v1/workloads/{workload.pk}/").json()["id"])
            assert deleted.state == "succeeded", (deleted.error, deleted.operator_details)
            assert not Workload.objects.filter(pk=workload.pk).exists()
        # Nothing the agent did was refused as another host's.
        assert not AuditEntry.objects.filter(outcome="denied", actor_label=f"host {host.name}").exists()
    finally:
        cleanup_host(host)
