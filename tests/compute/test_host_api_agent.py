"""The agent reads and writes no database row: a host's worker and agent loop whose database settings
point nowhere (a closed port) run a container's whole life (create, exit code, stop, start, delete) and a
micro-VM's (create, running, delete) from the specs the portal serves, with layers fetched from the
portal into a store of the host's own; every change reaches the portal through the host API with the
host's own credential."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, serve_registry, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def nowhere_database_url() -> str:
    """A database URL on a loopback port nobody listens on: any query a host process made would fail."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    return f"postgres://nobody:nothing@127.0.0.1:{port}/nowhere"


def test_it_runs_a_container_and_a_micro_vm_on_a_host_without_a_database(
    world: World, busybox: Any, store_dir: Path
) -> None:
    host = make_host("bht-nodb")
    # The host's own store, beside the portal's (QEMU reads root disks: not under pytest's root-only tmp).
    host_store = store_dir.with_name(store_dir.name + "-host")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    mia = client_for(world, "mia")
    try:
        with (
            serve_registry(store_dir) as portal,
            host_agent(
                host,
                DATABASE_URL=nowhere_database_url(),
                BULKHEAD_STORE_DIR=str(host_store),  # layers come from the portal
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_HOST_CREDENTIAL=secret,
                BULKHEAD_SAMPLE_SECONDS="1",
            ),
        ):
            response = create(
                world,
                "mia",
                name="nodb",
                image=str(busybox.pk),
                command=["/bin/sh", "-c", "echo started; trap 'exit 3' TERM; sleep 300 & wait"],
            )
            op = finished(response.json()["id"], timeout=120)
            assert op.state == "succeeded", (op.error, op.operator_details)
            workload = workload_in("nodb", {"running"})
            assert workload.started_at is not None

            stopped = finished(mia.post(f"/api/v1/workloads/{workload.pk}/stop/", {}).json()["id"])
            assert stopped.state == "succeeded", (stopped.error, stopped.operator_details)
            workload.refresh_from_db()
            assert (workload.state, workload.exit_code) == ("stopped", 3)

            started = finished(mia.post(f"/api/v1/workloads/{workload.pk}/start/", {}).json()["id"])
            assert started.state == "succeeded", (started.error, started.operator_details)
            workload_in("nodb", {"running"})
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

            response = create(
                world,
                "mia",
                name="nodb-vm",
                image=str(busybox.pk),
                isolation="microvm",
                command=["/bin/sh", "-c", "echo booted; sleep 600"],
                memory_mib=256,
            )
            op = finished(response.json()["id"], timeout=240)
            assert op.state == "succeeded", (op.error, op.operator_details)
            vm = workload_in("nodb-vm", {"running"})
            deleted = finished(mia.delete(f"/api/v1/workloads/{vm.pk}/").json()["id"], timeout=120)
            assert deleted.state == "succeeded", (deleted.error, deleted.operator_details)
            assert not Workload.objects.filter(pk=vm.pk).exists()
        # Nothing the agent did was refused as another host's.
        assert not AuditEntry.objects.filter(outcome="denied", actor_label=f"host {host.name}").exists()
    finally:
        import shutil

        from tests.compute.runtimes import vm_runtime

        for leftover in Workload.objects.filter(host=host, isolation="microvm"):
            vm_runtime(host).delete(leftover.pk)
        cleanup_host(host)
        shutil.rmtree(host_store, ignore_errors=True)
