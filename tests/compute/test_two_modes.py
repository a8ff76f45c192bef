"""The core promise: one image, two isolations, one field apart. Real runc and real QEMU (TCG) boots."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from tests.compute.conftest import cleanup_host, create, make_host, workload_in
from tests.conftest import World, client_for
from tests.imaging.images import build_image, busybox_layers, run_inline, write_layout
from tests.processes import host_agent, serve_registry

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = 'echo "hello $GREETING from $(pwd) as $(id -u)"; ls /etc/motd; uname -r; exit 3'


@pytest.fixture
def host(world: World, store_dir: Path) -> Iterator[Host]:
    h = make_host("bht-host-vm")
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        yield h
    from tests.compute.runtimes import vm_runtime

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


def test_it_runs_an_image_pushed_with_skopeo_in_both_isolations_alike(
    world: World, store_dir: Path, host: Host, tmp_path: Path
) -> None:
    from imaging.models import Image
    from portal.models import Operation
    from tenants import services
    from tenants.actors import Actor

    layout = write_layout(build_image(busybox_layers("pushed")), tmp_path / "layout")
    secret = services.create_token(actor=Actor(user=world.user("mia")), name="push")[1]
    with serve_registry(store_dir) as registry:
        pushed = subprocess.run(
            [
                "skopeo",
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                f"mia:{secret}",
                f"oci:{layout}:latest",
                f"docker://{registry}/acme/pushed:1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pushed.returncode == 0, pushed.stderr
    op = run_inline(str(Operation.objects.get(kind="image.push").pk))
    assert op.state == "succeeded", op.error  # type: ignore[attr-defined]
    image = Image.objects.get(tenant=world.acme, name="pushed", tag="1")

    container, container_logs = run_in(world, image, "namespace", "pushed-container")
    vm, vm_logs = run_in(world, image, "microvm", "pushed-vm")
    assert container.exit_code == vm.exit_code == 3, (container.status_message, vm.status_message, vm_logs)
    c_lines, v_lines = container_logs.strip().splitlines(), vm_logs.strip().splitlines()
    assert c_lines[:-1] == v_lines[:-1] == ["hello bulkhead from /etc as 1000", "/etc/motd"]


PYTHON_PROGRAM = (
    "import json, os, platform, sys, zlib\n"
    "print(json.dumps({'python': list(sys.version_info[:2]), 'crc': zlib.crc32(b'bulkhead'),"
    " 'greeting': os.environ['GREETING'], 'cwd': os.getcwd(), 'uid': os.getuid()}, sort_keys=True))\n"
    "print(platform.release())\n"
    "sys.exit(5)\n"
)


def test_it_runs_a_larger_python_image_in_both_isolations_alike(
    world: World, python_image: Any, host: Host
) -> None:
    outputs = {}
    for isolation in ("namespace", "microvm"):
        name = f"py-{isolation}"
        response = create(
            world,
            "mia",
            name=name,
            image=str(python_image.pk),
            isolation=isolation,
            command=["/usr/bin/python3", "-c", PYTHON_PROGRAM],
            env={"GREETING": "bulkhead"},
            workdir="/usr",
            user="1000:1000",
            memory_mib=256,
        )
        assert response.status_code == 202, response.json()
        workload = workload_in(name, {"stopped", "failed"}, timeout=240)
        logs = client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"]
        outputs[isolation] = (workload.exit_code, logs.strip().splitlines())
    (c_code, c_lines), (v_code, v_lines) = outputs["namespace"], outputs["microvm"]
    assert c_code == v_code == 5, outputs
    assert c_lines[0] == v_lines[0]
    assert '"greeting": "bulkhead"' in c_lines[0] and '"uid": 1000' in c_lines[0]
    assert c_lines[-1] == platform.release() and v_lines[-1] != platform.release()


@pytest.mark.parametrize("isolation", ["namespace", "microvm"])
def test_it_reports_the_same_stats_shape_and_growing_cpu_time_in_both_isolations(
    world: World, busybox: Any, host: Host, isolation: str
) -> None:
    from tests.processes import wait_until

    response = create(
        world,
        "mia",
        name=f"busy-{isolation}",
        image=str(busybox.pk),
        isolation=isolation,
        command=["/bin/sh", "-c", "while :; do :; done"],
        memory_mib=128,
    )
    assert response.status_code == 202, response.json()
    workload = workload_in(f"busy-{isolation}", {"running"}, timeout=180)
    client = client_for(world, "mia")
    url = f"/api/v1/workloads/{workload.pk}/stats/"
    first = wait_until(lambda: client.get(url).json() or None, timeout=30, what="first stats")
    assert {"cpu_usage_ns", "memory_bytes", "block_read_bytes", "block_write_bytes"} <= set(first)
    assert first["memory_bytes"] > 0

    def grown() -> dict[str, Any] | None:
        stats = client.get(url).json()
        return stats if stats and stats["cpu_usage_ns"] > first["cpu_usage_ns"] + 200_000_000 else None

    later = wait_until(grown, timeout=60, what="CPU time to grow by 0.2 s")
    assert later["cpu_usage_ns"] > first["cpu_usage_ns"]
