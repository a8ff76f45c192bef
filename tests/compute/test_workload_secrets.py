"""A namespace container gets its tenant's secret in its environment when it starts (real agent, runc),
and the new value after the secret changes and the workload restarts."""

from __future__ import annotations

from typing import Any

import pytest

from compute.models import Host
from tests.compute.conftest import create, finished, workload_in
from tests.conftest import World, client_for
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_hands_the_secret_to_the_container_at_each_start(world: World, busybox: Any, host: Host) -> None:
    alice = client_for(world, "alice")
    secret = alice.post(
        "/api/v1/secrets/",
        {"tenant": str(world.acme.pk), "name": "db-password", "value": "first-value"},
        format="json",
    ).json()
    response = create(
        world,
        "mia",
        name="reader",
        image=str(busybox.pk),
        command=["/bin/sh", "-c", "echo password=$DB_PASSWORD; sleep 300"],
        secret_env={"DB_PASSWORD": "db-password"},
    )
    assert response.status_code == 202, response.json()
    assert finished(response.json()["id"]).state == "succeeded"
    workload = workload_in("reader", {"running"})
    mia = client_for(world, "mia")

    def logs() -> str:
        return str(mia.get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"])

    wait_until(lambda: "password=first-value" in logs(), timeout=30, what="the secret in the output")
    alice.put(f"/api/v1/secrets/{secret['id']}/", {"value": "second-value"}, format="json")
    restart = mia.post(
        f"/api/v1/workloads/{workload.pk}/restart/", {"grace_seconds": 1}, format="json"
    ).json()
    assert finished(restart["id"]).state == "succeeded"
    wait_until(lambda: "password=second-value" in logs(), timeout=30, what="the new value after a restart")
    assert "second-value" not in str(mia.get(f"/api/v1/workloads/{workload.pk}/").json())
