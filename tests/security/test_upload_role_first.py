"""The role is checked before an upload's body is read: a viewer's or read-only token's archive never
reaches the disk (written as the refused uploader would act: a real multipart body, the bytes counted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imaging.api.views import StoreUploadHandler
from tenants.models import AuditEntry
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def bytes_streamed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts what the upload handler is handed (a spy: the handler still writes as usual)."""
    seen: list[int] = []
    original = StoreUploadHandler.receive_data_chunk

    def spy(self: Any, raw_data: bytes, start: int) -> Any:
        seen.append(len(raw_data))
        return original(self, raw_data, start)

    monkeypatch.setattr(StoreUploadHandler, "receive_data_chunk", spy)
    return seen


def _upload(world: World, persona: str, tmp_path: Path, query: str = "") -> Any:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"\0" * 256 * 1024)
    with archive.open("rb") as f:
        return client_for(world, persona).post(
            f"/api/v1/images/import/{query}",
            {"name": "x", "tag": "1", "tenant": str(world.acme.pk), "archive": f},
            format="multipart",
        )


@pytest.mark.parametrize("persona", ["vic", "mia_readonly", "oscar_readonly", "charlie"])
def test_it_refuses_an_upload_before_reading_a_byte_of_it(
    world: World, tmp_path: Path, bytes_streamed: list[int], persona: str, settings: Any
) -> None:
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    response = _upload(world, persona, tmp_path)
    assert response.status_code == 403
    assert bytes_streamed == []
    assert not list((tmp_path / "store").rglob("upload-*"))
    assert AuditEntry.objects.filter(outcome="denied").exists()


def test_it_refuses_a_viewer_named_tenant_in_the_query_before_the_body(
    world: World, tmp_path: Path, bytes_streamed: list[int], settings: Any
) -> None:
    from tenants.choices import Role
    from tenants.models import Membership

    # vic may add images elsewhere, but names acme (where she only views) in the query string.
    Membership.objects.create(user=world.user("vic"), tenant=world.globex, role=Role.MEMBER)
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    response = _upload(world, "vic", tmp_path, query=f"?tenant={world.acme.pk}")
    assert response.status_code == 403
    assert bytes_streamed == []
    denial = AuditEntry.objects.filter(outcome="denied").latest("id")
    assert denial.tenant_id == world.acme.pk
