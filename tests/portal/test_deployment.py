"""Production profile, compose file, OpenAPI schema and constant-query list endpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tenants import audit
from tenants.actors import Actor
from tests.conftest import World, client_for

ROOT = Path(__file__).resolve().parents[2]


def test_it_passes_check_deploy_with_zero_warnings(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BULKHEAD_PROFILE": "production",
        "BULKHEAD_SECRET_KEY": "x" * 30 + "production-secret-key-for-the-check-" + "y" * 20,
        "BULKHEAD_ALLOWED_HOSTS": "cloud.example.test",
        "BULKHEAD_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_it_has_a_compose_file_whose_commands_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "worker", "beat"} <= set(services)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pyproject.toml" in dockerfile
    for name in ("web", "worker", "beat"):
        command = services[name]["command"]
        argv = command if isinstance(command, list) else command.split()
        if argv[0] == "python" and argv[1] == "-m":
            module = argv[2]
            if module == "celery":
                assert argv[argv.index("-A") + 1] == "portal"
                assert (ROOT / "portal" / "celery.py").exists()
            elif module == "daphne":
                target = argv[-1].split(":")[0]
                assert (ROOT / (target.replace(".", "/") + ".py")).exists()
            else:
                pytest.fail(f"unexpected module {module}")
        elif argv[0] == "python" and argv[1] == "manage.py":
            assert (ROOT / "manage.py").exists()
        else:
            assert shutil.which(argv[0]), f"{name}: {argv[0]} not found"
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgres://")


def test_it_describes_the_topology_with_hosts_the_portal_services_and_nothing_of_a_host() -> None:
    """The portal runs web, worker, beat, Redis and PostgreSQL; a host is never a service. What the hosts
    get at join (the broker as they reach it) is set on the portal; PostgreSQL is not published to them."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "deploy", "web", "worker", "beat"}
    for name in ("web", "worker", "beat", "deploy"):
        environment = services[name]["environment"]
        assert environment["BULKHEAD_AGENT_REDIS_URL"].startswith("${BULKHEAD_AGENT_REDIS_URL:?")
        assert "BULKHEAD_HOST_CREDENTIAL" not in environment
    assert "ports" not in services["postgres"]
    assert services["redis"]["ports"] == ["6379:6379"]
    assert "-Q" in services["worker"]["command"] and "default" in services["worker"]["command"]
    header = (ROOT / "docker-compose.yml").read_text().split("x-app:")[0]
    assert "make agent PORTAL=" in header and "agent.env" in header


@pytest.mark.django_db
def test_it_serves_the_openapi_schema_locally(world: World) -> None:
    client = client_for(world, "alice")
    schema = client.get("/api/v1/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/v1/audit/" in paths and "/api/v1/tokens/" in paths
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "https://" not in html and "http://" not in html


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/audit/",
        "/api/v1/tokens/",
        "/api/v1/memberships/",
        "/api/v1/operations/",
        "/api/v1/tenants/",
        "/api/v1/quotas/",
    ],
)
def test_it_lists_with_a_constant_number_of_queries(world: World, url: str) -> None:
    from portal.models import Operation
    from tenants import services

    client = client_for(world, "oscar")
    oscar = Actor(user=world.user("oscar"))

    def grow(n: int) -> None:
        for i in range(n):
            audit.record(oscar, "test.grow", world.acme, details={"i": i})
            Operation.objects.create(kind="test.grow", tenant=world.acme)
            services.create_token(actor=oscar, name=f"t{i}", tenant=world.acme)
            services.create_tenant(actor=oscar, name=f"grow-{n}-{i}", owner=world.user("charlie"))

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url, {"page_size": 100}).status_code == 200
        return len(ctx.captured_queries)

    grow(2)
    small = count()
    grow(20)
    assert count() == small
