"""The repositories page: a tenant's repositories with tags, sizes and the layers they share, and
nothing of another tenant's."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from imaging.models import RegistryBlob, RegistryManifest, RegistryTag
from tests.conftest import World
from tests.imaging.images import db_image, digest_of

pytestmark = pytest.mark.django_db


def page(world: World, persona: str, tenant: object) -> tuple[int, str]:
    browser = Client()
    browser.force_login(world.user(persona))
    response = browser.get(reverse("repositories", kwargs={"pk": tenant.pk}))  # type: ignore[attr-defined]
    return response.status_code, response.content.decode()


def card(html: str, repository: str) -> str:
    (found,) = [part for part in html.split("<section") if f"<code>{repository}</code></h2>" in part]
    return found


def test_it_lists_each_repository_with_its_tags_sizes_and_the_layers_it_shares(world: World) -> None:
    db_image(world.acme, "web", "1", ("base", "web-1"))
    db_image(world.acme, "web", "2", ("base", "web-2"))
    db_image(world.acme, "worker", "1", ("base", "worker"))
    db_image(world.acme, "lonely", "1", ("lonely",))

    status, html = page(world, "vic", world.acme)

    assert status == 200
    assert "Repositories of Acme" in html
    web = card(html, "web")
    assert "2 tags, 3 layers, 300\xa0bytes" in web  # base counted once
    assert "Shares 1 layer (100\xa0bytes) with <code>worker</code>" in web
    assert "testserver/acme/web:1" in web and "data-copy-target" in web
    lonely = card(html, "lonely")
    assert "No layer shared" in lonely
    assert "podman login testserver -u vic" in html


def test_it_never_tells_that_another_tenant_holds_the_same_layer(world: World) -> None:
    db_image(world.acme, "app", "1", ("common",))
    db_image(world.globex, "globex-secret-app", "1", ("common",))

    status, html = page(world, "mia", world.acme)

    assert status == 200
    assert "globex" not in html
    assert "No layer shared" in html


def test_it_shows_a_pushed_artifact_tag_with_its_proved_blob_sizes(world: World) -> None:
    config, blob = digest_of(b"cfg"), digest_of(b"sbom")
    RegistryBlob.objects.create(tenant=world.acme, repository="sboms", digest=blob, size=4321)
    manifest = RegistryManifest.objects.create(
        tenant=world.acme,
        repository="sboms",
        digest=digest_of(b"manifest"),
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=300,
        references=[config, blob],
    )
    RegistryTag.objects.create(tenant=world.acme, repository="sboms", tag="v1", manifest=manifest)

    _, html = page(world, "mia", world.acme)

    assert "<code>sboms</code>" in html and "artifact" in html and "4.2\xa0KB" in html


def test_it_answers_404_for_another_tenants_repositories(world: World) -> None:
    db_image(world.acme, "private-app", "1")

    assert page(world, "bob", world.acme)[0] == 404
    assert page(world, "mia", world.globex)[0] == 404
    status, html = page(world, "oscar", world.acme)
    assert status == 200 and "private-app" in html
