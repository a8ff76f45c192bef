"""Failed authentication is counted per real client (behind a trusted proxy) and per name tried."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.conftest import World

pytestmark = pytest.mark.django_db

PROXY = "10.9.8.7"


def call(token: str, *, peer: str, forwarded: str = "") -> int:
    client = APIClient(REMOTE_ADDR=peer)
    headers: dict[str, Any] = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    if forwarded:
        headers["HTTP_X_FORWARDED_FOR"] = forwarded
    return int(client.get("/api/v1/users/me/", **headers).status_code)


@pytest.fixture
def behind_proxy(settings: Any) -> None:
    settings.BULKHEAD_TRUSTED_PROXIES = ["10.9.8.0/24"]
    settings.BULKHEAD_CLIENT_IP_HEADER = "X-Forwarded-For"
    settings.BULKHEAD_AUTH_FAILURES_PER_MINUTE = 5


def test_it_does_not_lock_everyone_out_behind_a_proxy(world: World, behind_proxy: None) -> None:
    bad = "bh_deadbeef_" + "x" * 43
    for _ in range(5):
        assert call(bad, peer=PROXY, forwarded="203.0.113.5") == 401
    assert call(bad, peer=PROXY, forwarded="203.0.113.5") == 429
    # Another client behind the same proxy, and another token of the same client, still get in.
    assert call(world.tokens["bob"], peer=PROXY, forwarded="203.0.113.9") == 200
    assert call(world.tokens["bob"], peer=PROXY, forwarded="203.0.113.5") == 200


def test_it_ignores_a_forwarded_header_from_an_untrusted_peer(world: World, behind_proxy: None) -> None:
    bad = "bh_cafebabe_" + "x" * 43
    for i in range(5):
        assert call(bad, peer="198.51.100.2", forwarded=f"203.0.113.{i}") == 401
    assert call(bad, peer="198.51.100.2", forwarded="203.0.113.77") == 429


def test_it_stops_one_client_trying_many_tokens(world: World, behind_proxy: None) -> None:
    statuses = [call(f"bh_{i:08x}_" + "y" * 43, peer=PROXY, forwarded="203.0.113.5") for i in range(26)]
    assert statuses[:25] == [401] * 25
    assert statuses[25] == 429
