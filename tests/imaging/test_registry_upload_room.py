"""An attacker with push rights opens many upload sessions at once: together they never hold more than
the tenant's image storage quota on the host's disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tenants.models import Quota
from tests.conftest import World
from tests.imaging.test_registry_server import token_of

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024


def test_it_counts_every_open_upload_session_against_the_quota(world: World, registry_server: str) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=2 * MIB)
    auth = ("mia", token_of(world, "mia"))
    base = f"http://{registry_server}/v2/acme/filler/blobs/uploads/"
    sessions = []
    for _ in range(3):
        started = httpx.post(base, auth=auth)
        assert started.status_code == 202, started.text
        sessions.append(f"http://{registry_server}{started.headers['location']}")
    answers = []
    for index, url in enumerate(sessions):
        chunk = bytes([index]) * (MIB - 4096)
        answers.append(
            httpx.patch(
                url,
                content=chunk,
                auth=auth,
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{len(chunk) - 1}"},
            ).status_code
        )
    # Two sessions of almost 1 MiB fit in 2 MiB; the third would not.
    assert answers[:2] == [202, 202]
    assert answers[2] in (403, 413, 416), answers


def _streamed(url: str, auth: tuple[str, str], size: int, answers: list[int]) -> None:
    """PATCH a body with no Content-Length (chunked, as skopeo and podman send layers), slowly."""

    def body() -> Iterator[bytes]:
        for _ in range(size // MIB):
            time.sleep(0.02)
            yield b"s" * MIB

    answers.append(httpx.patch(url, content=body(), auth=auth, timeout=120).status_code)


def test_it_lets_parallel_streamed_uploads_share_the_room(world: World, registry_server: str) -> None:
    # Found by CI: skopeo streams two layers at once and the first one reserved all the room left.
    Quota.objects.filter(tenant=world.acme).update(image_bytes=100 * MIB)
    auth = ("mia", token_of(world, "mia"))
    base = f"http://{registry_server}/v2/acme/streams/blobs/uploads/"
    urls = [f"http://{registry_server}{httpx.post(base, auth=auth).headers['location']}" for _ in range(2)]
    answers: list[int] = []
    # 40 MiB each: more than one reservation step, so each request also asks for more room midway.
    threads = [threading.Thread(target=_streamed, args=(url, auth, 40 * MIB, answers)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)

    assert answers == [202, 202]
    for url in urls:
        assert httpx.get(url, auth=auth).headers["range"] == f"0-{40 * MIB - 1}"


def test_it_stops_a_streamed_upload_at_the_quota(world: World, registry_server: str) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=3 * MIB)
    auth = ("mia", token_of(world, "mia"))
    started = httpx.post(f"http://{registry_server}/v2/acme/streams/blobs/uploads/", auth=auth)
    url = f"http://{registry_server}{started.headers['location']}"
    answers: list[int] = []

    _streamed(url, auth, 5 * MIB, answers)

    assert answers[0] in (403, 413), answers
    assert httpx.get(url, auth=auth).status_code == 404  # the upload is dropped, nothing kept
