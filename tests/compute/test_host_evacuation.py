"""An operator evacuates a host: it drains, each workload leaves it and runs on another host, and one
operation follows them all with progress. Nobody else can ask for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Host, Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.compute.runtimes import oci_runtime
from tests.conftest import World, client_for
from tests.processes import celery_worker, host_agent

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_moves_every_workload_off_an_evacuated_host(world: World, busybox: Any, store_dir: Path) -> None:
    a, b = make_host("bht-evac-a"), make_host("bht-evac-b")
    oscar = Actor(user=world.user("oscar"))
    try:
        hosts.set_host_state(actor=oscar, host=b, state="maintenance")  # everything lands on a
        with (
            host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)),
            host_agent(b, BULKHEAD_STORE_DIR=str(store_dir)),
            celery_worker(name="evacuation", BULKHEAD_STORE_DIR=str(store_dir)),
        ):
            for name in ("first", "second"):
                response = create(
                    world, "mia", name=name, image=str(busybox.pk), command=["/bin/sleep", "300"]
                )
                assert finished(response.json()["id"]).state == "succeeded"
            assert {w.host_id for w in Workload.objects.all()} == {a.pk}
            hosts.set_host_state(actor=oscar, host=b, state="ready")

            for refused in ("mia", "alice", "oscar_acme", "oscar_readonly"):
                answer = client_for(world, refused).post(f"/api/v1/hosts/{a.pk}/evacuate/")
                assert answer.status_code in (403, 404), (refused, answer.status_code)
            assert Host.objects.get(pk=a.pk).state == "ready"

            response = client_for(world, "oscar").post(f"/api/v1/hosts/{a.pk}/evacuate/")
            assert response.status_code == 202, response.content
            op = finished(response.json()["id"], timeout=120)
            assert op.state == "succeeded", op.error
            assert op.result["moved"] == ["first", "second"] and op.result["failed"] == []
            assert op.log_entries.filter(message__startswith="Moved").exists()
            for name in ("first", "second"):
                assert workload_in(name, {"running"}).host == b
            assert oci_runtime(a).list_ids() == []
            assert len(oci_runtime(b).list_ids()) == 2
            assert Host.objects.get(pk=a.pk).state == "draining"
            assert AuditEntry.objects.filter(action="workload.move").count() == 2
            assert AuditEntry.objects.filter(action="host.evacuate", outcome="ok").count() == 1
    finally:
        cleanup_host(a)
        cleanup_host(b)


def test_it_refuses_a_move_whose_published_port_is_taken_on_the_target_before_anything_stops(
    world: World, busybox: Any
) -> None:
    from compute import services
    from compute.compartments import PublishedPort
    from portal.errors import Conflict

    a, b = make_host("bht-clash-a"), make_host("bht-clash-b")
    oscar = Actor(user=world.user("oscar"))
    mine = Workload.objects.create(tenant=world.acme, name="mine", image=busybox, host=a, state="running")
    theirs_image = busybox.__class__.objects.create(
        tenant=world.globex, name="theirs", tag="1", manifest_digest="sha256:" + "b" * 64
    )
    theirs = Workload.objects.create(tenant=world.globex, name="theirs", image=theirs_image, host=b)
    PublishedPort.objects.create(tenant=world.acme, workload=mine, host=a, host_port=20443, workload_port=443)
    PublishedPort.objects.create(
        tenant=world.globex, workload=theirs, host=b, host_port=20443, workload_port=80
    )
    hosts.set_host_state(actor=oscar, host=a, state="draining")
    with pytest.raises(Conflict):
        services.move_workload(actor=oscar, workload=mine)
    assert Workload.objects.get(pk=mine.pk).host == a  # nothing queued, nothing stopped
    assert AuditEntry.objects.filter(action="workload.move", outcome="denied").exists()

    # Taken after the move was queued: the landing refuses, the workload says why instead of vanishing.
    assert services.land_moved_workload(actor=oscar, workload=mine, to_host=b.pk) is None
    failed = Workload.objects.get(pk=mine.pk)
    assert failed.state == "failed" and "20443" in failed.status_message
