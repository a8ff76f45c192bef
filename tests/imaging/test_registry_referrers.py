"""The referrers API: a signature or SBOM pushed with a `subject` is listed for that image, filtered by
artifact type, and only to who may pull the repository."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import World
from tests.imaging.images import build_image, busybox_layers, digest_of
from tests.imaging.test_registry_push import push_by_http, upload_blob
from tests.imaging.test_registry_server import token_of

pytestmark = pytest.mark.django_db(transaction=True)

SBOM = "application/vnd.example.sbom.v1+json"
EMPTY = b"{}"


def artifact_about(subject: str, size: int, artifact_type: str, note: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest_of(EMPTY),
                "size": 2,
            },
            "layers": [],
            "subject": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": subject,
                "size": size,
            },
            "annotations": {"org.example.note": note},
        }
    ).encode()


def test_it_lists_an_images_referrers_to_those_who_may_pull_it(world: World, registry_server: str) -> None:
    alice = ("alice", token_of(world, "alice"))
    image = build_image(busybox_layers())
    assert push_by_http(registry_server, alice, "acme/app", "1", image).status_code == 201
    assert upload_blob(registry_server, alice, "acme/app", EMPTY).status_code == 201
    subject = digest_of(image.manifest)
    sbom = artifact_about(subject, len(image.manifest), SBOM, "the sbom")
    signature = artifact_about(subject, len(image.manifest), "application/vnd.example.signature", "signed")
    for body in (sbom, signature):
        pushed = httpx.put(
            f"http://{registry_server}/v2/acme/app/manifests/{digest_of(body)}",
            content=body,
            auth=alice,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert pushed.status_code == 201, pushed.text
        assert pushed.headers["OCI-Subject"] == subject

    url = f"http://{registry_server}/v2/acme/app/referrers/{subject}"
    listed = httpx.get(url, auth=("mia", token_of(world, "mia")))
    assert listed.status_code == 200
    assert {m["digest"] for m in listed.json()["manifests"]} == {digest_of(sbom), digest_of(signature)}
    filtered = httpx.get(url, params={"artifactType": SBOM}, auth=alice)
    assert [m["digest"] for m in filtered.json()["manifests"]] == [digest_of(sbom)]
    assert filtered.json()["manifests"][0]["annotations"] == {"org.example.note": "the sbom"}
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"

    # Another tenant learns nothing: refused like a repository that does not exist.
    theirs = httpx.get(url, auth=("bob", token_of(world, "bob")))
    missing = httpx.get(
        f"http://{registry_server}/v2/acme/nothing/referrers/{subject}", auth=("bob", token_of(world, "bob"))
    )
    assert theirs.status_code == missing.status_code and theirs.status_code in (401, 403, 404)
    assert digest_of(sbom) not in theirs.text


@pytest.mark.django_db
def test_it_shows_every_image_its_pull_reference_and_the_login_line(world: World) -> None:
    from django.test import Client

    from tests.conftest import client_for
    from tests.imaging.images import db_image

    image = db_image(world.acme, "tools/app", "2")
    body = client_for(world, "mia").get(f"/api/v1/images/{image.pk}/").json()  # type: ignore[attr-defined]
    assert body["pull_reference"] == "testserver/acme/tools/app:2"
    browser = Client()
    browser.force_login(world.user("mia"))
    page = browser.get(f"/images/{image.pk}/").content.decode()  # type: ignore[attr-defined]
    assert "testserver/acme/tools/app:2" in page and "podman login testserver -u mia" in page
