"""The core promise: one image, two isolations, one field apart. Real runc and real QEMU (TCG) boots."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from tests.compute.conftest import cleanup_host, create, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = 'echo "hello $GREETING from $(pwd) as $(id -u)"; ls /etc/motd; uname -r; exit 3'


@pytest.fixture
def host(world: World, store_dir: Path) -> Iterator[Host]:
    h = make_host("bht-host-vm")
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        yield h
    from compute.vm_agent import vm_runtime

    for workload in Workload.objects.filter(host=h, isolation="microvm"):
        vm_runtime(h).delete(workload.pk)
    cleanup_host(h)


def run_in(world: World, image: Any, isolation: str, name: str) -> tuple[Workload, str]:
    response = create(
        world,
        "mia",
        name=name,
        image=str(image.pk),
        isolation=isolation,
        command=["/bin/sh", "-c"],
        args=[SCRIPT],
        env={"GREETING": "bulkhead"},
        workdir="/etc",
        user="1000:1000",
        memory_mib=256,
    )
    assert response.status_code == 202, response.json()
    workload = workload_in(name, {"stopped", "failed"}, timeout=180)
    logs = client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"]
    return workload, logs


def test_it_runs_one_image_in_both_isolations_with_the_same_userland_result(
    world: World,
    busybox: Any,
    host: Host,
) -> None:
    container, container_logs = run_in(world, busybox, "namespace", "in-container")
    vm, vm_logs = run_in(world, busybox, "microvm", "in-vm")
    assert container.exit_code == vm.exit_code == 3, (container.status_message, vm.status_message, vm_logs)
    c_lines, v_lines = container_logs.strip().splitlines(), vm_logs.strip().splitlines()
    assert c_lines[:-1] == v_lines[:-1] == ["hello bulkhead from /etc as 1000", "/etc/motd"]
    assert c_lines[-1] == platform.release()
    assert v_lines[-1] != platform.release() and v_lines[-1].endswith("cloud-amd64")
