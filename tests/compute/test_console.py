"""The workload console websocket: single-use tokens bound to user and workload, and live output."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from compute.consumers import _token_key, mint_console_token, redeem_console_token
from compute.models import Host, Workload
from portal.asgi import application
from tests.compute.conftest import finished, workload_in
from tests.compute.host_rpc_helpers import answering
from tests.conftest import World
from tests.imaging.images import db_image

Headers = list[tuple[bytes, bytes]]


def session_headers(user: Any) -> Headers:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    return [(b"origin", b"http://testserver"), (b"host", b"testserver"), (b"cookie", cookie.encode())]


def a_workload(tenant: Any, name: str = "web") -> Workload:
    host = Host.objects.get_or_create(name="console-host", defaults={"cpus": 4, "memory_mib": 4096})[0]
    return Workload.objects.create(tenant=tenant, name=name, image=db_image(tenant, f"img-{name}"), host=host)


def console_path(workload: Workload, token: str) -> str:
    return f"/ws/workloads/{workload.pk}/console/?token={token}"


def try_connect(headers: Headers, path: str) -> tuple[bool, Any]:
    """Connect; on success read the hello and hang up. (accepted, hello or close code)."""

    async def scenario() -> tuple[bool, Any]:
        ws = WebsocketCommunicator(application, path, headers=headers)
        connected, code = await ws.connect()
        if not connected:
            return False, code
        hello = json.loads(await ws.receive_from(timeout=5))
        await ws.disconnect()
        return True, hello

    return async_to_sync(scenario)()


# --- tokens ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_console_token_redeems_once_and_lives_a_minute(world: World) -> None:
    workload = a_workload(world.acme)
    token = mint_console_token(world.user("mia"), workload)
    ttl = cache._cache.get_client().ttl(cache.make_and_validate_key(_token_key(token)))  # type: ignore[attr-defined]
    assert 0 < ttl <= 60
    assert redeem_console_token(token) == {"user": world.user("mia").pk, "workload": str(workload.pk)}
    assert redeem_console_token(token) is None
    assert redeem_console_token("") is None and redeem_console_token("guess") is None


# --- the consumer ---------------------------------------------------------------------------------

ws_db = pytest.mark.django_db(transaction=True)


@ws_db
def test_it_opens_the_console_once_per_token(world: World) -> None:
    workload = a_workload(world.acme)
    headers = session_headers(world.user("mia"))
    token = mint_console_token(world.user("mia"), workload)
    accepted, hello = try_connect(headers, console_path(workload, token))
    assert accepted and hello == {"type": "hello", "mode": "output"}
    assert try_connect(headers, console_path(workload, token)) == (False, 4403)


@ws_db
def test_it_refuses_an_expired_token(world: World) -> None:
    workload = a_workload(world.acme)
    token = mint_console_token(world.user("mia"), workload)
    cache.touch(_token_key(token), 0)  # as Redis does after 60 s
    assert try_connect(session_headers(world.user("mia")), console_path(workload, token)) == (False, 4403)


@ws_db
def test_it_refuses_a_token_minted_for_someone_else_or_another_workload(world: World) -> None:
    workload = a_workload(world.acme)
    other = a_workload(world.acme, "other")
    alices = mint_console_token(world.user("alice"), workload)
    assert try_connect(session_headers(world.user("mia")), console_path(workload, alices)) == (False, 4403)
    for_other = mint_console_token(world.user("mia"), other)
    assert try_connect(session_headers(world.user("mia")), console_path(workload, for_other)) == (False, 4403)


@ws_db
def test_bob_cannot_open_alices_workload_console(world: World) -> None:
    workload = a_workload(world.acme)
    # Even a token bound to bob and this workload (the page would never mint it) opens nothing.
    token = mint_console_token(world.user("bob"), workload)
    assert try_connect(session_headers(world.user("bob")), console_path(workload, token)) == (False, 4404)
    # And the page that mints tokens does not exist for him.
    client = Client()
    client.force_login(world.user("bob"))
    assert client.get(reverse("workload-detail", args=[workload.pk])).status_code == 404
    assert client.post(reverse("workload-console-token", args=[workload.pk])).status_code == 404


@ws_db
def test_a_viewer_cannot_open_a_console(world: World) -> None:
    workload = a_workload(world.acme)
    token = mint_console_token(world.user("vic"), workload)
    assert try_connect(session_headers(world.user("vic")), console_path(workload, token)) == (False, 4404)


@ws_db
def test_it_refuses_anonymous_and_foreign_origins(world: World) -> None:
    workload = a_workload(world.acme)
    token = mint_console_token(world.user("mia"), workload)
    anonymous = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    assert try_connect(anonymous, console_path(workload, token)) == (False, 4401)
    token = mint_console_token(world.user("mia"), workload)
    evil = [h for h in session_headers(world.user("mia")) if h[0] != b"origin"] + [
        (b"origin", b"http://evil.test")
    ]
    accepted, _ = try_connect(evil, console_path(workload, token))
    assert not accepted


# --- end to end: a real container's output arrives over the websocket ----------------------------


@ws_db
def test_it_streams_a_containers_output_as_it_is_written(world: World, busybox: Any, host: Host) -> None:
    client = Client()
    client.force_login(world.user("mia"))
    script = "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done; echo finished"
    response = client.post(
        reverse("workload-create"),
        {
            "name": "ticker",
            "image": str(busybox.pk),
            "isolation": "namespace",
            "command": f"/bin/sh -c '{script}'",
            "vcpus": "0.5",
            "memory_mib": "64",
            "restart_policy": "never",
            "start": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()
    workload = Workload.objects.get(name="ticker")
    op = finished(workload_op_id(workload))
    assert op.state == "succeeded", op.error
    page = client.get(reverse("workload-detail", args=[workload.pk])).content.decode()
    token = re.search(r'data-console-token="([^"]+)"', page).group(1)  # type: ignore[union-attr]

    headers = session_headers(world.user("mia"))

    async def watch() -> tuple[dict[str, Any], bytes]:
        ws = WebsocketCommunicator(application, console_path(workload, token), headers=headers)
        connected, _ = await ws.connect()
        assert connected
        hello = json.loads(await ws.receive_from(timeout=10))
        seen = b""
        while b"finished" not in seen:
            output = await ws.receive_output(timeout=20)
            assert output["type"] == "websocket.send", output
            seen += output.get("bytes") or b""
        await ws.disconnect()
        return hello, seen

    hello, seen = async_to_sync(watch)()
    assert hello["mode"] == "output"
    lines = seen.decode().splitlines()
    assert [line for line in lines if line.startswith("tick")] == [f"tick {i}" for i in range(1, 7)]
    workload_in("ticker", {"stopped"})


def workload_op_id(workload: Workload) -> str:
    from portal.models import Operation

    return str(Operation.objects.get(kind="workload.create", target_id=str(workload.pk)).pk)


@pytest.mark.django_db(transaction=True)
def test_the_follower_sends_whole_lines_once_and_starts_over_on_a_new_log(
    world: World, settings: Any
) -> None:
    """Through the host's agent (here a thread answering as the agent loop does), as from another machine."""
    from compute.consumers import OutputFollower
    from tests.compute.runtimes import oci_runtime

    workload = a_workload(world.acme)
    assert workload.host is not None
    path = oci_runtime(workload.host).log_path(workload.runtime_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with answering(workload.host):
        follower = OutputFollower(workload)
        assert follower.read_new() == b""  # no log yet
        path.write_bytes(b"2026-01-01T00:00:00Z stdout F one\n2026-01-01T00:00:00Z stdout P tw")
        assert follower.read_new() == b"one\n"
        with path.open("ab") as f:
            f.write(b"o-part\n2026-01-01T00:00:01Z stderr F three\n")
        assert follower.read_new() == b"two-partthree\n"
        assert follower.read_new() == b""
        path.write_bytes(b"2026-01-01T00:00:02Z stdout F again\n")  # restarted: a shorter, new log
        assert follower.read_new() == b"again\n"
    shutil.rmtree(path.parent)
