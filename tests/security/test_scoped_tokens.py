"""An operator's token scoped to one tenant is a member of that tenant only; restricted tokens see themselves.

Written as the holder of a leaked token would act: every request here was answered with operator powers
before (issue 14).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model

from tenants.choices import AuditOutcome
from tenants.models import ApiToken, AuditEntry
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def _api(world: World, persona: str) -> Any:
    return client_for(world, persona)


def test_it_refuses_a_staff_account_to_an_operators_token_scoped_to_a_tenant(world: World) -> None:
    response = _api(world, "oscar_acme").post(
        "/api/v1/users/",
        {"username": "mallory", "password": "long enough password", "is_staff": True},
        format="json",
    )
    assert response.status_code == 403
    assert not get_user_model().objects.filter(username="mallory").exists()
    denial = AuditEntry.objects.filter(outcome=AuditOutcome.DENIED).latest("id")
    assert denial.tenant_id == world.acme.pk


def test_it_refuses_host_join_tokens_to_a_scoped_operator_token(world: World) -> None:
    response = _api(world, "oscar_acme").post(
        "/api/v1/hosts/join-tokens/", {"host_name": "evil"}, format="json"
    )
    assert response.status_code == 403
    assert "token" not in response.json()


def test_it_hides_hosts_from_a_scoped_operator_token(world: World) -> None:
    from compute.models import Host

    host = Host.objects.create(name="h1")
    client = _api(world, "oscar_acme")
    assert client.get("/api/v1/hosts/").json()["count"] == 0
    response = client.patch(f"/api/v1/hosts/{host.pk}/", {"state": "maintenance"}, format="json")
    assert response.status_code == 404
    host.refresh_from_db()
    assert host.state != "maintenance"


def test_it_refuses_publishing_images_to_a_scoped_operator_token(world: World) -> None:
    image = db_image(world.acme, "app")
    response = _api(world, "oscar_acme").post(
        f"/api/v1/images/{image.pk}/publish/", {"name": "app", "tag": "public"}, format="json"
    )
    assert response.status_code == 403
    from imaging.models import Image

    assert not Image.objects.filter(tenant__isnull=True, name="app").exists()


def test_it_refuses_store_gc_and_tenant_creation_to_a_scoped_operator_token(world: World) -> None:
    client = _api(world, "oscar_acme")
    assert client.post("/api/v1/store/gc/", {}, format="json").status_code == 403
    assert client.post("/api/v1/tenants/", {"name": "evil"}, format="json").status_code == 403


def test_it_shows_a_scoped_operator_token_no_other_tenant(world: World) -> None:
    client = _api(world, "oscar_acme")
    names = {t["name"] for t in client.get("/api/v1/tenants/").json()["results"]}
    assert names == {"acme"}
    assert client.get(f"/api/v1/tenants/{world.globex.pk}/").status_code == 404
    assert client.get(f"/api/v1/users/{world.user('bob').pk}/").status_code == 404
    usernames = {u["username"] for u in client.get("/api/v1/users/").json()["results"]}
    assert usernames == {"oscar"}


@pytest.mark.parametrize("persona", ["oscar_acme", "oscar_readonly", "alice_acme", "mia_readonly"])
def test_it_shows_a_restricted_token_only_itself(world: World, persona: str) -> None:
    client = _api(world, persona)
    listed = client.get("/api/v1/tokens/").json()["results"]
    prefix = world.tokens[persona].split("_")[1]
    assert [t["prefix"] for t in listed] == [prefix]


def test_it_refuses_a_scoped_operator_token_to_revoke_another_tenants_owners_token(world: World) -> None:
    bobs = ApiToken.objects.get(user__username="bob")
    response = _api(world, "oscar_acme").delete(f"/api/v1/tokens/{bobs.pk}/")
    assert response.status_code == 404
    bobs.refresh_from_db()
    assert bobs.revoked_at is None


def test_it_refuses_an_operators_read_only_token_to_revoke_other_tokens(world: World) -> None:
    bobs = ApiToken.objects.get(user__username="bob")
    assert _api(world, "oscar_readonly").delete(f"/api/v1/tokens/{bobs.pk}/").status_code == 404
    bobs.refresh_from_db()
    assert bobs.revoked_at is None


def test_it_lets_a_restricted_token_revoke_itself(world: World) -> None:
    client = _api(world, "mia_readonly")
    own = client.get("/api/v1/tokens/").json()["results"][0]
    assert client.delete(f"/api/v1/tokens/{own['id']}/").status_code == 204
    assert client.get("/api/v1/tokens/").status_code == 401


def test_it_answers_me_within_the_tokens_scope(world: World) -> None:
    from tenants.choices import Role
    from tenants.models import Membership

    Membership.objects.create(user=world.user("alice"), tenant=world.globex, role=Role.VIEWER)
    me = _api(world, "alice_acme").get("/api/v1/users/me/").json()
    assert [m["tenant_name"] for m in me["memberships"]] == ["acme"]


def test_it_lets_an_operators_read_only_token_read_but_not_change_hosts(world: World) -> None:
    from compute.models import Host

    host = Host.objects.create(name="h1")
    client = _api(world, "oscar_readonly")
    assert client.get(f"/api/v1/hosts/{host.pk}/").status_code == 200
    assert client.patch(f"/api/v1/hosts/{host.pk}/", {"state": "maintenance"}, format="json").status_code in (
        403,
        404,
    )
    host.refresh_from_db()
    assert host.state != "maintenance"
    assert (
        client.post("/api/v1/users/", {"username": "x", "password": "p" * 12}, format="json").status_code
        == 403
    )
