"""A micro-VM create cut short by a dying worker ends in the truth once the agent is back: the VM runs
(the create is finished, since that is what was asked) and no workload stays `creating`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Workload
from portal.models import Operation
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("point", ["vm.defining", "vm.booting"])
def test_it_finishes_a_micro_vm_create_whose_worker_was_killed_at_the_slow_step(
    world: World, busybox: Any, store_dir: Path, point: str
) -> None:
    from tests.compute.runtimes import vm_runtime

    h = make_host(f"bht-vmkill-{point.split('.')[1]}")
    try:
        with host_agent(h, {"BULKHEAD_FAILPOINT": point}, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world,
                "mia",
                name="victim",
                image=str(busybox.pk),
                isolation="microvm",
                command=["/bin/sleep", "300"],
                memory_mib=128,
            )
            assert response.status_code == 202, response.json()
            op_id = response.json()["id"]
            wait_until(lambda: Workload.objects.filter(name="victim", state="creating").exists(), timeout=60)
            # The worker dies at the failpoint: the operation stays running with nobody behind it.
            wait_until(lambda: Operation.objects.filter(pk=op_id, progress__gte=60).exists(), timeout=120)
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            workload = workload_in("victim", {"running", "failed"}, timeout=180)
            assert workload.state == "running", workload.status_message
            assert vm_runtime(h).state(workload.pk).status == "running"
            op = finished(op_id)
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)


def run_victim(world: World, busybox: Any, h: Any, store_dir: Path) -> Workload:
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        response = create(
            world,
            "mia",
            name="victim",
            image=str(busybox.pk),
            isolation="microvm",
            command=["/bin/sleep", "300"],
            memory_mib=128,
        )
        assert response.status_code == 202, response.json()
        return workload_in("victim", {"running"}, timeout=180)


def test_it_finishes_a_micro_vm_start_whose_worker_was_killed_while_booting(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from tests.compute.runtimes import vm_runtime

    h = make_host("bht-vmkill-start")
    try:
        workload = run_victim(world, busybox, h, store_dir)
        api = client_for(world, "mia")
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            finished(api.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").json()["id"], 120)
            workload_in("victim", {"stopped"})
        with host_agent(
            h, {"BULKHEAD_FAILPOINT": "vm.booting"}, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)
        ) as worker:
            op_id = api.post(f"/api/v1/workloads/{workload.pk}/start/").json()["id"]
            wait_until(
                lambda: worker.poll() is not None, timeout=120, what="the worker killed at the failpoint"
            )
            assert Workload.objects.get(pk=workload.pk).state == "creating"
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            workload = workload_in("victim", {"running", "failed"}, timeout=180)
            assert workload.state == "running", workload.status_message
            assert vm_runtime(h).state(workload.pk).status == "running"
            op = finished(op_id)
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)


def test_it_finishes_a_micro_vm_stop_whose_worker_was_killed_mid_stop(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from tests.compute.runtimes import vm_runtime

    h = make_host("bht-vmkill-stop")
    try:
        workload = run_victim(world, busybox, h, store_dir)
        with host_agent(
            h, {"BULKHEAD_FAILPOINT": "vm.stopping"}, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)
        ) as worker:
            api = client_for(world, "mia")
            op_id = api.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").json()["id"]
            wait_until(
                lambda: worker.poll() is not None, timeout=120, what="the worker killed at the failpoint"
            )
            assert Workload.objects.get(pk=workload.pk).state == "stopping"
            assert vm_runtime(h).state(workload.pk).status == "running"
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            # The stop is what was asked: the VM is stopped, the row says so.
            workload = workload_in("victim", {"stopped", "failed"}, timeout=120)
            assert workload.state == "stopped", workload.status_message
            wait_until(lambda: vm_runtime(h).state(workload.pk).status != "running", timeout=30)
            op = finished(op_id)
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)


def test_it_finishes_a_micro_vm_delete_whose_worker_was_killed_mid_delete(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from compute.runtimes.libvirt import VmNotFound
    from tests.compute.runtimes import vm_runtime

    h = make_host("bht-vmkill-delete")
    try:
        workload = run_victim(world, busybox, h, store_dir)
        with host_agent(
            h, {"BULKHEAD_FAILPOINT": "vm.deleting"}, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)
        ) as worker:
            client_for(world, "mia").delete(f"/api/v1/workloads/{workload.pk}/")
            wait_until(
                lambda: worker.poll() is not None, timeout=120, what="the worker killed at the failpoint"
            )
            assert Workload.objects.get(pk=workload.pk).state == "deleting"
            assert workload.pk in vm_runtime(h).list_ids()  # stopped, not yet undefined
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            wait_until(
                lambda: not Workload.objects.filter(pk=workload.pk).exists(), timeout=60, what="deletion"
            )
            assert workload.pk not in vm_runtime(h).list_ids()
            with pytest.raises(VmNotFound):
                vm_runtime(h).state(workload.pk)
            from tenants.models import Quota

            assert Quota.objects.get(tenant=world.acme).used_workloads == 0
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)
