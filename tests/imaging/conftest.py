"""Fixtures shared by the registry tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import serve_registry


@pytest.fixture
def registry_server(world: Any, settings: Any, tmp_path: Path) -> Iterator[str]:
    """host:port of the portal's registry (real daphne) on the test database and a private store."""
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    with serve_registry(tmp_path / "store") as address:
        yield address
