"""The built-in registry at /v2/, pulled from by a real OCI client (skopeo) through daphne."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from imaging.models import Image
from tenants import services
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World, client_for
from tests.imaging.images import (
    Entry,
    build_image,
    busybox_layers,
    make_layer,
    post_archive,
    run_inline,
    write_oci_archive,
)

pytestmark = pytest.mark.django_db(transaction=True)

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


def imported(world: World, tmp_path: Path, persona: str, tenant: Any, name: str, layers: list[Any]) -> Image:
    archive = write_oci_archive(build_image(layers), tmp_path / f"{name}.tar")
    response = post_archive(client_for(world, persona), archive, name=name, tag="1", tenant=tenant)
    assert response.status_code == 202, response.json()  # type: ignore[attr-defined]
    op = run_inline(response.json()["id"])  # type: ignore[attr-defined]
    assert op.state == "succeeded", op.error  # type: ignore[attr-defined]
    return Image.objects.get(tenant=tenant, name=name, tag="1")


@pytest.fixture
def registry(registry_server: str) -> str:
    return registry_server


def token_of(world: World, persona: str, **options: Any) -> str:
    return services.create_token(actor=Actor(user=world.user(persona)), name=f"reg-{persona}", **options)[1]


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=120)


def test_it_lets_skopeo_pull_a_tenants_image_with_an_api_token(
    world: World, registry: str, tmp_path: Path
) -> None:
    image = imported(world, tmp_path, "alice", world.acme, "busybox", busybox_layers())
    secret = token_of(world, "mia")
    inspected = skopeo(
        "inspect", "--tls-verify=false", "--creds", f"mia:{secret}", f"docker://{registry}/acme/busybox:1"
    )
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == image.manifest_digest
    copied = skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"mia:{secret}",
        f"docker://{registry}/acme/busybox:1",
        f"oci:{tmp_path / 'out'}:copy",
    )
    assert copied.returncode == 0, copied.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for layer in image.layers.all():
        assert (tmp_path / "out" / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")).is_file()


def test_it_answers_another_tenants_repository_like_a_missing_one(
    world: World, registry: str, tmp_path: Path
) -> None:
    imported(world, tmp_path, "alice", world.acme, "private", busybox_layers("secret"))
    secret = token_of(world, "bob")
    answers = []
    for name in ("acme/private", "acme/nothing-here", "nosuchtenant/private"):
        token = httpx.get(
            f"http://{registry}/v2/token",
            params={"service": "bulkhead", "scope": f"repository:{name}:pull"},
            auth=("bob", secret),
        ).json()["token"]
        response = httpx.get(
            f"http://{registry}/v2/{name}/manifests/1", headers={"Authorization": f"Bearer {token}"}
        )
        answers.append((response.status_code, response.json()["errors"][0]["code"]))
    assert answers == [(401, "UNAUTHORIZED")] * 3
    failed = skopeo(
        "inspect", "--tls-verify=false", "--creds", f"bob:{secret}", f"docker://{registry}/acme/private:1"
    )
    assert failed.returncode != 0
    assert AuditEntry.objects.filter(
        action="registry.pull", outcome="denied", actor=world.user("bob")
    ).exists()


def test_it_serves_a_blob_only_through_a_repository_that_references_it(
    world: World, registry: str, tmp_path: Path
) -> None:
    mine = imported(world, tmp_path, "alice", world.acme, "mine", busybox_layers("shared"))
    theirs = imported(world, tmp_path, "bob", world.globex, "theirs", [make_layer({"x": Entry(b"x")})])
    layer = mine.layers.first()
    assert layer is not None and not theirs.layers.filter(pk=layer.pk).exists()
    secret = token_of(world, "bob")
    response = httpx.get(f"http://{registry}/v2/globex/theirs/blobs/{layer.digest}", auth=("bob", secret))
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_it_serves_ranges_and_pages_tags(world: World, registry: str, tmp_path: Path) -> None:
    image = imported(world, tmp_path, "alice", world.acme, "paged", busybox_layers())
    for tag in ("2", "3"):
        client_for(world, "alice").post(f"/api/v1/images/{image.pk}/tag/", {"name": "paged", "tag": tag})
    secret = token_of(world, "vic")
    layer = image.layers.order_by("-size").first()
    assert layer is not None
    whole = httpx.get(f"http://{registry}/v2/acme/paged/blobs/{layer.digest}", auth=("vic", secret))
    assert whole.status_code == 200 and len(whole.content) == layer.size
    part = httpx.get(
        f"http://{registry}/v2/acme/paged/blobs/{layer.digest}",
        auth=("vic", secret),
        headers={"Range": "bytes=10-19"},
    )
    assert part.status_code == 206 and part.content == whole.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{layer.size}"
    first = httpx.get(f"http://{registry}/v2/acme/paged/tags/list?n=2", auth=("vic", secret))
    assert first.json() == {"name": "acme/paged", "tags": ["1", "2"]}
    assert 'rel="next"' in first.headers["link"]
    rest = httpx.get(f"http://{registry}/v2/acme/paged/tags/list?n=2&last=2", auth=("vic", secret))
    assert rest.json()["tags"] == ["3"]
