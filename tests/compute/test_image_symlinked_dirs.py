"""A two-layer image whose top layer writes through symlinked directories of the layer below, imported
through the API and run in a real container (runc) and a micro-VM (QEMU, its EROFS root disk): the files
are where containerd and Docker put them."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from imaging.models import Image
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.imaging import hostile
from tests.imaging.images import (
    APPLETS,
    BUSYBOX,
    BuiltLayer,
    Entry,
    build_image,
    make_layer,
    post_archive,
    run_inline,
    write_oci_archive,
)
from tests.processes import host_agent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def host(world: World, store_dir: Path) -> Iterator[Host]:
    h = make_host("bht-host-symlinks")
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
        yield h
    from tests.compute.runtimes import vm_runtime

    for workload in Workload.objects.filter(host=h, isolation="microvm"):
        vm_runtime(h).delete(workload.pk)
    cleanup_host(h)


def raw_layer(tar: bytes) -> BuiltLayer:
    return BuiltLayer(tar, gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")


def import_image(world: World, tmp_path: Path, base_extra: dict[str, Entry], top: bytes, name: str) -> Any:
    base = {"bin/busybox": Entry(BUSYBOX.read_bytes(), mode=0o755)}
    base.update({f"bin/{applet}": Entry(symlink="busybox") for applet in APPLETS})
    base.update(base_extra)
    archive = write_oci_archive(build_image([make_layer(base), raw_layer(top)]), tmp_path / f"{name}.tar")
    response = post_archive(client_for(world, "alice"), archive, name=name, tag="1", tenant=world.acme)
    assert response.status_code == 202, response.json()  # type: ignore[attr-defined]
    return run_inline(response.json()["id"])  # type: ignore[attr-defined]


@pytest.mark.parametrize("isolation", ["namespace", "microvm"])
def test_a_workload_reads_files_written_through_symlinked_dirs_at_their_targets(
    world: World, store_dir: Path, host: Host, tmp_path: Path, isolation: str
) -> None:
    op = import_image(
        world,
        tmp_path,
        {
            "versions/1/old": Entry(b"old\n"),
            "cur": Entry(symlink="versions/1"),
            "lib": Entry(symlink="/opt/x"),
        },
        # No directory entries: `cur` and `lib` are implicit, so they resolve through the links.
        hostile.archive(
            hostile.member("cur/file", b"through-cur\n"), hostile.member("lib/y", b"through-lib\n")
        ),
        "linked",
    )
    assert op.state == "succeeded", op.error
    image = Image.objects.get(tenant=world.acme, name="linked", tag="1")
    response = create(
        world,
        "mia",
        name="reader",
        image=str(image.pk),
        isolation=isolation,
        memory_mib=256,
        command=["/bin/sh", "-c"],
        args=[
            "cat /versions/1/file /opt/x/y /cur/file /lib/y /cur/old;"
            " test -L /cur && test -L /lib && echo links-kept"
        ],
    )
    assert response.status_code == 202, response.json()
    assert finished(response.json()["id"]).state == "succeeded"
    reader = workload_in("reader", {"stopped", "failed"}, timeout=180)
    logs = client_for(world, "mia").get(f"/api/v1/workloads/{reader.pk}/logs/").json()["logs"]
    assert logs.split() == [
        "through-cur",
        "through-lib",
        "through-cur",
        "through-lib",
        "old",
        "links-kept",
    ], logs
    assert reader.exit_code == 0, reader.status_message


def test_an_image_whose_links_loop_is_refused_at_import_and_not_recorded(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    op = import_image(
        world,
        tmp_path,
        {"a": Entry(symlink="b"), "b": Entry(symlink="a")},
        hostile.archive(hostile.member("a/pwned", b"x")),
        "looping",
    )
    assert op.state == "failed"
    assert "unsafe entry 'a': path resolves through too many symlinks." in op.error
    assert not Image.objects.filter(name="looping").exists()
    assert list((store_dir / "layers" / "chains").iterdir()) == []
