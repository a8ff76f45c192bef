"""The push side played by an attacker with push rights (found in review): a manifest that says one
thing and carries another, manifests that fill the disk without quota, and parallel uploads that each
take the whole room."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from imaging.models import Image, TenantLayer
from tenants.models import Quota
from tests.conftest import World
from tests.imaging.images import build_image, busybox_layers
from tests.imaging.test_registry_push import push_by_http
from tests.imaging.test_registry_server import token_of

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024


def test_it_refuses_a_manifest_that_claims_to_be_an_index_to_take_another_tenants_layers(
    world: World, registry_server: str
) -> None:
    alice = ("alice", token_of(world, "alice"))
    image = build_image(busybox_layers("private"))
    assert push_by_http(registry_server, alice, "acme/private", "1", image).status_code == 201
    # Bob knows the digests (a leaked manifest) and dresses acme's manifest up with an empty index list.
    forged = json.loads(image.manifest)
    forged["manifests"] = []
    body = json.dumps(forged).encode()
    answer = httpx.put(
        f"http://{registry_server}/v2/globex/stolen/manifests/1",
        content=body,
        auth=("bob", token_of(world, "bob")),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert not Image.objects.filter(tenant=world.globex).exists()
    assert not TenantLayer.objects.filter(tenant=world.globex).exists()


def test_it_counts_pushed_manifests_against_the_quota(world: World, registry_server: str) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=2 * MIB)
    mia = ("mia", token_of(world, "mia"))
    answers = []
    for number in range(4):
        padding = json.dumps({"pad": f"{number}" * (1024 * 1024 - 64)})
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
            "annotations": json.loads(padding),
        }
        answers.append(
            httpx.put(
                f"http://{registry_server}/v2/acme/fill/manifests/t{number}",
                content=json.dumps(index).encode(),
                auth=mia,
                headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
            ).status_code
        )
    assert answers[:1] == [201] and 403 in answers, answers  # refused once the quota is used


def test_it_holds_parallel_uploads_to_the_quota_together(world: World, registry_server: str) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=2 * MIB)
    auth = ("mia", token_of(world, "mia"))
    base = f"http://{registry_server}/v2/acme/filler/blobs/uploads/"
    locations = [
        f"http://{registry_server}{httpx.post(base, auth=auth).headers['location']}" for _ in range(6)
    ]
    chunk = b"x" * (2 * MIB - 4096)
    answers: list[int] = []

    def send(url: str) -> None:
        answers.append(
            httpx.patch(
                url,
                content=chunk,
                auth=auth,
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{len(chunk) - 1}"},
                timeout=60,
            ).status_code
        )

    threads = [threading.Thread(target=send, args=(url,)) for url in locations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert answers.count(202) == 1, answers  # the room holds one of them, whichever came first
