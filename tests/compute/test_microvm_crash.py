"""A micro-VM create cut short by a dying worker ends in the truth once the agent is back: the VM runs
(the create is finished, since that is what was asked) and no workload stays `creating`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Workload
from portal.models import Operation
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("point", ["vm.defining", "vm.booting"])
def test_it_finishes_a_micro_vm_create_whose_worker_was_killed_at_the_slow_step(
    world: World, busybox: Any, store_dir: Path, point: str
) -> None:
    from compute.vm_agent import vm_runtime

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
