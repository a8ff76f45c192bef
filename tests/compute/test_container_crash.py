"""A container start or stop cut short by a dying worker ends in the truth once the agent is back (issue
19, item 6): the start is finished (the container runs), the stop is finished (it is stopped); no
workload stays `creating` or `stopping`. Create and delete are covered in test_workloads.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Workload
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def run_victim(world: World, busybox: Any, h: Any, store_dir: Path) -> Workload:
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        response = create(world, "mia", name="victim", image=str(busybox.pk), command=["/bin/sleep", "300"])
        assert response.status_code == 202, response.json()
        return workload_in("victim", {"running"}, timeout=60)


def test_it_finishes_a_container_start_whose_worker_was_killed_while_starting(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from tests.compute.runtimes import oci_runtime

    h = make_host("bht-ctkill-start")
    try:
        workload = run_victim(world, busybox, h, store_dir)
        api = client_for(world, "mia")
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            finished(api.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").json()["id"], 60)
            workload_in("victim", {"stopped"})
        point = {"BULKHEAD_FAILPOINT": "create.created"}
        with host_agent(h, point, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)) as worker:
            op_id = api.post(f"/api/v1/workloads/{workload.pk}/start/").json()["id"]
            wait_until(
                lambda: worker.poll() is not None, timeout=60, what="the worker killed at the failpoint"
            )
            assert Workload.objects.get(pk=workload.pk).state == "creating"
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            workload = workload_in("victim", {"running", "failed"}, timeout=60)
            assert workload.state == "running", workload.status_message
            assert oci_runtime(h).state(workload.runtime_id).status == "running"
            op = finished(op_id)
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        cleanup_host(h)


def test_it_finishes_a_container_stop_whose_worker_was_killed_mid_stop(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from tests.compute.runtimes import oci_runtime

    h = make_host("bht-ctkill-stop")
    try:
        workload = run_victim(world, busybox, h, store_dir)
        point = {"BULKHEAD_FAILPOINT": "stop.stopping"}
        with host_agent(h, point, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)) as worker:
            api = client_for(world, "mia")
            op_id = api.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").json()["id"]
            wait_until(
                lambda: worker.poll() is not None, timeout=60, what="the worker killed at the failpoint"
            )
            assert Workload.objects.get(pk=workload.pk).state == "stopping"
            assert oci_runtime(h).state(workload.runtime_id).status == "running"
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            # The stop is what was asked: the container is stopped and the row says so.
            workload = workload_in("victim", {"stopped", "failed"}, timeout=60)
            assert workload.state == "stopped", workload.status_message
            assert oci_runtime(h).state(workload.runtime_id).status != "running"
            op = finished(op_id)
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        cleanup_host(h)
