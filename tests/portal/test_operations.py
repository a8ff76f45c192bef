"""Operations end to end: a real Celery worker process, a real Redis broker, events over the websocket."""

from __future__ import annotations

import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client

from portal.asgi import application
from portal.events import publish
from portal.models import Operation
from tests.conftest import World, client_for
from tests.processes import celery_worker, wait_until


def session_headers(user: Any) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    return [(b"origin", b"http://testserver"), (b"host", b"testserver"), (b"cookie", cookie.encode())]


@pytest.mark.django_db(transaction=True)
def test_it_runs_an_operation_through_a_real_worker(world: World) -> None:
    with celery_worker():
        response = client_for(world, "oscar").post(
            "/api/v1/operations/selfcheck/", {"steps": 2}, format="json"
        )
        assert response.status_code == 202
        op_id = response.json()["id"]
        op = wait_until(
            lambda: Operation.objects.filter(pk=op_id, state__in=["succeeded", "failed"]).first(),
            timeout=60,
            what="the self-check to finish",
        )
    assert op.state == "succeeded", op.error
    assert op.progress == 100
    assert op.result["broker"] == "ok"
    assert op.result["database"] in {"postgresql", "sqlite"}
    assert op.started_at is not None and op.finished_at is not None


@pytest.mark.django_db(transaction=True)
def test_it_streams_progress_over_the_websocket(world: World) -> None:
    async def watch(headers: list[tuple[bytes, bytes]], start: Any) -> list[dict[str, Any]]:
        ws = WebsocketCommunicator(application, "/ws/events/", headers=headers)
        connected, _ = await ws.connect()
        assert connected
        op_id = await start()
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1].get("state") not in ("succeeded", "failed"):
            event = await ws.receive_json_from(timeout=60)
            if event.get("id") == op_id:
                seen.append(event)
        await ws.disconnect()
        return seen

    from channels.db import database_sync_to_async

    @database_sync_to_async
    def start() -> str:
        response = client_for(world, "oscar").post(
            "/api/v1/operations/selfcheck/", {"steps": 3}, format="json"
        )
        return str(response.json()["id"])

    with celery_worker():
        events = async_to_sync(watch)(session_headers(world.user("oscar")), start)
    states = [e["state"] for e in events]
    progress = [e["progress"] for e in events if e["state"] == "running"]
    assert states[-1] == "succeeded"
    assert "running" in states
    assert progress == sorted(progress) and len(set(progress)) >= 3


@pytest.mark.django_db(transaction=True)
def test_it_never_sends_a_tenant_b_event_to_tenant_a(world: World) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        alice = WebsocketCommunicator(application, "/ws/events/", headers=alice_headers)
        bob = WebsocketCommunicator(application, "/ws/events/", headers=bob_headers)
        assert (await alice.connect())[0] and (await bob.connect())[0]
        await database_sync_to_async(publish)(world.globex.pk, {"type": "test", "secret": "globex"})
        await database_sync_to_async(publish)(world.acme.pk, {"type": "test", "secret": "acme"})
        got_bob = [await bob.receive_json_from(timeout=5)]
        got_alice = [await alice.receive_json_from(timeout=5)]
        assert await alice.receive_nothing(timeout=0.5)
        assert await bob.receive_nothing(timeout=0.5)
        await alice.disconnect()
        await bob.disconnect()
        return got_alice, got_bob

    from channels.db import database_sync_to_async

    alice_headers = session_headers(world.user("alice"))
    bob_headers = session_headers(world.user("bob"))
    got_alice, got_bob = async_to_sync(scenario)()
    assert [e["secret"] for e in got_alice] == ["acme"]
    assert [e["secret"] for e in got_bob] == ["globex"]


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_websocket_from_another_origin(world: World) -> None:
    headers = [h for h in session_headers(world.user("alice")) if h[0] != b"origin"]

    async def scenario() -> bool:
        ws = WebsocketCommunicator(
            application, "/ws/events/", headers=[*headers, (b"origin", b"http://evil.test")]
        )
        connected, _ = await ws.connect()
        return connected

    assert async_to_sync(scenario)() is False


@pytest.mark.django_db(transaction=True)
def test_it_refuses_an_anonymous_websocket() -> None:
    async def scenario() -> bool:
        ws = WebsocketCommunicator(
            application, "/ws/events/", headers=[(b"origin", b"http://testserver"), (b"host", b"testserver")]
        )
        connected, _ = await ws.connect()
        return connected

    assert async_to_sync(scenario)() is False


@pytest.mark.django_db(transaction=True)
def test_it_fails_an_operation_whose_worker_was_killed_and_says_why(world: World, settings: Any) -> None:
    from portal import operations
    from tenants.models import AuditEntry

    settings.BULKHEAD_OPERATION_HEARTBEAT_SECONDS = 0.2
    with celery_worker(name="doomed", BULKHEAD_FAILPOINT="operation.claimed") as worker:
        response = client_for(world, "oscar").post(
            "/api/v1/operations/selfcheck/", {"steps": 2}, format="json"
        )
        op_id = response.json()["id"]
        worker.wait(timeout=60)
    assert Operation.objects.get(pk=op_id).state == "running"  # and would stay so for an hour

    failed = wait_until(operations.fail_lost, timeout=10, what="the sweep to call it lost")

    assert failed == [op_id]
    op = Operation.objects.get(pk=op_id)
    assert op.state == "failed" and op.error == operations.LOST_WORKER
    assert AuditEntry.objects.get(action="operation.lost").details == {"kind": "portal.selfcheck"}


@pytest.mark.django_db(transaction=True)
def test_a_running_operation_keeps_its_heartbeat_and_is_not_swept(world: World, settings: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from portal import operations

    settings.BULKHEAD_OPERATION_HEARTBEAT_SECONDS = 0.2
    op = Operation.objects.create(kind="portal.selfcheck", state="running")
    assert operations.claim(op.pk)
    with operations.Heartbeat(op.pk):
        for _ in range(5):  # two and a half seconds: many heartbeat periods
            time.sleep(0.5)
            assert operations.fail_lost() == []
    beat = Operation.objects.get(pk=op.pk).heartbeat_at
    assert beat is not None and timezone.now() - beat < timedelta(seconds=1)
    # Once nobody renews it, four missed heartbeats later it is lost.
    assert operations.fail_lost(now=beat + timedelta(seconds=1)) == [str(op.pk)]
