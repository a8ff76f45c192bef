"""The web's HTTP requests reuse their threads, and with them their database connections."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from django.db.backends.signals import connection_created

from portal.asgi_threads import PooledThreadsASGIHandler
from tests.conftest import build_world


def requests_through(handler: Any, token: str, count: int) -> list[int]:
    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [
                (
                    await client.get("/api/v1/tenants/", headers={"Authorization": f"Bearer {token}"})
                ).status_code
                for _ in range(count)
            ]

    return asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_it_serves_consecutive_requests_on_one_database_connection() -> None:
    world = build_world()
    opened: list[Any] = []

    def count(sender: Any, connection: Any, **_: Any) -> None:
        opened.append(connection.alias)

    handler = PooledThreadsASGIHandler()
    connection_created.connect(count)
    try:
        statuses = requests_through(handler, world.tokens["bob"], 5)
    finally:
        connection_created.disconnect(count)
        handler.close_threads()
    assert statuses == [200] * 5
    # Django's own handler runs each request on a new thread: five requests, five new connections.
    assert opened == ["default"]


@pytest.mark.django_db(transaction=True)
def test_it_answers_requests_in_flight_together_on_threads_of_their_own() -> None:
    world = build_world()
    handler = PooledThreadsASGIHandler()

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            headers = {"Authorization": f"Bearer {world.tokens['alice_acme']}"}
            answers = await asyncio.gather(
                *(client.get("/api/v1/tenants/", headers=headers) for _ in range(4))
            )
            return [answer.status_code for answer in answers]

    try:
        assert asyncio.run(run()) == [200] * 4
        # Each was served; their threads are kept for the next requests, within the bound.
        assert 1 <= len(handler._idle) <= 4
    finally:
        handler.close_threads()
