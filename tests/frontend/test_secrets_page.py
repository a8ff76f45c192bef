"""The secrets page: admins add and replace values that no page shows again; every role sees "set"."""

from __future__ import annotations

import pytest
from django.test import Client

from tenants.models import Secret
from tests.conftest import World

pytestmark = pytest.mark.django_db

VALUE = "page-s3cret-value"


def browser_for(world: World, username: str) -> Client:
    browser = Client()
    browser.force_login(world.user(username))
    return browser


def test_it_lets_an_admin_add_and_replace_a_secret_without_ever_showing_it(world: World) -> None:
    alice = browser_for(world, "alice")
    added = alice.post(
        "/secrets/create/", {"name": "db-password", "value": VALUE}, headers={"HX-Request": "true"}
    )
    assert added.status_code == 200
    assert "db-password" in added.content.decode() and VALUE not in added.content.decode()
    secret = Secret.objects.get(tenant=world.acme, name="db-password")
    replaced = alice.post(f"/secrets/{secret.pk}/value/", {"value": "other-value"})
    assert replaced.status_code == 302
    for username in ("alice", "mia", "vic"):
        page = browser_for(world, username).get("/secrets/").content.decode()
        assert "db-password" in page and ">set<" in page
        assert VALUE not in page and "other-value" not in page
    assert "Add a secret" not in browser_for(world, "mia").get("/secrets/").content.decode()


def test_it_shows_a_clear_error_for_a_bad_name_and_keeps_nothing(world: World) -> None:
    response = browser_for(world, "alice").post("/secrets/create/", {"name": "Not A Label", "value": VALUE})
    assert response.status_code == 422
    assert VALUE not in response.content.decode()  # the value is not filled back into the form
    assert not Secret.objects.exists()
