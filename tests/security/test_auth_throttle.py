"""The auth-failure throttle keys on the trusted client address and the credential, not the proxy."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tenants.models import AuditEntry
from tests.conftest import World

pytestmark = pytest.mark.django_db

PROXY = "10.9.0.2"


@pytest.fixture
def behind_proxy(settings: Any) -> Any:
    settings.BULKHEAD_TRUSTED_PROXIES = ["10.9.0.0/24"]
    settings.BULKHEAD_CLIENT_IP_HEADER = "X-Forwarded-For"
    return settings


def _via_proxy(secret: str, client_ip: str) -> APIClient:
    client = APIClient(REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=client_ip)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_it_does_not_lock_everyone_out_when_one_client_behind_the_proxy_fails(
    world: World, behind_proxy: Any
) -> None:
    attacker = _via_proxy("bh_deadbeef_nope", "192.0.2.66")
    codes = [attacker.get("/api/v1/tenants/").status_code for _ in range(22)]
    assert codes[-1] == 429
    assert _via_proxy(world.tokens["bob"], "192.0.2.7").get("/api/v1/tenants/").status_code == 200


def test_it_does_not_lock_other_tokens_out_when_one_user_sends_a_stale_token(
    world: World, behind_proxy: Any
) -> None:
    stale = world.tokens["bob"][:-4] + "XXXX"  # bob's prefix, wrong secret
    office = "192.0.2.10"
    codes = [_via_proxy(stale, office).get("/api/v1/tenants/").status_code for _ in range(22)]
    assert codes[-1] == 429
    # Another user in the same office (same client address) is not affected.
    assert _via_proxy(world.tokens["alice_acme"], office).get("/api/v1/tenants/").status_code == 200


def test_it_ignores_a_forwarded_header_from_an_untrusted_peer(world: World, behind_proxy: Any) -> None:
    client = APIClient(REMOTE_ADDR="198.51.100.9")
    for i in range(22):
        # A client rotating a forged X-Forwarded-For still lands in its own bucket.
        client.credentials(HTTP_AUTHORIZATION="Bearer bh_deadbeef_nope", HTTP_X_FORWARDED_FOR=f"192.0.2.{i}")
        last = client.get("/api/v1/tenants/").status_code
    assert last == 429
    assert AuditEntry.objects.filter(action="auth.token", source_address="198.51.100.9").count() >= 20


def test_it_records_the_forwarded_client_address_in_the_audit_log(world: World, behind_proxy: Any) -> None:
    _via_proxy("bh_deadbeef_nope", "203.0.113.5, 192.0.2.44").get("/api/v1/tenants/")
    entry = AuditEntry.objects.filter(action="auth.token").latest("id")
    assert entry.source_address == "192.0.2.44"


def test_it_throttles_sign_in_per_username_so_one_user_does_not_lock_out_the_office(
    world: World, behind_proxy: Any
) -> None:
    from django.test import Client

    from tests.conftest import PASSWORD

    office = {"REMOTE_ADDR": PROXY, "HTTP_X_FORWARDED_FOR": "192.0.2.20"}
    browser = Client(**office)
    for _ in range(21):
        browser.post("/login/", {"username": "alice", "password": "wrong password!"})
    refused = browser.post("/login/", {"username": "alice", "password": PASSWORD})
    assert refused.status_code == 200  # the form again, throttled
    colleague = Client(**office).post("/login/", {"username": "bob", "password": PASSWORD})
    assert colleague.status_code == 302
