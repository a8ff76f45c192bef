"""A host's agent answering in a thread, as its loop does (for tests that need no containers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection

from compute import host_rpc
from compute.models import Host


@contextmanager
def answering(host: Host) -> Iterator[None]:
    """Answer the portal's questions about ``host`` while the block runs (needs committed rows)."""
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                host_rpc.serve(host, 0.1)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, daemon=True)
    host_rpc.serve(host, 0)  # says "answering" before the first question
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
