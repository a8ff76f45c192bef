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
    from tests.compute.runtimes import oci_runtime

    runtime = oci_runtime(h)
    for runtime_id in runtime.list_ids():
        runtime.delete(runtime_id)
    runtime.drop_spare_disks()


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


PYTHON = Path("/usr/bin/python3.11")
# Parts of the standard library a small program does not need: keeps the test image near 30 MB.
PYTHON_SKIP = (
    "test",
    "idlelib",
    "tkinter",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "turtledemo",
    "__pycache__",
)


def python_layer_entries() -> dict[str, Any]:
    """Debian's python3.11 with the shared libraries it links and most of its standard library."""
    import os
    import subprocess

    from tests.imaging.images import Entry

    entries: dict[str, Any] = {"usr/bin/python3.11": Entry(PYTHON.read_bytes(), mode=0o755)}
    entries["usr/bin/python3"] = Entry(symlink="python3.11")
    ldd = subprocess.run(["ldd", str(PYTHON)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            real = os.path.realpath(path)
            entries[path.lstrip("/")] = Entry(Path(real).read_bytes(), mode=0o755)
            entries[real.lstrip("/")] = Entry(Path(real).read_bytes(), mode=0o755)
    stdlib = Path("/usr/lib/python3.11")
    for file in stdlib.rglob("*"):
        rel = file.relative_to(stdlib)
        if any(part in PYTHON_SKIP or part.startswith("config-") for part in rel.parts) or rel.parts[0] in (
            "dist-packages",
            "site-packages",
        ):
            continue
        if file.is_symlink() or not file.is_file():
            continue
        entries[f"usr/lib/python3.11/{rel}"] = Entry(file.read_bytes())
    return entries


@pytest.fixture
def python_image(world: World, store_dir: Path, tmp_path: Path) -> Any:
    """A larger image: busybox plus Debian's Python (about 30 MB, thousands of files)."""
    from imaging.models import Image
    from tests.imaging.images import make_layer

    layers = [*busybox_layers(), make_layer(python_layer_entries())]
    archive = write_oci_archive(build_image(layers, cmd=("/usr/bin/python3",)), tmp_path / "python.tar")
    response = post_archive(client_for(world, "alice"), archive, name="python", tag="3.11", tenant=world.acme)
    assert response.status_code == 202, response.json()  # type: ignore[attr-defined]
    op = run_inline(response.json()["id"])  # type: ignore[attr-defined]
    assert op.state == "succeeded", op.error  # type: ignore[attr-defined]
    return Image.objects.get(tenant=world.acme, name="python", tag="3.11")
