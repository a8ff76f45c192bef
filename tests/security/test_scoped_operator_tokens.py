"""A token scoped to one tenant is a member of that tenant only, operator or not; a restricted token
(scoped or read-only) sees and revokes only itself. Written as the holder of such a token would try."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from compute.models import Host, JoinToken
from tenants import services
from tenants.actors import Actor
from tenants.models import ApiToken, AuditEntry
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def client_with(world: World, persona: str, **options: Any) -> tuple[APIClient, ApiToken]:
    token, secret = services.create_token(actor=Actor(user=world.user(persona)), name="probe", **options)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client, token


def test_it_does_not_let_an_operators_acme_token_create_an_operator(world: World) -> None:
    client, _ = client_with(world, "oscar", tenant=world.acme)
    body = {"username": "mallory", "password": "a long enough password", "is_staff": True}
    assert client.post("/api/v1/users/", body, format="json").status_code == 403
    from django.contrib.auth import get_user_model

    assert not get_user_model().objects.filter(username="mallory").exists()
    assert AuditEntry.objects.filter(outcome="denied", actor=world.user("oscar")).exists()


def test_it_does_not_let_an_operators_acme_token_mint_join_tokens_or_touch_hosts(world: World) -> None:
    host = Host.objects.create(name="infra-1", cpus=4, memory_mib=4096)
    client, _ = client_with(world, "oscar", tenant=world.acme)
    response = client.post("/api/v1/hosts/join-tokens/", {"name": "evil"}, format="json")
    assert response.status_code == 403
    assert not JoinToken.objects.exists()
    assert client.get("/api/v1/hosts/").json()["results"] == []
    assert client.patch(f"/api/v1/hosts/{host.pk}/", {"state": "drained"}, format="json").status_code == 404


def test_it_shows_an_operators_acme_token_no_other_users_or_tokens(world: World) -> None:
    client, token = client_with(world, "oscar", tenant=world.acme)
    users = [user["username"] for user in client.get("/api/v1/users/").json()["results"]]
    assert users == ["oscar"]
    tokens = [row["id"] for row in client.get("/api/v1/tokens/").json()["results"]]
    assert tokens == [str(token.pk)]
    bobs = ApiToken.objects.filter(user=world.user("bob")).first()
    assert bobs is not None
    assert client.post(f"/api/v1/tokens/{bobs.pk}/revoke/").status_code in (404, 405)
    assert client.delete(f"/api/v1/tokens/{bobs.pk}/").status_code in (404, 405)
    bobs.refresh_from_db()
    assert bobs.revoked_at is None


def test_it_does_not_let_an_operators_acme_token_publish_images(world: World) -> None:
    image = db_image(world.acme, "app")
    client, _ = client_with(world, "oscar", tenant=world.acme)
    response = client.post(f"/api/v1/images/{image.pk}/publish/", {"name": "app", "tag": "1"}, format="json")
    assert response.status_code == 403


def test_it_lets_a_read_only_token_see_and_revoke_only_itself(world: World) -> None:
    client, token = client_with(world, "alice", read_only=True)
    other = ApiToken.objects.filter(user=world.user("alice")).exclude(pk=token.pk).first()
    assert other is not None
    assert [row["id"] for row in client.get("/api/v1/tokens/").json()["results"]] == [str(token.pk)]
    assert client.get(f"/api/v1/tokens/{other.pk}/").status_code == 404


def test_it_answers_me_within_the_tokens_scope(world: World) -> None:
    services.add_member(
        actor=Actor(user=world.user("oscar")), tenant=world.globex, username="alice", role="viewer"
    )
    client, _ = client_with(world, "alice", tenant=world.acme)
    memberships = client.get("/api/v1/users/me/").json()["memberships"]
    assert [m["tenant_name"] for m in memberships] == ["acme"]
    assert {
        m["tenant_name"] for m in client_for(world, "alice").get("/api/v1/users/me/").json()["memberships"]
    } == {
        "acme",
        "globex",
    }
