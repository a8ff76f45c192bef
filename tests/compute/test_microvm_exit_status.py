"""A micro-VM's workload that handles TERM reports its own exit status on `stop`, as in a container.

The guest's init passes the power button on as TERM and waits for the workload; the trap interrupted
that `wait`, so the init reported 128+TERM (143) even for a workload whose handler ended with `exit 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Workload
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("isolation", ["namespace", "microvm"])
def test_a_workload_that_handles_term_exits_with_its_own_status_when_stopped(
    world: World, busybox: Any, store_dir: Path, isolation: str
) -> None:
    from tests.compute.runtimes import vm_runtime

    h = make_host(f"bht-exit-{isolation[:2]}")
    try:
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world,
                "mia",
                name="graceful",
                image=str(busybox.pk),
                isolation=isolation,
                command=[
                    "/bin/sh",
                    "-c",
                    "trap 'echo CAUGHT-TERM; exit 3' TERM; echo READY; sleep 600 & wait",
                ],
                memory_mib=128,
            )
            assert response.status_code == 202, response.json()
            workload = workload_in("graceful", {"running"}, timeout=120)
            api = client_for(world, "mia")

            def this_boots_logs() -> str:  # a container's log goes on across boots, a VM's starts anew
                text = str(api.get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"])
                return text.rsplit("CAUGHT-TERM", 1)[-1]

            for boot in (1, 2):  # the old init's answer depended on timing: two stops
                if boot == 2:
                    op = api.post(f"/api/v1/workloads/{workload.pk}/start/").json()
                    assert finished(op["id"], 120).state == "succeeded"
                wait_until(lambda: "READY" in this_boots_logs(), timeout=120, interval=0.2)
                op = api.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").json()
                assert finished(op["id"], 120).state == "succeeded"
                workload.refresh_from_db()
                assert (workload.state, workload.exit_code) == ("stopped", 3)
    finally:
        for workload in Workload.objects.filter(host=h, isolation="microvm"):
            vm_runtime(h).delete(workload.pk)
        cleanup_host(h)
