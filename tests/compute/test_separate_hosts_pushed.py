"""An image a tenant pushed with podman into the portal's registry runs on a separate host (issue 16):
the host has none of its layers, fetches them from the portal with its own credential, and runs the image
as a namespace container and as a micro-VM. podman's storage, auth file and configuration are the test's
own (tests/imaging/test_registry_podman.py); the registry is the separate portal's `/v2/` over the bridge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from compute.models import Workload
from imaging.models import Image
from tests.compute.separate_hosts import separate_portal
from tests.compute.test_separate_hosts import blobs_in, logs_of, run
from tests.conftest import World
from tests.imaging.images import Entry, build_image, busybox_layers, make_layer, write_docker_archive
from tests.imaging.test_registry_podman import podman, short_run_root
from tests.imaging.test_registry_server import token_of
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def pushed_with_podman(world: World, registry: str, archive: Path, root: Path) -> Image:
    """mia logs podman in with an API token and pushes the loaded image as acme/pushed:1."""
    (root / "registries.conf").write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    loaded = podman(root, "load", "-i", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    login = podman(
        root, "login", "--tls-verify=false", "--username", "mia", "--password-stdin", registry,
        stdin=token_of(world, "mia"),
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    pushed = podman(root, "push", "--tls-verify=false", "localhost/pushed:1", f"{registry}/acme/pushed:1")
    assert pushed.returncode == 0, pushed.stderr

    def ready() -> Image | None:
        return Image.objects.filter(tenant=world.acme, name="pushed", tag="1", state="ready").first()

    return wait_until(ready, timeout=60, what="the pushed image is ready")


def test_an_image_pushed_with_podman_runs_on_a_separate_host_as_a_container_and_a_micro_vm(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    marked = [*busybox_layers(), make_layer({"pushed-mark": Entry(b"pushed by podman\n")})]
    archive = tmp_path / "pushed.tar"
    write_docker_archive(build_image(marked), archive, repo_tag="localhost/pushed:1")
    root = tmp_path / "podman"
    root.mkdir()
    try:
        with separate_portal(store_dir, world) as portal, portal.host("bht-push") as host:
            registry = portal.url.removeprefix("http://")
            image = pushed_with_podman(world, registry, archive, root)
            assert blobs_in(host) == set()  # nothing of the image is on the host before it runs there

            container = run(world, image, "pushed-c", "cat /pushed-mark; exec sleep 300")
            assert container.host_id == host.row.pk
            wait_until(lambda: "pushed by podman" in logs_of(world, container), timeout=30, what="logs")
            vm = run(world, image, "pushed-vm", "cat /pushed-mark", isolation="microvm")

            def vm_done() -> Workload | None:
                row = Workload.objects.get(pk=vm.pk)
                return row if row.state in {"stopped", "failed"} else None

            vm = wait_until(vm_done, timeout=120, what="the micro-VM ran")
            assert (vm.state, vm.exit_code) == ("stopped", 0), vm.status_message
            assert "pushed by podman" in logs_of(world, vm)
            # The layers came into the host's own store, from the portal, with the host's credential.
            layers = {layer.digest.removeprefix("sha256:") for layer in image.layers.all()}
            assert layers <= blobs_in(host)
    finally:
        shutil.rmtree(short_run_root(root), ignore_errors=True)
