"""The `bulkhead` CLI starts light and notices a finished operation soon after it ends."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from portal import cli

ROOT = Path(__file__).resolve().parents[2]


def test_it_starts_the_cli_without_loading_celery() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, portal.cli; print(sorted(m for m in sys.modules if 'celery' in m))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(loaded.stdout.replace("'", '"')) == []


def test_it_still_gives_the_worker_its_celery_app_through_the_package() -> None:
    from celery.app.utils import find_app

    import portal
    from portal.celery import app

    assert find_app("portal") is app  # what `celery -A portal worker|beat` resolves
    assert portal.celery_app is app


def test_it_asks_every_50_ms_for_two_seconds_then_backs_off_to_every_half_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter(["running"] * 45 + ["succeeded"])
    waits: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        state = next(answers)
        return httpx.Response(
            200, json={"id": "op-1", "kind": "desired.apply", "state": state, "progress": 50, "message": ""}
        )

    monkeypatch.setattr(cli.time, "sleep", waits.append)
    client = cli.Client("http://portal.test", "token", transport=httpx.MockTransport(handler))
    commands = cli.Commands(client, None, io.StringIO())
    started: dict[str, Any] = {
        "id": "op-1",
        "kind": "desired.apply",
        "state": "queued",
        "progress": 0,
        "message": "",
    }
    assert commands.follow(started, timeout=60) == 0
    # An apply that ends at 0.3 s is seen by 0.35 s, not at the next doubling (0.05 + 0.1 + 0.2 = 0.35,
    # then 0.75 s); after two seconds the portal is asked less often.
    assert waits[:40] == [0.05] * 40
    assert waits[40:] == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
