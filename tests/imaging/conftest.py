"""Fixtures shared by the registry tests: the portal served by a real daphne on a free port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import process, wait_until


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def registry_server(world: Any, settings: Any, tmp_path: Path) -> Iterator[str]:
    """host:port of daphne serving portal.asgi (and so /v2/) on the test database and a private store."""
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    port = _free_port()
    argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"]
    with process(argv, f"test-registry-{port}.log", BULKHEAD_STORE_DIR=str(tmp_path / "store")):
        address = f"127.0.0.1:{port}"

        def answering() -> bool:
            try:
                return httpx.get(f"http://{address}/v2/", timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        wait_until(answering, timeout=60, what="daphne to serve /v2/")
        yield address
