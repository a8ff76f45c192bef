"""A host joins with one command: single-use, short-lived join token, profile served by the portal."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from compute.join import main as join_main
from compute.models import Host, JoinToken
from tenants.models import AuditEntry
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db(transaction=True)


def new_token(world: World, name: str = "edge-1", **profile: Any) -> str:
    response = client_for(world, "oscar").post(
        "/api/v1/hosts/join-tokens/", {"host_name": name, **profile}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["command"].startswith("make agent PORTAL=") and body["token"] in body["command"]
    return str(body["token"])


def test_it_joins_a_host_with_one_command_and_its_profile(
    world: World, live_server: Any, tmp_path: Path
) -> None:
    token = new_token(world, labels={"rack": "r1"}, cpu_overcommit="2.5", domain_type_override="qemu")
    env_file = tmp_path / "agent.env"
    assert (
        join_main(["--portal", live_server.url, "--token", token, "--env-file", str(env_file), "--no-start"])
        == 0
    )
    host = Host.objects.get(name="edge-1")
    assert host.labels == {"rack": "r1"}
    assert str(host.cpu_overcommit) == "2.50" and host.domain_type == "qemu"
    assert host.cpus > 0 and host.facts["cgroup_mode"] in {"v1", "v2", "hybrid"}
    assert f"BULKHEAD_HOST_ID={host.pk}" in env_file.read_text()
    assert env_file.stat().st_mode & 0o777 == 0o600  # it holds connection credentials
    assert AuditEntry.objects.filter(action="host.join", object_id=str(host.pk)).exists()


def test_it_hands_a_joining_host_no_database_url_even_when_one_is_configured(
    world: World, live_server: Any, tmp_path: Path, settings: Any
) -> None:
    """A host's agent reads and writes no row: whatever the portal is configured with, a joining host (a
    machine that runs tenants' code) never learns a database URL, and never writes one it is sent."""
    from compute.join import write_env

    settings.BULKHEAD_AGENT_DATABASE_URL = "postgres://agent:db-secret@db.internal:5432/bulkhead"
    token = new_token(world, "edge-nodb")
    answer = client_for(world, "charlie").post(
        "/api/v1/hosts/join/", {"token": token, "facts": {"cpus": 2, "memory_mib": 2048}}, format="json"
    )
    assert answer.status_code == 201, answer.json()
    assert "db-secret" not in answer.content.decode()
    assert not any("DATABASE" in key for key in answer.json()["env"])
    env_file = tmp_path / "agent.env"
    # A portal of an older version (or one in the middle) still sends one: the host does not keep it.
    write_env(env_file, {**answer.json(), "env": {**answer.json()["env"], "DATABASE_URL": "postgres://x"}})
    written = env_file.read_text()
    assert "DATABASE_URL" not in written and "BULKHEAD_HOST_CREDENTIAL=" in written


def test_it_writes_the_settings_file_private_and_never_through_a_planted_link(tmp_path: Path) -> None:
    from compute.join import write_env

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    env_file = tmp_path / "agent.env"
    (tmp_path / ".agent.env.tmp").symlink_to(victim)  # planted where the file is first written
    write_env(env_file, {"host": "h1", "name": "edge-1", "env": {"REDIS_URL": "redis://:secret@x/0"}})
    assert victim.read_text() == "keep me"
    assert env_file.stat().st_mode & 0o777 == 0o600 and not env_file.is_symlink()
    assert "REDIS_URL=redis://:secret@x/0" in env_file.read_text()


def test_it_refuses_a_used_or_expired_join_token(world: World, live_server: Any, tmp_path: Path) -> None:
    token = new_token(world, "edge-2")
    args = ["--portal", live_server.url, "--token", token, "--env-file", str(tmp_path / "env"), "--no-start"]
    assert join_main(args) == 0
    with pytest.raises(SystemExit, match="refused the join"):
        join_main(args)
    expired = new_token(world, "edge-3")
    JoinToken.objects.filter(host_name="edge-3").update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(SystemExit, match="refused the join"):
        join_main(
            ["--portal", live_server.url, "--token", expired, "--env-file", str(tmp_path / "e"), "--no-start"]
        )
    assert not Host.objects.filter(name="edge-3").exists()


def test_it_lets_only_operators_create_join_tokens(world: World) -> None:
    response = client_for(world, "alice").post(
        "/api/v1/hosts/join-tokens/", {"host_name": "x"}, format="json"
    )
    assert response.status_code == 403
