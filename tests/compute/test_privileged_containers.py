"""Privileged (root-mapped) containers: only in tenants an operator allowed, audited; all others in a userns.

End to end through the API, a real worker on the host queue and runc: what the host sees of the
container's process is the proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from tenants.choices import AuditOutcome
from tenants.models import AuditEntry, Tenant
from tests.compute.conftest import create, finished, workload_in
from tests.compute.runtimes import oci_runtime
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db(transaction=True)


def host_uid(host: Host, workload: Workload) -> int:
    """The real uid of the workload's process as the host sees it (/proc/<pid>/status)."""
    pid = oci_runtime(host).state(workload.runtime_id).pid
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def allow_privileged(world: World, allowed: bool = True) -> Any:
    return client_for(world, "oscar").patch(
        f"/api/v1/tenants/{world.acme.pk}/", {"allow_privileged_containers": allowed}, format="json"
    )


def test_it_runs_a_workloads_root_as_an_unprivileged_host_uid(world: World, busybox: Any, host: Host) -> None:
    response = create(world, "mia", name="plain", image=str(busybox.pk), command=["/bin/sleep", "300"])
    assert finished(response.json()["id"]).state == "succeeded"
    workload = workload_in("plain", {"running"})

    assert host_uid(host, workload) != 0
    assert response.status_code == 202
    assert client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/").json()["privileged"] is False


def test_it_refuses_a_privileged_workload_where_no_operator_allowed_it(world: World, busybox: Any) -> None:
    response = create(world, "alice", name="root", image=str(busybox.pk), privileged=True)

    assert response.status_code == 403, response.json()
    assert "operator" in response.json()["error"]["message"]
    assert not Workload.objects.filter(name="root").exists()
    denial = AuditEntry.objects.get(action="workload.create", outcome=AuditOutcome.DENIED)
    assert denial.tenant == world.acme and denial.actor == world.users["alice"]


def test_it_lets_only_an_operator_allow_privileged_containers(world: World) -> None:
    owner = client_for(world, "alice")

    refused = owner.patch(
        f"/api/v1/tenants/{world.acme.pk}/", {"allow_privileged_containers": True}, format="json"
    )
    allowed = allow_privileged(world)

    assert refused.status_code == 403
    assert allowed.status_code == 200 and allowed.json()["allow_privileged_containers"] is True
    assert Tenant.objects.get(pk=world.acme.pk).allow_privileged_containers is True
    assert AuditEntry.objects.filter(
        action="tenant.privileged_containers", outcome=AuditOutcome.DENIED, actor=world.users["alice"]
    ).exists()
    granted = AuditEntry.objects.get(action="tenant.privileged_containers", outcome=AuditOutcome.OK)
    assert granted.actor == world.users["oscar"] and granted.details == {"allowed": True}
    assert granted.tenant == world.acme
    # Changing only the setting leaves the display name alone.
    assert Tenant.objects.get(pk=world.acme.pk).display_name == world.acme.display_name


def test_it_runs_a_privileged_workload_as_host_root_where_allowed(
    world: World, busybox: Any, host: Host
) -> None:
    assert allow_privileged(world).status_code == 200

    response = create(
        world, "mia", name="rooted", image=str(busybox.pk), command=["/bin/sleep", "300"], privileged=True
    )

    assert response.status_code == 202, response.json()
    assert finished(response.json()["id"]).state == "succeeded"
    workload = workload_in("rooted", {"running"})
    assert workload.privileged and host_uid(host, workload) == 0
    entry = AuditEntry.objects.get(action="workload.create", object_id=str(workload.pk))
    assert entry.details["privileged"] is True


def test_it_does_not_restart_a_privileged_workload_once_the_operator_withdrew_it(
    world: World, busybox: Any, host: Host
) -> None:
    allow_privileged(world)
    response = create(
        world, "mia", name="rooted", image=str(busybox.pk), command=["/bin/true"], privileged=True
    )
    finished(response.json()["id"])
    workload = workload_in("rooted", {"stopped"})
    assert allow_privileged(world, False).status_code == 200

    op = client_for(world, "mia").post(f"/api/v1/workloads/{workload.pk}/start/", {}, format="json").json()

    assert finished(op["id"]).state == "failed"
    assert "no longer allowed" in Workload.objects.get(pk=workload.pk).status_message


def test_it_refuses_privileged_for_a_micro_vm(world: World, busybox: Any) -> None:
    allow_privileged(world)

    response = create(world, "mia", name="vm", image=str(busybox.pk), isolation="microvm", privileged=True)

    assert response.status_code == 400
    assert not Workload.objects.filter(name="vm").exists()


def test_it_keeps_image_ownership_through_a_commit(world: World, busybox: Any, host: Host) -> None:
    client = client_for(world, "mia")
    create(
        world,
        "mia",
        name="writer",
        image=str(busybox.pk),
        command=["/bin/sh", "-c"],
        args=["echo hi > /by-root.txt; echo hi > /by-app.txt; chown 1000:1000 /by-app.txt"],
    )
    writer = workload_in("writer", {"stopped"})
    op = client.post(
        f"/api/v1/workloads/{writer.pk}/commit/", {"name": "busybox", "tag": "owned"}, format="json"
    ).json()
    assert finished(op["id"]).state == "succeeded"
    from imaging.models import Image

    image = Image.objects.get(tenant=world.acme, name="busybox", tag="owned")
    create(
        world,
        "mia",
        name="reader",
        image=str(image.pk),
        command=["/bin/sh", "-c"],
        args=["stat -c '%n %u:%g' /by-root.txt /by-app.txt"],
    )
    reader = workload_in("reader", {"stopped", "failed"})

    logs = client.get(f"/api/v1/workloads/{reader.pk}/logs/").json()["logs"]
    assert logs.split("\n")[:2] == ["/by-root.txt 0:0", "/by-app.txt 1000:1000"]
    layer = image.image_layers.order_by("-position").first().layer  # type: ignore[union-attr]
    assert layer.digest  # the committed layer is the image's top one
