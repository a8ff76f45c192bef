"""Secret values: write-only for every role and token, sealed at rest, absent from documents, exports,
plans, operation parameters and the audit log; a workload gets its secrets when it starts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from compute import host_reports
from compute.models import Workload
from imaging.models import Image
from tenants.models import AuditEntry, Secret
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db

VALUE = "hunter2-correct-horse-s3cret"


@pytest.fixture
def image(world: World) -> Image:
    return Image.objects.create(
        tenant=world.acme, name="app", tag="1", manifest_digest="sha256:" + "a" * 64, config={"env": []}
    )


def add_secret(world: World, name: str = "db-password", value: str = VALUE, persona: str = "alice") -> Any:
    return client_for(world, persona).post(
        "/api/v1/secrets/", {"tenant": str(world.acme.pk), "name": name, "value": value}, format="json"
    )


def workload_with_secret(world: World, image: Image, name: str = "db") -> Workload:
    return Workload.objects.create(
        tenant=world.acme, name=name, image=image, secret_env={"DB_PASSWORD": "db-password"}
    )


def test_it_shows_every_role_that_a_secret_is_set_and_never_its_value(world: World, image: Image) -> None:
    created = add_secret(world)
    assert created.status_code == 201, created.content
    assert created.json()["value"] == "set" and VALUE not in created.content.decode()
    secret_id = created.json()["id"]
    workload_with_secret(world, image)
    readers = [client_for(world, name) for name in ("alice", "amir", "mia", "vic")]
    readers.append(client_for(world, "mia_readonly"))
    readers.append(client_for(world, "oscar_acme"))
    readers.append(client_for(world, "oscar"))
    for client in readers:
        listing = client.get("/api/v1/secrets/")
        detail = client.get(f"/api/v1/secrets/{secret_id}/")
        workloads = client.get("/api/v1/workloads/")
        audit = client.get("/api/v1/audit/")
        for response in (listing, detail, workloads, audit):
            assert response.status_code in (200, 403), response.content
            assert VALUE not in response.content.decode()
        assert detail.json()["value"] == "set"
        assert detail.json()["used_by"] == ["db"]
    # Sealed at rest: the database holds no plain text.
    assert VALUE not in Secret.objects.get(pk=secret_id).sealed_value
    assert all(VALUE not in json.dumps(entry.details) for entry in AuditEntry.objects.all())


def test_it_lets_only_admins_set_values_and_audits_the_refusals(world: World) -> None:
    assert add_secret(world, persona="mia").status_code == 403
    assert add_secret(world, persona="vic").status_code == 403
    assert add_secret(world, persona="alice", value="x" * 10).status_code == 201
    secret = Secret.objects.get(tenant=world.acme, name="db-password")
    url = f"/api/v1/secrets/{secret.pk}/"
    change = {"value": "a new value"}
    assert client_for(world, "mia").put(url, change, format="json").status_code == 403
    assert client_for(world, "bob").put(url, change, format="json").status_code == 404
    assert client_for(world, "bob").get(url).status_code == 404
    assert client_for(world, "amir").put(url, change, format="json").status_code == 200
    denied = AuditEntry.objects.filter(outcome="denied", tenant=world.acme)
    assert denied.count() >= 3
    assert AuditEntry.objects.filter(action="secret.update", outcome="ok").count() == 1


def test_it_refuses_bad_values_and_names_clearly(world: World) -> None:
    assert add_secret(world, name="Bad Name").status_code == 400
    assert add_secret(world, value="nul\0byte").status_code == 400
    assert add_secret(world, value="x" * (64 * 1024 + 1)).status_code == 400
    assert add_secret(world).status_code == 201
    assert add_secret(world).status_code == 409
    assert Secret.objects.count() == 1


def test_it_refuses_to_delete_a_secret_a_workload_uses(world: World, image: Image) -> None:
    secret_id = add_secret(world).json()["id"]
    workload = workload_with_secret(world, image)
    refused = client_for(world, "alice").delete(f"/api/v1/secrets/{secret_id}/")
    assert refused.status_code == 409 and "db" in refused.json()["error"]["message"]
    workload.delete()
    assert client_for(world, "alice").delete(f"/api/v1/secrets/{secret_id}/").status_code == 204


def test_it_refuses_a_workload_that_names_a_secret_of_another_tenant(world: World, image: Image) -> None:
    theirs = client_for(world, "bob").post(
        "/api/v1/secrets/", {"name": "token", "value": VALUE}, format="json"
    )
    assert theirs.status_code == 201, theirs.content
    response = client_for(world, "mia").post(
        "/api/v1/workloads/",
        {
            "tenant": str(world.acme.pk),
            "name": "thief",
            "image": str(image.pk),
            "secret_env": {"STOLEN": "token"},
        },
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"secret_env": ["No secret named 'token' in this tenant."]}
    assert not Workload.objects.filter(name="thief").exists()


def test_it_resolves_the_values_on_the_host_when_the_workload_starts(world: World, image: Image) -> None:
    add_secret(world)
    for isolation in ("namespace", "microvm"):
        workload = workload_with_secret(world, image, name=f"db-{isolation}")
        Workload.objects.filter(pk=workload.pk).update(isolation=isolation)
        workload.refresh_from_db()
        assert f"DB_PASSWORD={VALUE}" in host_reports.process_env(workload)
    # A value changed later is what the next start gets.
    secret = Secret.objects.get(name="db-password")
    client_for(world, "alice").put(f"/api/v1/secrets/{secret.pk}/", {"value": "rotated"}, format="json")
    assert "DB_PASSWORD=rotated" in host_reports.process_env(Workload.objects.get(name="db-namespace"))


def test_it_keeps_values_out_of_desired_documents_plans_and_exports(world: World, image: Image) -> None:
    add_secret(world)
    document = """
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  workloads:
    - name: db
      image: app:1
      env: {MODE: production}
      secret_env: {DB_PASSWORD: db-password}
"""
    client = client_for(world, "alice")
    saved = client.post(
        "/api/v1/desired/revisions/", {"tenant": str(world.acme.pk), "text": document}, format="json"
    )
    assert saved.status_code == 201, saved.content
    planned = client.post("/api/v1/desired/plans/", {"revision": saved.json()["id"]}, format="json")
    assert planned.status_code == 201, planned.content
    assert "db-password" in planned.content.decode() and VALUE not in planned.content.decode()
    both = document.replace("env: {MODE: production}", "env: {DB_PASSWORD: plain}")
    refused = client.post(
        "/api/v1/desired/revisions/", {"tenant": str(world.acme.pk), "text": both}, format="json"
    )
    assert refused.status_code == 400
    assert "set both in env and in secret_env" in refused.content.decode()
    # An existing workload's secret references come out of an export by name.
    workload_with_secret(world, image)
    exported = client.get(f"/api/v1/desired/{world.acme.pk}/export/")
    assert exported.status_code == 200, exported.content
    assert "DB_PASSWORD: db-password" in exported.content.decode()
    assert VALUE not in exported.content.decode()
