"""Django's admin site is gone: every change goes through audited services; users are edited via the API."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from tenants.models import ApiToken, AuditEntry
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db


def test_it_serves_no_admin_site_even_to_operators(world: World) -> None:
    from django.test import Client

    browser = Client()
    browser.force_login(world.user("oscar"))
    assert browser.get("/django-admin/").status_code == 404
    assert browser.get("/django-admin/auth/user/").status_code == 404


def test_it_lets_an_operator_deactivate_an_account_and_audits_it(world: World) -> None:
    bob = world.user("bob")
    response = client_for(world, "oscar").patch(
        f"/api/v1/users/{bob.pk}/", {"is_active": False}, format="json"
    )
    assert response.status_code == 200
    bob.refresh_from_db()
    assert not bob.is_active
    assert not ApiToken.objects.filter(user=bob, revoked_at__isnull=True).exists()
    assert client_for(world, "bob").get("/api/v1/tenants/").status_code == 401
    entry = AuditEntry.objects.filter(action="user.update").latest("id")
    assert entry.details == {"is_active": False}


def test_it_never_audits_the_new_password(world: World) -> None:
    alice = world.user("alice")
    response = client_for(world, "oscar").patch(
        f"/api/v1/users/{alice.pk}/", {"password": "a brand new secret"}, format="json"
    )
    assert response.status_code == 200
    alice.refresh_from_db()
    assert alice.check_password("a brand new secret")
    entry = AuditEntry.objects.filter(action="user.update").latest("id")
    assert "a brand new secret" not in str(entry.details)


@pytest.mark.parametrize("persona", ["alice", "oscar_acme", "oscar_readonly"])
def test_it_refuses_making_oneself_an_operator_to_non_operators(world: World, persona: str) -> None:
    alice = world.user("alice")
    response = client_for(world, persona).patch(
        f"/api/v1/users/{alice.pk}/", {"is_staff": True}, format="json"
    )
    assert response.status_code in (403, 404)
    assert not get_user_model().objects.get(pk=alice.pk).is_staff
