"""A host's agent answering in a thread, as its loop does (for tests that need no containers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from django.conf import settings
from django.db import connection

from compute.host import rpc
from compute.host.context import host_context
from compute.host.queries import SpecQueries
from compute.models import Host


def answerer_for(host: Host, handlers: dict[str, rpc.Handler] | None = None, url: str = "") -> rpc.Answerer:
    """The agent loop's answerer: the workloads placed on ``host`` (host API), its runtime's answers."""
    ctx = host_context(host.pk)
    placed = rpc.PlacedWorkloads(ctx.link)
    client = redis.Redis.from_url(url or settings.REDIS_URL, socket_timeout=10)
    return rpc.Answerer(client, host.pk, handlers or rpc.handlers_for(SpecQueries(ctx)), placed.holds)


@contextmanager
def answering(host: Host, handlers: dict[str, rpc.Handler] | None = None) -> Iterator[None]:
    """Answer the portal's questions about ``host`` while the block runs (needs committed rows)."""
    stop = threading.Event()
    answerer = answerer_for(host, handlers)

    def loop() -> None:
        try:
            while not stop.is_set():
                answerer.serve(0.1)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, daemon=True)
    answerer.serve(0)  # says "answering" before the first question
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
