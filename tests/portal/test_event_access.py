"""A live event socket follows its user's access as it changes: a removed member stops receiving their
former tenant's events at once, a new member starts, a deactivated account or an ended session is cut
off, and a change nobody announced is caught by the periodic re-check."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from portal.asgi import application
from portal.events import publish
from tenants.models import Membership
from tests.conftest import PASSWORD, World, client_for
from tests.portal.test_operations import session_headers

pytestmark = pytest.mark.django_db(transaction=True)


async def connected(headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    ws = WebsocketCommunicator(application, "/ws/events/", headers=headers)
    ok, _ = await ws.connect()
    assert ok
    return ws


async def secrets_received(ws: WebsocketCommunicator, timeout: float = 1.0) -> list[str]:
    """The `secret` of every test event the socket gets until it has been quiet for `timeout`."""
    seen: list[str] = []
    while not await ws.receive_nothing(timeout=timeout):
        message = await ws.receive_output(timeout=1)
        if message["type"] == "websocket.close":
            seen.append("<closed>")
            break
        if '"secret"' in message.get("text", ""):
            seen.append(json.loads(message["text"])["secret"])
    return seen


def publish_to(tenant: Any, secret: str) -> Any:
    return database_sync_to_async(publish)(tenant.pk, {"type": "test", "secret": secret})


def membership(world: World, username: str) -> Membership:
    return Membership.objects.get(user=world.user(username), tenant=world.acme)


def test_it_stops_sending_a_tenants_events_to_a_member_removed_while_connected(world: World) -> None:
    mia = session_headers(world.user("mia"))
    mias_membership = membership(world, "mia")

    async def scenario() -> tuple[list[str], list[str]]:
        ws = await connected(mia)
        await publish_to(world.acme, "before")
        before = await secrets_received(ws)
        response = await database_sync_to_async(client_for(world, "alice").delete)(
            f"/api/v1/memberships/{mias_membership.pk}/"
        )
        assert response.status_code == 204, response.content
        await publish_to(world.acme, "after")
        after = await secrets_received(ws)
        await ws.disconnect()
        return before, after

    before, after = async_to_sync(scenario)()
    assert before == ["before"]
    assert after == []


def test_it_starts_sending_a_tenants_events_to_a_member_added_while_connected(world: World) -> None:
    charlie = session_headers(world.user("charlie"))

    async def scenario() -> tuple[list[str], list[str]]:
        ws = await connected(charlie)
        await publish_to(world.acme, "before")
        before = await secrets_received(ws)
        response = await database_sync_to_async(client_for(world, "alice").post)(
            "/api/v1/memberships/",
            {"tenant": str(world.acme.pk), "username": "charlie", "role": "viewer"},
            format="json",
        )
        assert response.status_code == 201, response.content
        # The socket joins when it has looked again (an event sent in between is not for it yet).
        after: list[str] = []
        for _ in range(25):
            await publish_to(world.globex, "not charlie's")
            await publish_to(world.acme, "after")
            after += await secrets_received(ws, timeout=0.2)
            if after:
                break
        await ws.disconnect()
        return before, after

    before, after = async_to_sync(scenario)()
    assert before == []
    assert after and set(after) == {"after"}


def test_it_closes_the_socket_of_a_deactivated_account(world: World) -> None:
    mia = session_headers(world.user("mia"))

    async def scenario() -> list[str]:
        ws = await connected(mia)
        response = await database_sync_to_async(client_for(world, "oscar").post)(
            f"/api/v1/users/{world.user('mia').pk}/deactivate/"
        )
        assert response.status_code == 200, response.content
        await publish_to(world.acme, "after")
        return await secrets_received(ws)

    assert async_to_sync(scenario)() == ["<closed>"]


def test_it_closes_the_socket_of_a_session_whose_password_changed_elsewhere(world: World) -> None:
    mia = session_headers(world.user("mia"))

    async def scenario() -> list[str]:
        ws = await connected(mia)
        response = await database_sync_to_async(client_for(world, "mia").post)(
            "/api/v1/users/me/password/",
            {"old_password": PASSWORD, "new_password": "a-new-long-passphrase"},
            format="json",
        )
        assert response.status_code in (200, 204), response.content
        await publish_to(world.acme, "after")
        return await secrets_received(ws)

    assert async_to_sync(scenario)() == ["<closed>"]


def test_it_catches_a_change_nobody_announced_at_the_next_recheck(world: World, settings: Any) -> None:
    settings.BULKHEAD_EVENTS_RECHECK_SECONDS = 0.3
    mia = session_headers(world.user("mia"))
    mias_membership = membership(world, "mia")

    async def scenario() -> list[str]:
        ws = await connected(mia)
        await publish_to(world.acme, "before")
        assert await secrets_received(ws) == ["before"]
        # Gone behind the services' back (a restore, a lost notice): no announcement reaches the socket.
        await database_sync_to_async(mias_membership.delete)()
        await asyncio.sleep(1.0)
        await publish_to(world.acme, "after")
        seen = await secrets_received(ws)
        await ws.disconnect()
        return seen

    assert async_to_sync(scenario)() == []
