"""Debug pages never reach the network: `make run`'s settings serve anonymous visitors a plain 404."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What `make run` runs the web server with: portal.stack sets BULKHEAD_BIND; nothing sets BULKHEAD_DEBUG.
PROBE = """
import django, json
django.setup()
from django.conf import settings
from django.test import Client
response = Client(REMOTE_ADDR="203.0.113.9").get("/no-such-page/")
print(json.dumps({"debug": settings.DEBUG, "status": response.status_code,
                  "body": response.content.decode(errors="replace")}))
"""


def _probe(tmp_path: Path, **env: str) -> dict[str, object]:
    import json

    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_") and k != "DJANGO_SETTINGS_MODULE"
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "portal.settings", "BULKHEAD_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _shows_the_url_map(body: str) -> bool:
    return "api/v1/" in body or "workloads/" in body


def test_it_serves_anonymous_visitors_a_plain_404_under_make_runs_settings(tmp_path: Path) -> None:
    answer = _probe(tmp_path, BULKHEAD_BIND="127.0.0.1")
    assert answer["status"] == 404
    assert answer["debug"] is False
    assert not _shows_the_url_map(str(answer["body"]))


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.1", "::"])
def test_it_turns_debug_off_when_listening_beyond_loopback_even_if_asked(tmp_path: Path, bind: str) -> None:
    answer = _probe(tmp_path, BULKHEAD_BIND=bind, BULKHEAD_DEBUG="1")
    assert answer["debug"] is False
    assert not _shows_the_url_map(str(answer["body"]))


def test_it_turns_debug_off_in_production_even_if_asked(tmp_path: Path) -> None:
    answer = _probe(
        tmp_path,
        BULKHEAD_PROFILE="production",
        BULKHEAD_DEBUG="1",
        BULKHEAD_SECRET_KEY="k" * 60,
        BULKHEAD_ALLOWED_HOSTS="testserver",
        BULKHEAD_SSL_REDIRECT="0",
    )
    assert answer["debug"] is False


def test_it_runs_the_web_server_with_the_bind_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from portal import stack

    seen: dict[str, str] = {}
    monkeypatch.setattr(stack.django, "setup", lambda: seen.setdefault("bind", os.environ["BULKHEAD_BIND"]))
    monkeypatch.setattr(stack, "supervise", lambda start: 0)
    monkeypatch.setenv("BULKHEAD_BIND", "127.0.0.1")  # restored after the test
    stack.run("0.0.0.0", 8000)
    assert seen["bind"] == "0.0.0.0"
