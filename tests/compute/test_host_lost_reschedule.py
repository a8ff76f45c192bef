"""A lost host's `reschedule` workloads move to another host after a grace period; `wait` and pinned
ones stay; when the lost host comes back, its agent removes its now-foreign copy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from compute import hosts
from compute.compartments import PublishedPort
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.compute.runtimes import oci_runtime
from tests.conftest import World
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def lose(host: Host, *alive: Host) -> Any:
    """The host falls silent (the `alive` ones keep answering); returns a moment past the deadline."""
    later = timezone.now() + hosts.LOST_AFTER + timedelta(seconds=1)
    assert host.name in hosts.mark_lost_hosts(now=later)
    for other in alive:
        hosts.heartbeat(other.pk)
    return later


def place(world: World, busybox: Any, name: str, **body: Any) -> Workload:
    response = create(world, "mia", name=name, image=str(busybox.pk), start=False, **body)
    assert response.status_code == 202, response.json()
    return Workload.objects.get(name=name)


def test_it_moves_only_reschedule_workloads_and_only_after_the_grace(
    world: World, busybox: Any, settings: Any
) -> None:
    settings.BULKHEAD_RESCHEDULE_GRACE_SECONDS = 30
    a = make_host("bht-lost-a")
    hosts.set_host_state(actor=Actor(user=world.user("oscar")), host=a, state="ready")
    movable = place(world, busybox, "movable", on_host_lost="reschedule", command=["/bin/sleep", "300"])
    waiting = place(world, busybox, "waiting", command=["/bin/sleep", "300"])
    b = make_host("bht-lost-b")
    Workload.objects.filter(pk__in=[movable.pk, waiting.pk]).update(state="running", host=a)
    PublishedPort.objects.create(
        tenant=world.acme, workload=movable, host=a, protocol="tcp", host_port=20080, workload_port=80
    )
    lost_at = lose(a, b)

    assert hosts.reschedule_lost_workloads(now=lost_at + timedelta(seconds=5)) == []
    assert Workload.objects.get(pk=movable.pk).host == a

    moved_names = hosts.reschedule_lost_workloads(now=lost_at + timedelta(seconds=31))
    assert moved_names == ["movable"]
    moved = Workload.objects.get(pk=movable.pk)
    assert (moved.host, moved.state, moved.runtime_id) == (b, "pending", movable.runtime_id)
    assert "moved from bht-lost-a" in moved.status_message
    assert PublishedPort.objects.get(workload=moved).host == b
    op = Operation.objects.get(kind="workload.reschedule", target_id=str(moved.pk))
    assert op.queue == b.queue and op.tenant == world.acme
    assert AuditEntry.objects.filter(action="workload.reschedule", object_id=str(moved.pk)).exists()
    stayed = Workload.objects.get(pk=waiting.pk)
    assert (stayed.host, stayed.state) == (a, "unknown")


def test_it_says_why_a_workload_could_not_move_and_keeps_it(world: World, busybox: Any) -> None:
    a = make_host("bht-lost-only")
    movable = place(world, busybox, "stuck", on_host_lost="reschedule")
    Workload.objects.filter(pk=movable.pk).update(state="running", host=a)
    lost_at = lose(a)
    assert hosts.reschedule_lost_workloads(now=lost_at + timedelta(hours=1)) == []
    stuck = Workload.objects.get(pk=movable.pk)
    assert (stuck.host, stuck.state) == (a, "unknown")
    assert stuck.status_message.startswith("host lost; not moved yet:")


def test_it_runs_the_workload_on_another_host_and_the_returning_host_drops_its_copy(
    world: World, busybox: Any, store_dir: Path, settings: Any
) -> None:
    settings.BULKHEAD_RESCHEDULE_GRACE_SECONDS = 0
    a, b = make_host("bht-move-a"), make_host("bht-move-b")
    oscar = Actor(user=world.user("oscar"))
    try:
        hosts.set_host_state(actor=oscar, host=b, state="maintenance")  # everything lands on a
        with host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world, "mia", name="mover", image=str(busybox.pk), command=["/bin/sleep", "300"],
                on_host_lost="reschedule",
            )  # fmt: skip
            assert finished(response.json()["id"]).state == "succeeded"
            mover = workload_in("mover", {"running"})
            assert mover.host == a
        # a's agent is gone (its container still runs there, as on a machine cut off the network).
        assert oci_runtime(a).list_ids() == [mover.runtime_id]
        hosts.set_host_state(actor=oscar, host=b, state="ready")
        lost_at = lose(a, b)
        with host_agent(b, BULKHEAD_STORE_DIR=str(store_dir)):
            assert hosts.reschedule_lost_workloads(now=lost_at) == ["mover"]
            op = Operation.objects.get(kind="workload.reschedule")
            assert finished(str(op.pk)).state == "succeeded", op.error
            moved = workload_in("mover", {"running"})
            assert moved.host == b and oci_runtime(b).list_ids() == [mover.runtime_id]
            # a comes back: its agent's re-sync removes the copy that is no longer its own.
            with host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)):
                wait_until(lambda: oci_runtime(a).list_ids() == [], timeout=30, what="a to drop its copy")
                assert Host.objects.get(pk=a.pk).state == "ready"
                assert Workload.objects.get(pk=mover.pk).host == b
                assert Workload.objects.get(pk=mover.pk).state == "running"
    finally:
        cleanup_host(a)
        cleanup_host(b)
