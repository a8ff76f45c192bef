"""A host's own credential: issued at join, rotatable and revocable by operators; with it a host on
another machine (its own layer store) fetches exactly the blobs of the images placed on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from compute import hosts
from compute.models import Host
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, serve_registry, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def fetch(portal: str, secret: str, digest: str) -> httpx.Response:
    """A blob of acme/busybox from the registry, as a host asks for it (its credential as a bearer)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.get(f"http://{portal}/v2/acme/busybox/blobs/{digest}", headers=headers)


def test_it_lets_a_host_fetch_only_the_blobs_of_its_own_workloads(
    world: World, busybox: Any, store_dir: Path, tmp_path: Path
) -> None:
    a, b = make_host("bht-cred-a"), make_host("bht-cred-b")
    system = Actor.system("test")
    secret_a, secret_b = (
        hosts.issue_host_credential(actor=system, host=a),
        hosts.issue_host_credential(actor=system, host=b),
    )
    oscar = Actor(user=world.user("oscar"))
    hosts.set_host_state(actor=oscar, host=b, state="maintenance")  # the workload lands on a
    own_store = tmp_path / "host-a-store"  # a's machine: nothing of the portal's store
    layer = busybox.layers.first()
    try:
        with serve_registry(store_dir) as portal:
            # Before anything is placed on it, a may fetch nothing.
            assert fetch(portal, secret_a, layer.digest).status_code == 404
            with host_agent(
                a,
                BULKHEAD_STORE_DIR=str(own_store),
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_HOST_CREDENTIAL=secret_a,
            ):
                response = create(
                    world,
                    "mia",
                    name="remote",
                    image=str(busybox.pk),
                    command=["/bin/sh", "-c", "echo fetched"],
                )
                op = finished(response.json()["id"], timeout=120)
                assert op.state == "succeeded", op.error
                remote = workload_in("remote", {"stopped", "running", "failed"})
                assert remote.host == a and remote.exit_code in (0, None)
                answer = client_for(world, "mia").get(f"/api/v1/workloads/{remote.pk}/logs/").json()
                logs = answer.get("logs", answer)
                assert "fetched" in str(logs), logs
            assert (own_store / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")).is_file()

            assert fetch(portal, secret_a, layer.digest).status_code == 200
            # b runs nothing of that image: refused like a missing blob, and audited.
            assert fetch(portal, secret_b, layer.digest).status_code == 404
            assert AuditEntry.objects.filter(action="host.blob.fetch", outcome="denied").exists()
            assert fetch(portal, "bhh_not-a-credential", layer.digest).status_code == 401
            assert fetch(portal, "", layer.digest).status_code == 401

            # Rotation: the old secret stops working at once; revocation ends the new one.
            rotated = client_for(world, "oscar").post(f"/api/v1/hosts/{a.pk}/credential/")
            assert rotated.status_code == 201
            assert fetch(portal, secret_a, layer.digest).status_code == 401
            assert fetch(portal, rotated.json()["credential"], layer.digest).status_code == 200
            assert client_for(world, "oscar").delete(f"/api/v1/hosts/{a.pk}/credential/").status_code == 204
            assert fetch(portal, rotated.json()["credential"], layer.digest).status_code == 401
            # Only operators, not a scoped operator token or a tenant.
            for persona in ("alice", "oscar_acme", "oscar_readonly"):
                assert client_for(world, persona).post(f"/api/v1/hosts/{a.pk}/credential/").status_code in (
                    403,
                    404,
                )
            wait_until(lambda: Host.objects.filter(pk=a.pk).exists(), timeout=1)
    finally:
        cleanup_host(a)
        cleanup_host(b)
