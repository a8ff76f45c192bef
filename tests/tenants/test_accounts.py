"""Accounts: your own password, deactivated users stop at once, tenants deleted only when empty."""

from __future__ import annotations

import pytest
from django.test import Client

from compute.models import Host, Workload
from tenants.models import AuditEntry, Tenant
from tests.conftest import PASSWORD, World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a much longer new passphrase"


def test_it_changes_your_own_password_when_the_old_one_is_right(world: World) -> None:
    client = client_for(world, "alice")
    response = client.post(
        "/api/v1/users/me/password/", {"old_password": PASSWORD, "new_password": NEW_PASSWORD}, format="json"
    )
    assert response.status_code == 204
    alice = world.user("alice")
    alice.refresh_from_db()
    assert alice.check_password(NEW_PASSWORD)
    assert AuditEntry.objects.filter(action="user.password_change", outcome="ok", actor=alice).exists()


def test_it_refuses_a_password_change_with_a_wrong_old_password_and_audits_it(world: World) -> None:
    client = client_for(world, "alice")
    response = client.post(
        "/api/v1/users/me/password/", {"old_password": "guess", "new_password": NEW_PASSWORD}, format="json"
    )
    assert response.status_code == 400
    alice = world.user("alice")
    alice.refresh_from_db()
    assert alice.check_password(PASSWORD)
    assert AuditEntry.objects.filter(action="user.password_change", outcome="denied", actor=alice).exists()


def test_it_ends_a_deactivated_users_sessions_and_tokens_at_once(world: World) -> None:
    browser = Client()
    assert browser.login(username="bob", password=PASSWORD)
    assert browser.get("/api/v1/users/me/").status_code == 200
    token_client = client_for(world, "bob")  # bob's API token
    assert token_client.get("/api/v1/users/me/").status_code == 200
    response = client_for(world, "oscar").post(f"/api/v1/users/{world.user('bob').pk}/deactivate/")
    assert response.status_code == 200 and response.json()["is_active"] is False
    assert browser.get("/api/v1/users/me/").status_code in (401, 403)
    assert token_client.get("/api/v1/users/me/").status_code == 401
    assert not Client().login(username="bob", password=PASSWORD)
    assert AuditEntry.objects.filter(action="user.update", outcome="ok", details__is_active=False).exists()
    client_for(world, "oscar").post(f"/api/v1/users/{world.user('bob').pk}/activate/")
    assert Client().login(username="bob", password=PASSWORD)
    assert token_client.get("/api/v1/users/me/").status_code == 401  # revoked for good, not paused


def test_it_lets_only_operators_deactivate_users(world: World) -> None:
    response = client_for(world, "alice").post(f"/api/v1/users/{world.user('alice').pk}/deactivate/")
    assert response.status_code == 403
    assert world.user("alice").is_active


def test_it_refuses_to_delete_a_tenant_that_owns_workloads_and_names_them(world: World) -> None:
    host = Host.objects.create(name="accounts-host", cpus=2, memory_mib=2048)
    image = db_image(world.globex, "app")
    Workload.objects.create(tenant=world.globex, name="billing", image=image, host=host, state="stopped")
    response = client_for(world, "oscar").delete(f"/api/v1/tenants/{world.globex.pk}/")
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert "billing" in message and "app" in message
    assert Tenant.objects.filter(pk=world.globex.pk).exists()
    assert AuditEntry.objects.filter(action="tenant.delete", outcome="denied").exists()


def test_it_deletes_an_empty_tenant(world: World) -> None:
    empty = Tenant.objects.create(name="empty", display_name="Empty")
    assert client_for(world, "oscar").delete(f"/api/v1/tenants/{empty.pk}/").status_code == 204
    assert not Tenant.objects.filter(pk=empty.pk).exists()
