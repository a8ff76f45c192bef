"""While Redis is away the API says so (503 and why), instead of a bare 500."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from compute.models import Workload
from tests.compute.conftest import create, make_host
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def redis_away(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The cache, the channel layer and the broker all point at a port where nothing listens."""
    from portal.celery import app

    dead = f"redis://:x@127.0.0.1:{_closed_port()}/0"
    settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": dead}}
    settings.CHANNEL_LAYERS = {"default": {**settings.CHANNEL_LAYERS["default"], "CONFIG": {"hosts": [dead]}}}
    monkeypatch.setenv("CELERY_BROKER_URL", dead)  # Celery reads this before its own setting
    previous = app.conf.broker_url
    app.conf.broker_url = dead
    yield dead
    app.conf.broker_url = previous


def test_it_answers_503_with_a_clear_message_while_redis_is_away(
    world: World, busybox: Any, redis_away: str
) -> None:
    make_host("bht-host-away")
    assert client_for(world, "mia").get("/api/v1/workloads/").status_code == 200  # reads need no broker
    response = create(world, "mia", name="web", image=str(busybox.pk))
    assert response.status_code == 503, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert error["code"] == "broker_unavailable"
    assert "Redis" in error["message"]
    # Nothing half-made: no workload waits for a task that was never queued.
    assert not Workload.objects.exists()
