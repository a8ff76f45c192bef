"""The production stack starts the way docker-compose.yml starts it, as processes (no container engine here).

PostgreSQL and Redis come from the test services; `manage.py deploy` (the compose one-shot), then daphne,
a worker and beat with BULKHEAD_PROFILE=production, on a database of their own.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psycopg
import pytest
import yaml

from tests.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "production operator password 1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def production_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url.startswith("postgres"):
        pytest.fail("the production stack test needs the PostgreSQL of scripts/with-test-services.sh")
    parsed = urlparse(database_url)
    name = f"bulkhead_prod_{secrets.token_hex(4)}"
    admin_url = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # our own generated name, not input
    redis = urlparse(os.environ["REDIS_URL"])
    env = {
        **os.environ,
        "DATABASE_URL": parsed._replace(path=f"/{name}").geturl(),
        # A Redis database of its own, so that the suite's workers never take this stack's tasks.
        "REDIS_URL": redis._replace(path="/9").geturl(),
        "BULKHEAD_PROFILE": "production",
        "BULKHEAD_SECRET_KEY": secrets.token_urlsafe(50),
        "BULKHEAD_ALLOWED_HOSTS": "127.0.0.1",
        "BULKHEAD_DATA_DIR": str(tmp_path / "data"),
        "BULKHEAD_ADMIN_USERNAME": "root-operator",
        "BULKHEAD_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    env.pop("BULKHEAD_DEBUG", None)
    try:
        yield env
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _compose_command(service: str) -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    argv = list(compose["services"][service]["command"])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


class Browser:
    """An HTTPS client behind a TLS-terminating proxy, as the production profile expects."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.cookies: dict[str, str] = {}
        self.http = httpx.Client(timeout=30)

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {
            "Host": "127.0.0.1",
            "X-Forwarded-Proto": "https",
            "Referer": "https://127.0.0.1/login/",
            "Origin": "https://127.0.0.1",
            **kwargs.pop("headers", {}),  # type: ignore[dict-item]
        }
        if self.cookies:
            # The cookies are Secure: httpx would not send them over the proxy's plain hop.
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = self.http.request(method, self.base + path, headers=headers, **kwargs)  # type: ignore[arg-type]
        self.cookies.update({name: value for name, value in response.cookies.items() if value})
        return response


def test_it_deploys_and_serves_the_production_profile(production_env: dict[str, str]) -> None:
    first = _manage(production_env, "deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "operator 'root-operator' created" in first.stdout
    again = _manage(production_env, "deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "operator 'root-operator' already exists" in again.stdout

    port = _free_port()
    web_argv = _compose_command("web")
    web_argv[web_argv.index("-p") + 1] = str(port)
    web_argv[web_argv.index("-b") + 1] = "127.0.0.1"
    beat_argv = _compose_command("beat")
    beat_argv[beat_argv.index("-s") + 1] = str(Path(production_env["BULKHEAD_DATA_DIR"]) / "beat-schedule")
    logs = Path(production_env["BULKHEAD_DATA_DIR"])
    procs = []
    for name, argv in (("web", web_argv), ("worker", _compose_command("worker")), ("beat", beat_argv)):
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(argv, cwd=ROOT, env=production_env, stdout=log, stderr=subprocess.STDOUT)
            )
    try:
        browser = Browser(port)

        def login_page() -> httpx.Response | None:
            try:
                return browser.request("GET", "/login/")
            except httpx.TransportError:
                return None

        page = wait_until(login_page, timeout=60, what="daphne to answer")
        assert page.status_code == 200
        # The page links its CSS by a hashed name (manifest storage) that whitenoise serves.
        css = re.search(r'href="(/static/frontend/bulkhead\.[0-9a-f]{12}\.css)"', page.text)
        assert css, "no hashed stylesheet in the login page"
        static = browser.request("GET", css.group(1))
        assert static.status_code == 200
        assert static.headers["content-type"].startswith("text/css")
        assert "max-age=315360000" in static.headers.get("cache-control", "")

        token = browser.cookies["csrftoken"]
        signed_in = browser.request(
            "POST",
            "/login/",
            data={"username": "root-operator", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": token},
        )
        assert signed_in.status_code == 302, signed_in.text[:500]
        assert "sessionid" in browser.cookies

        started = browser.request(
            "POST",
            "/api/v1/operations/selfcheck/",
            json={"steps": 2},
            headers={"X-CSRFToken": browser.cookies["csrftoken"]},
        )
        assert started.status_code == 202, started.text
        op_id = started.json()["id"]

        def finished() -> dict[str, object] | None:
            op = browser.request("GET", f"/api/v1/operations/{op_id}/").json()
            return op if op["state"] in ("succeeded", "failed", "cancelled") else None

        op = wait_until(finished, timeout=90, interval=0.3, what="the self-check to finish")
        assert op["state"] == "succeeded", op

        check = _manage(production_env, "check", "--deploy", "--fail-level", "WARNING")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "no issues" in check.stdout
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_it_refuses_to_create_the_first_operator_without_a_password(production_env: dict[str, str]) -> None:
    env = {**production_env, "BULKHEAD_ADMIN_PASSWORD": ""}
    result = _manage(env, "deploy")
    assert result.returncode != 0
    assert "BULKHEAD_ADMIN_PASSWORD" in result.stderr
