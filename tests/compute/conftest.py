"""Fixtures and helpers shared by the workload tests: a private store, a busybox image, hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tests.conftest import World, client_for
from tests.imaging.images import build_image, busybox_layers, post_archive, run_inline, write_oci_archive
from tests.processes import host_agent, wait_until


@pytest.fixture
def store_dir(settings: Any) -> Iterator[Path]:
    """A private store, outside pytest's root-only tmp: QEMU runs as its own user and reads root disks."""
    import shutil
    import uuid

    directory = Path(settings.DATA_DIR) / "test-stores" / uuid.uuid4().hex[:12]
    directory.mkdir(parents=True)
    settings.BULKHEAD_STORE_DIR = directory
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def busybox(world: World, store_dir: Path, tmp_path: Path) -> Any:
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    response = post_archive(client_for(world, "alice"), archive, name="busybox", tag="1", tenant=world.acme)
    assert response.status_code == 202, response.json()  # type: ignore[attr-defined]
    op = run_inline(response.json()["id"])  # type: ignore[attr-defined]
    assert op.state == "succeeded", op.error  # type: ignore[attr-defined]
    from imaging.models import Image

    return Image.objects.get(tenant=world.acme, name="busybox", tag="1")


def make_host(name: str) -> Host:
    placeholder = Host(name=name)
    return hosts.register_host(actor=Actor.system("test"), name=name, facts=hosts.gather_facts(placeholder))


@pytest.fixture
def host(world: World, store_dir: Path) -> Iterator[Host]:
    h = make_host("bht-host-a")
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        yield h
    cleanup_host(h)


def cleanup_host(h: Host) -> None:
    from compute.agent import oci_runtime

    runtime = oci_runtime(h)
    for runtime_id in runtime.list_ids():
        runtime.delete(runtime_id)


def create(world: World, persona: str, **body: Any) -> Any:
    body.setdefault("tenant", str(world.acme.pk))
    return client_for(world, persona).post("/api/v1/workloads/", body, format="json")


def finished(op_id: str, timeout: float = 60) -> Operation:
    op = wait_until(
        lambda: Operation.objects.filter(pk=op_id, state__in=["succeeded", "failed"]).first(),
        timeout=timeout,
        what=f"operation {op_id}",
    )
    return op


def workload_in(name: str, states: set[str], timeout: float = 30) -> Workload:
    return wait_until(
        lambda: Workload.objects.filter(name=name, state__in=states).first(),
        timeout=timeout,
        what=f"{name} in {states}",
    )
