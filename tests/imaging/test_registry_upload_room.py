"""An attacker with push rights opens many upload sessions at once: together they never hold more than
the tenant's image storage quota on the host's disk."""

from __future__ import annotations

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
