"""Roles, tokens and the audit log, each behaviour a test."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tenants.models import ApiToken, AuditEntry, Membership
from tenants.tokens import hash_token
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db


def test_it_stores_only_a_hash_of_the_token(world: World) -> None:
    secret = world.tokens["bob"]
    token = ApiToken.objects.get(user=world.user("bob"))
    assert token.secret_hash == hash_token(secret)
    assert secret not in str(ApiToken.objects.values_list().get(pk=token.pk))


def test_it_shows_the_secret_once(world: World) -> None:
    client = client_for(world, "alice")
    created = client.post("/api/v1/tokens/", {"name": "ci"}, format="json")
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert secret.startswith("bh_")
    listed = client.get("/api/v1/tokens/").json()["results"]
    assert all("secret" not in row for row in listed)
    detail = client.get(f"/api/v1/tokens/{created.json()['id']}/").json()
    assert "secret" not in detail


def test_it_authenticates_with_a_bearer_token_and_records_last_use(world: World) -> None:
    response = client_for(world, "bob").get("/api/v1/tenants/")
    assert response.status_code == 200
    assert [t["name"] for t in response.json()["results"]] == ["globex"]
    assert ApiToken.objects.get(user=world.user("bob")).last_used_at is not None


def test_it_refuses_a_revoked_token(world: World) -> None:
    bob = client_for(world, "bob")
    token_id = ApiToken.objects.get(user=world.user("bob")).pk
    assert bob.delete(f"/api/v1/tokens/{token_id}/").status_code == 204
    response = bob.get("/api/v1/tenants/")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Token revoked."


def test_it_refuses_an_expired_token(world: World) -> None:
    ApiToken.objects.filter(user=world.user("bob")).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client_for(world, "bob").get("/api/v1/tenants/").status_code == 401


def test_it_keeps_a_read_only_token_from_writing(world: World) -> None:
    mia = client_for(world, "mia_readonly")
    assert mia.get("/api/v1/tenants/").status_code == 200
    response = mia.post("/api/v1/tokens/", {"name": "escalate"}, format="json")
    assert response.status_code == 403
    assert AuditEntry.objects.filter(action="token.create", outcome="denied").exists()


def test_it_scopes_a_token_to_its_tenant(world: World) -> None:
    from tenants.choices import Role

    Membership.objects.create(user=world.user("alice"), tenant=world.globex, role=Role.VIEWER)
    names = [t["name"] for t in client_for(world, "alice_acme").get("/api/v1/tenants/").json()["results"]]
    assert names == ["acme"]
    names = [t["name"] for t in client_for(world, "alice").get("/api/v1/tenants/").json()["results"]]
    assert names == ["acme", "globex"]


def test_it_throttles_repeated_authentication_failures(world: World, settings: object) -> None:
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer bh_deadbeef_nope")
    codes = [client.get("/api/v1/tenants/").status_code for _ in range(22)]
    assert codes[0] == 401
    assert codes[-1] == 429
    assert AuditEntry.objects.filter(action="auth.token", outcome="denied").count() >= 20


def test_it_answers_one_error_shape(world: World) -> None:
    response = client_for(world, "alice").post("/api/v1/memberships/", {"tenant": "x"}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "invalid"
    assert "tenant" in body["error"]["fields"]


def test_it_lets_an_admin_add_a_member_and_audits_it(world: World) -> None:
    response = client_for(world, "amir").post(
        "/api/v1/memberships/",
        {"tenant": str(world.acme.pk), "username": "charlie", "role": "member"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    entry = AuditEntry.objects.get(action="membership.create", details__user="charlie")
    assert entry.tenant_id == world.acme.pk
    assert entry.actor == world.user("amir")


def test_it_does_not_let_an_admin_create_owners(world: World) -> None:
    response = client_for(world, "amir").post(
        "/api/v1/memberships/",
        {"tenant": str(world.acme.pk), "username": "charlie", "role": "owner"},
        format="json",
    )
    assert response.status_code == 403
    assert not Membership.objects.filter(user=world.user("charlie")).exists()


def test_it_keeps_the_last_owner(world: World) -> None:
    membership = Membership.objects.get(user=world.user("alice"), tenant=world.acme)
    response = client_for(world, "alice").patch(
        f"/api/v1/memberships/{membership.pk}/", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 409
    assert Membership.objects.get(pk=membership.pk).role == "owner"


def test_it_hides_a_foreign_tenants_member_as_404(world: World) -> None:
    membership = Membership.objects.get(user=world.user("bob"))
    response = client_for(world, "alice").patch(
        f"/api/v1/memberships/{membership.pk}/", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 404


def test_it_forbids_a_viewer_to_manage_members_with_403_and_audits_it(world: World) -> None:
    membership = Membership.objects.get(user=world.user("mia"))
    response = client_for(world, "vic").delete(f"/api/v1/memberships/{membership.pk}/")
    assert response.status_code == 403
    assert AuditEntry.objects.filter(outcome="denied", actor=world.user("vic")).exists()


def test_it_keeps_the_audit_log_append_only(world: World) -> None:
    entry = AuditEntry.objects.first()
    assert entry is not None
    with pytest.raises(TypeError):
        entry.save()
    with pytest.raises(TypeError):
        AuditEntry.objects.all().update(action="x")
    with pytest.raises(TypeError):
        AuditEntry.objects.all().delete()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the trigger exists on PostgreSQL only")
def test_it_has_the_database_refuse_audit_changes(world: World) -> None:
    from django.db import DatabaseError, transaction

    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE tenants_auditentry SET action = 'forged'")


def test_it_shows_owners_their_tenants_audit_and_their_own_actions_only(world: World) -> None:
    rows = client_for(world, "bob").get("/api/v1/audit/?page_size=500").json()["results"]
    assert rows
    foreign = [r for r in rows if r["tenant"] != str(world.globex.pk)]
    assert {r["tenant"] for r in rows} <= {str(world.globex.pk), None}
    assert all(r["actor"] == world.user("bob").pk for r in foreign)
    assert not any(r["tenant"] == str(world.acme.pk) for r in rows)


def test_it_shows_members_only_their_own_actions(world: World) -> None:
    rows = client_for(world, "mia").get("/api/v1/audit/").json()["results"]
    assert [(r["action"], r["actor"]) for r in rows] == [("token.create", world.user("mia").pk)]


def test_it_filters_the_audit_log(world: World) -> None:
    rows = client_for(world, "oscar").get("/api/v1/audit/?action=tenant.create&outcome=ok").json()["results"]
    assert {row["details"]["name"] for row in rows} == {"acme", "globex"}
