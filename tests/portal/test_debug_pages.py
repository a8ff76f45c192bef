"""Django's debug pages (the URL map, settings) never reach a client by default or beyond loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def debug_with(tmp_path: Path, **env: str) -> bool:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("BULKHEAD_") and k != "DJANGO_SETTINGS_MODULE"
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='portal.settings'; "
         "django.setup(); from django.conf import settings; print(settings.DEBUG)"],
        cwd=ROOT, env={**clean, "BULKHEAD_DATA_DIR": str(tmp_path), **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),  # make run's default: no debug pages for anonymous visitors
        ({"BULKHEAD_DEBUG": "on"}, True),
        ({"BULKHEAD_DEBUG": "on", "BULKHEAD_BIND": "0.0.0.0"}, False),
        ({"BULKHEAD_DEBUG": "on", "BULKHEAD_PROFILE": "production", "BULKHEAD_SECRET_KEY": "x" * 60}, False),
    ],
)
def test_it_serves_debug_pages_only_when_asked_and_only_on_loopback(
    tmp_path: Path, env: dict[str, str], expected: bool
) -> None:
    assert debug_with(tmp_path, **env) is expected
