"""Pulling from a REAL registry (Debian's docker-registry) that skopeo pushes to, through a real worker."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imaging.models import Image
from imaging.registry import RegistryError, endpoint_for, parse_reference
from portal.models import Operation
from tests.conftest import World, client_for
from tests.imaging.images import (
    BuiltImage,
    build_image,
    busybox_layers,
    run_inline,
    store_dir,
    write_layout,
    write_multiarch_layout,
)
from tests.processes import celery_worker, wait_until

__all__ = ["store_dir"]


@dataclass
class Registry:
    host: str
    creds: str = ""

    def push(self, layout: Path, repo: str, *, all_platforms: bool = False) -> None:
        cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
        if all_platforms:
            cmd.append("--all")
        if self.creds:
            cmd += ["--dest-creds", self.creds]
        subprocess.run(
            [*cmd, f"oci:{layout}:latest", f"docker://{self.host}/{repo}"], check=True, timeout=120
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(tmp: Path, htpasswd: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    auth = f"auth:\n  htpasswd:\n    realm: bulkhead-test\n    path: {htpasswd}\n" if htpasswd else ""
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = (tmp / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401)
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_until(ready, timeout=30, what="the registry")
    assert proc.poll() is None, (tmp / "registry.log").read_text()
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    proc, host = start_registry(tmp_path_factory.mktemp("registry"))
    yield Registry(host)
    stop(proc)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("auth-registry")
    htpasswd = tmp / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(htpasswd), "puller", "s3cret-pass"], check=True, capture_output=True
    )
    proc, host = start_registry(tmp, htpasswd)
    yield Registry(host, creds="puller:s3cret-pass")
    stop(proc)


@pytest.fixture(scope="module")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltImage, Path]:
    image = build_image(busybox_layers("pulled"))
    return image, write_layout(image, tmp_path_factory.mktemp("busybox") / "layout")


def pull(client: Any, reference: str, tenant: Any = None, **extra: str) -> Any:
    data = {"reference": reference, **extra}
    if tenant is not None:
        data["tenant"] = str(tenant.pk)
    return client.post("/api/v1/images/pull/", data, format="json")


@pytest.mark.django_db(transaction=True)
def test_it_pulls_through_a_real_worker_and_skips_what_the_tenant_has(
    world: World, store_dir: Path, registry: Registry, busybox: tuple[BuiltImage, Path], settings: Any
) -> None:
    image, layout = busybox
    registry.push(layout, "test/busybox:1")
    settings.BULKHEAD_REGISTRY_ALLOWLIST = [registry.host]
    env = {"BULKHEAD_STORE_DIR": str(store_dir), "BULKHEAD_REGISTRY_ALLOWLIST": registry.host}
    with celery_worker(**env):
        response = pull(client_for(world, "mia"), f"{registry.host}/test/busybox:1", world.acme)
        assert response.status_code == 202, response.content
        op = wait_until(
            lambda: Operation.objects.filter(
                pk=response.json()["id"], state__in=["succeeded", "failed"]
            ).first(),
            timeout=120,
            what="the pull",
        )
        assert op.state == "succeeded", op.error
        pulled = Image.objects.get(tenant=world.acme, name="busybox", tag="1")
        assert pulled.manifest_digest == image.manifest_digest
        assert pulled.source == "pull" and pulled.source_reference == f"{registry.host}/test/busybox:1"
        assert op.operator_details["layer_bytes_written"] == sum(len(layer.blob) for layer in image.layers)

        again = pull(client_for(world, "alice"), f"{registry.host}/test/busybox:1", world.acme, tag="again")
        op2 = wait_until(
            lambda: Operation.objects.filter(
                pk=again.json()["id"], state__in=["succeeded", "failed"]
            ).first(),
            timeout=120,
            what="the second pull",
        )
    assert op2.state == "succeeded", op2.error
    assert op2.operator_details["layer_bytes_written"] == 0
    assert op2.operator_details["store"]["bytes_read"] < 10_000


@pytest.mark.django_db
def test_it_pulls_by_digest_and_resolves_an_index_to_linux_amd64(
    world: World, store_dir: Path, registry: Registry, tmp_path: Path, settings: Any
) -> None:
    amd64 = build_image(busybox_layers("amd64"))
    arm64 = build_image(busybox_layers("arm64"), architecture="arm64")
    layout, index_digest = write_multiarch_layout(
        {"linux/arm64": arm64, "linux/amd64": amd64}, tmp_path / "multi"
    )
    registry.push(layout, "test/multi:1", all_platforms=True)
    settings.BULKHEAD_REGISTRY_ALLOWLIST = [registry.host]
    response = pull(client_for(world, "mia"), f"{registry.host}/test/multi@{index_digest}", world.acme)
    assert response.status_code == 202, response.content
    op = run_inline(response.json()["id"])
    assert op.state == "succeeded", op.error
    pulled = Image.objects.get(name="multi")
    assert pulled.manifest_digest == amd64.manifest_digest
    assert pulled.config_digest == amd64.config_digest


@pytest.mark.django_db
def test_it_pulls_with_basic_auth_and_forgets_the_password(
    world: World, store_dir: Path, auth_registry: Registry, busybox: tuple[BuiltImage, Path], settings: Any
) -> None:
    auth_registry.push(busybox[1], "private/busybox:1")
    settings.BULKHEAD_REGISTRY_ALLOWLIST = [auth_registry.host]
    reference = f"{auth_registry.host}/private/busybox:1"
    client = client_for(world, "mia")

    anonymous = run_inline(pull(client, reference, world.acme, tag="anon").json()["id"])
    assert anonymous.state == "failed" and "requires credentials" in anonymous.error

    wrong = run_inline(
        pull(client, reference, world.acme, tag="wrong", username="puller", password="nope").json()["id"]
    )
    assert wrong.state == "failed" and "refused the credentials" in wrong.error

    response = pull(client, reference, world.acme, username="puller", password="s3cret-pass")
    op = run_inline(response.json()["id"])
    assert op.state == "succeeded", op.error
    assert "credentials" not in op.params
    assert "s3cret-pass" not in str(client.get(f"/api/v1/operations/{op.pk}/").json())
    assert Image.objects.filter(tenant=world.acme, tag="1").count() == 1


@pytest.mark.django_db
def test_it_refuses_registries_the_operator_has_not_allowed(world: World, settings: Any) -> None:
    client = client_for(world, "mia")
    settings.BULKHEAD_REGISTRY_ALLOWLIST = []
    response = pull(client, "127.0.0.1:5000/test/busybox:1", world.acme)
    assert response.status_code == 400 and "disabled" in response.json()["error"]["message"]
    settings.BULKHEAD_REGISTRY_ALLOWLIST = ["registry.example.test"]
    assert pull(client, "127.0.0.1:5000/test/busybox:1", world.acme).status_code == 400
    settings.BULKHEAD_REGISTRY_ALLOWLIST = ["169.254.169.254", "metadata.google.internal", "[fe80::1]"]
    for ref in ("169.254.169.254/a/b:1", "metadata.google.internal/a/b:1", "[fe80::1]/a/b:1"):
        response = pull(client, ref, world.acme)
        assert response.status_code == 400, ref
    assert pull(client, "no-registry-here", world.acme).status_code == 400
    assert not Operation.objects.filter(kind="image.pull").exists()


def test_link_local_and_metadata_addresses_are_refused_after_resolution() -> None:
    for host in ("169.254.169.254", "169.254.1.1", "fe80::1", "::ffff:169.254.169.254", "100.100.100.200"):
        with pytest.raises(RegistryError):
            endpoint_for(host, None, [host])
    loopback = endpoint_for("127.0.0.1", 5000, ["127.0.0.1:5000"])
    assert loopback.scheme == "http"
    with pytest.raises(RegistryError):
        endpoint_for("127.0.0.1", 5001, ["127.0.0.1:5000"])
    # A name that resolves to loopback counts as loopback (the address is what is checked).
    assert endpoint_for("localhost", 5000, ["localhost"]).address.is_loopback


def test_references_must_name_their_registry() -> None:
    ref = parse_reference("registry.example.test:5000/team/app@sha256:" + "a" * 64)
    assert (ref.host, ref.port, ref.repository, ref.tag) == ("registry.example.test", 5000, "team/app", None)
    assert parse_reference("localhost/app").tag == "latest"
    for bad in ("busybox", "library/busybox:1", "host.test/UPPER:1", "host.test/a@sha256:abc"):
        with pytest.raises(RegistryError):
            parse_reference(bad)
