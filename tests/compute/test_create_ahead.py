"""A host creates a new container from the spec its create's message carries while the portal answers the
claim, and starts it only if the claim's spec is the same. Played as the portal's side would race it: the
workload changed or deleted after the message left and before the claim (the claim is held back at the
`create.claiming` pause point meanwhile). Real worker, agent, runc and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Workload
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.compute.runtimes import oci_runtime
from tests.compute.test_workloads import leaked_loop_devices, leaked_mounts
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELD_CLAIM = {"BULKHEAD_PAUSEPOINT": "create.claiming:4"}


def process_environment(pid: int) -> list[str]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return environ.read().decode().split("\0")


def test_it_runs_the_claims_spec_when_the_workload_changed_after_its_message(
    world: World, busybox: Any, store_dir: Path
) -> None:
    h = make_host("bht-ahead-change")
    try:
        with host_agent(h, HELD_CLAIM, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world,
                "mia",
                name="changed",
                image=str(busybox.pk),
                command=["/bin/sleep", "300"],
                env={"GREETING": "from-the-message"},
            )
            assert response.status_code == 202, response.json()
            workload = Workload.objects.get(name="changed")
            runtime = oci_runtime(h)
            # Created ahead from the message (GREETING=from-the-message) while the claim is held back.
            wait_until(lambda: runtime.list_ids() == [workload.runtime_id], timeout=15, what="created ahead")
            assert Workload.objects.get(pk=workload.pk).state == "pending"
            changed = client_for(world, "mia").patch(
                f"/api/v1/workloads/{workload.pk}/", {"env": {"GREETING": "from-the-claim"}}, format="json"
            )
            assert changed.status_code == 200, changed.json()
            assert finished(response.json()["id"]).state == "succeeded"
            workload = workload_in("changed", {"running"})
            state = runtime.state(workload.runtime_id)
            assert state.status == "running" and state.pid
            environment = process_environment(state.pid)
            assert "GREETING=from-the-claim" in environment
            assert "GREETING=from-the-message" not in environment
            assert runtime.list_ids() == [workload.runtime_id]
    finally:
        cleanup_host(h)
    assert leaked_mounts(h) == [] and leaked_loop_devices(h) == []


def test_it_leaves_nothing_when_the_workload_is_deleted_before_its_claim(
    world: World, busybox: Any, store_dir: Path
) -> None:
    h = make_host("bht-ahead-delete")
    try:
        with host_agent(h, HELD_CLAIM, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world, "mia", name="doomed", image=str(busybox.pk), command=["/bin/sleep", "300"]
            )
            workload = Workload.objects.get(name="doomed")
            runtime = oci_runtime(h)
            wait_until(lambda: runtime.list_ids() == [workload.runtime_id], timeout=15, what="created ahead")
            deleted = client_for(world, "mia").delete(f"/api/v1/workloads/{workload.pk}/")
            assert deleted.status_code == 202, deleted.json()
            finished(response.json()["id"])
            assert finished(deleted.json()["id"]).state == "succeeded"
            wait_until(lambda: not Workload.objects.filter(pk=workload.pk).exists(), timeout=30, what="gone")
            assert runtime.list_ids() == []
            assert leaked_mounts(h) == [] and leaked_loop_devices(h) == []
    finally:
        cleanup_host(h)
