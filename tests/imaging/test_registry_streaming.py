"""Upload bodies stream into the store while they arrive (daphne no longer buffers them whole first), a
refusal is answered while the client still sends, and the hash taken while writing is trusted only for
the bytes it saw."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imaging.services import get_store
from tenants.models import Quota
from tests.conftest import World
from tests.imaging.images import digest_of
from tests.imaging.test_registry_server import token_of
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024


def start_upload(registry: str, auth: tuple[str, str], name: str) -> tuple[str, Path]:
    started = httpx.post(f"http://{registry}/v2/{name}/blobs/uploads/", auth=auth)
    assert started.status_code == 202, started.text
    upload_id = started.headers["docker-upload-uuid"]
    return (
        f"http://{registry}{started.headers['location']}",
        get_store().root / "ingest" / f"registry-{upload_id}",
    )


def test_it_writes_an_upload_to_its_file_while_the_client_is_still_sending(
    world: World, registry_server: str
) -> None:
    auth = ("mia", token_of(world, "mia"))
    location, upload_file = start_upload(registry_server, auth, "acme/streamed")
    first, second = b"a" * (4 * MIB), b"b" * (4 * MIB)

    def body() -> Iterator[bytes]:
        yield first
        # The rest is sent only once the server wrote the first part: a server that waits for the
        # whole body before the registry sees a byte never gets there.
        wait_until(lambda: upload_file.stat().st_size >= MIB, timeout=20, what="the first bytes on disk")
        yield second

    patched = httpx.patch(location, content=body(), auth=auth, timeout=60)

    assert patched.status_code == 202, patched.text
    assert patched.headers["range"] == f"0-{len(first) + len(second) - 1}"
    finished = httpx.put(location, params={"digest": digest_of(first + second)}, auth=auth)
    assert finished.status_code == 201, finished.text
    assert get_store().blob_path(digest_of(first + second)).read_bytes() == first + second


def test_it_refuses_an_upload_beyond_the_quota_while_the_client_is_still_sending(
    world: World, registry_server: str
) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=2 * MIB)
    auth = ("mia", token_of(world, "mia"))
    location, upload_file = start_upload(registry_server, auth, "acme/toolarge")

    def body() -> Iterator[bytes]:
        for _ in range(24):
            yield b"x" * MIB

    refused = httpx.patch(location, content=body(), auth=auth, timeout=60)

    assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == "DENIED"
    assert not upload_file.exists()
    # The connection's next request is understood: the refused body did not spill into it.
    with httpx.Client(auth=auth) as client:
        client.get(f"http://{registry_server}/v2/")
        again = client.post(f"http://{registry_server}/v2/acme/toolarge/blobs/uploads/")
        assert again.status_code == 202


def test_it_hashes_an_upload_again_when_its_file_grew_behind_the_writer(
    world: World, registry_server: str
) -> None:
    auth = ("mia", token_of(world, "mia"))
    location, upload_file = start_upload(registry_server, auth, "acme/tampered")
    sent = b"s" * (2 * MIB)
    assert httpx.patch(location, content=sent, auth=auth).status_code == 202
    with upload_file.open("ab") as out:
        out.write(b"appended by something else")
    whole = sent + b"appended by something else"

    wrong = httpx.put(location, params={"digest": digest_of(sent)}, auth=auth)

    assert wrong.status_code == 400 and wrong.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert not get_store().blob_path(digest_of(sent)).exists()
    location, upload_file = start_upload(registry_server, auth, "acme/tampered")
    assert httpx.patch(location, content=sent, auth=auth).status_code == 202
    with upload_file.open("ab") as out:
        out.write(b"appended by something else")
    right = httpx.put(location, params={"digest": digest_of(whole)}, auth=auth)
    assert right.status_code == 201, right.text
    assert get_store().blob_path(digest_of(whole)).read_bytes() == whole
