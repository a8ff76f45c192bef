"""podman against the built-in registry: `podman login` with an API token as the password, then
`podman pull` of a tenant's image by tag and by digest (its own storage, nothing outside the test).

Refusals (wrong token, another tenant) are covered with skopeo in test_registry_server.py: each podman
call here costs ~10 s, podman's HTTPS attempt waiting out its TLS handshake against plain HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import World
from tests.imaging.images import busybox_layers
from tests.imaging.test_registry_server import imported, registry, token_of

__all__ = ["registry"]

pytestmark = pytest.mark.django_db(transaction=True)


def short_run_root(root: Path) -> Path:
    # podman refuses a run root longer than 50 characters: a short one of the test's own.
    return Path("/run/bulkhead-test-podman") / root.parent.name[-20:]


def podman(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """podman with storage, auth file and configuration of its own under `root` (never the host's)."""
    run_root = short_run_root(root)
    run_root.mkdir(parents=True, exist_ok=True)
    storage = ["--root", str(root / "storage"), "--runroot", str(run_root), "--storage-driver", "vfs"]
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(root),
        "REGISTRY_AUTH_FILE": str(root / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
    }
    return subprocess.run(
        ["podman", *storage, *args], input=stdin, env=environment, capture_output=True, text=True, timeout=180
    )


def test_it_lets_podman_log_in_with_a_token_and_pull_by_tag_and_digest(
    world: World, registry: str, tmp_path: Path
) -> None:
    image = imported(world, tmp_path, "alice", world.acme, "busybox", busybox_layers())
    root = tmp_path / "podman"
    root.mkdir()
    try:
        pull_as_mia(world, registry, root, image.manifest_digest)
    finally:
        shutil.rmtree(short_run_root(root), ignore_errors=True)


def pull_as_mia(world: World, registry: str, root: Path, manifest_digest: str) -> None:
    (root / "registries.conf").write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    secret = token_of(world, "mia")
    login = podman(
        root, "login", "--tls-verify=false", "--username", "mia", "--password-stdin", registry, stdin=secret
    )
    assert login.returncode == 0, login.stderr
    by_tag = podman(root, "pull", "--tls-verify=false", f"{registry}/acme/busybox:1")
    assert by_tag.returncode == 0, by_tag.stderr
    by_digest = podman(root, "pull", "--tls-verify=false", f"{registry}/acme/busybox@{manifest_digest}")
    assert by_digest.returncode == 0, by_digest.stderr
    inspected = json.loads(podman(root, "image", "inspect", f"{registry}/acme/busybox:1").stdout)
    assert inspected[0]["RepoDigests"] and manifest_digest in " ".join(inspected[0]["RepoDigests"])
