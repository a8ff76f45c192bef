"""Namespace-container workloads end to end: API -> operation -> real worker on the host queue -> runc."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Host, Workload
from compute.runtimes.oci import OciRuntime
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_runs_a_container_and_records_its_exit_and_output(world: World, busybox: Any, host: Host) -> None:
    response = create(
        world,
        "mia",
        name="hello",
        image=str(busybox.pk),
        command=["/bin/sh", "-c"],
        args=["echo hello from $GREETING; uname -s; exit 3"],
        env={"GREETING": "bulkhead"},
    )
    assert response.status_code == 202, response.json()
    op = finished(response.json()["id"])
    assert op.state == "succeeded", op.error
    workload = workload_in("hello", {"failed"})
    assert workload.exit_code == 3
    assert workload.host == host
    logs = client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"]
    assert "hello from bulkhead" in logs and "Linux" in logs
    assert AuditEntry.objects.filter(action="workload.create", object_id=str(workload.pk)).exists()


def test_it_stops_starts_and_deletes_leaving_nothing_behind(world: World, busybox: Any, host: Host) -> None:
    client = client_for(world, "mia")
    response = create(world, "mia", name="sleeper", image=str(busybox.pk), command=["/bin/sleep", "300"])
    finished(response.json()["id"])
    workload = workload_in("sleeper", {"running"})
    stats = client.get(f"/api/v1/workloads/{workload.pk}/stats/").json()
    assert stats["memory_bytes"] > 0
    op = client.post(f"/api/v1/workloads/{workload.pk}/stop/", {"grace_seconds": 2}, format="json").json()
    assert finished(op["id"]).state == "succeeded"
    assert Workload.objects.get(pk=workload.pk).state == "stopped"
    op = client.post(f"/api/v1/workloads/{workload.pk}/start/", {}, format="json").json()
    assert finished(op["id"]).state == "succeeded"
    assert Workload.objects.get(pk=workload.pk).state == "running"
    assert Quota.objects.get(tenant=world.acme).used_workloads == 1
    op = client.delete(f"/api/v1/workloads/{workload.pk}/").json()
    assert finished(op["id"]).state == "succeeded"
    assert not Workload.objects.filter(pk=workload.pk).exists()
    from tests.compute.runtimes import oci_runtime

    assert oci_runtime(host).list_ids() == []
    assert Quota.objects.get(tenant=world.acme).used_workloads == 0


def test_it_restarts_on_failure_per_policy(world: World, busybox: Any, host: Host) -> None:
    create(
        world,
        "mia",
        name="flaky",
        image=str(busybox.pk),
        command=["/bin/sh", "-c", "exit 1"],
        restart_policy="on-failure",
    )
    wait_until(
        lambda: Workload.objects.filter(name="flaky", restart_count__gte=2).exists(),
        timeout=30,
        what="two restarts",
    )


def test_it_commits_a_containers_changes_into_a_new_image(world: World, busybox: Any, host: Host) -> None:
    client = client_for(world, "mia")
    create(
        world,
        "mia",
        name="writer",
        image=str(busybox.pk),
        command=["/bin/sh", "-c"],
        args=["echo committed > /greeting.txt; rm /etc/motd"],
    )
    workload = workload_in("writer", {"stopped"})
    changes = client.get(f"/api/v1/workloads/{workload.pk}/changes/").json()["changes"]
    assert {"kind": "A", "path": "/greeting.txt"} in changes
    assert {"kind": "D", "path": "/etc/motd"} in changes
    op = client.post(
        f"/api/v1/workloads/{workload.pk}/commit/", {"name": "busybox", "tag": "greeted"}, format="json"
    ).json()
    op = finished(op["id"])
    assert op.state == "succeeded", op.error
    from imaging.models import Image

    image = Image.objects.get(tenant=world.acme, name="busybox", tag="greeted")
    assert image.layers.count() == busybox.layers.count() + 1
    create(
        world,
        "mia",
        name="reader",
        image=str(image.pk),
        command=["/bin/sh", "-c"],
        args=["cat /greeting.txt; test -e /etc/motd || echo motd-gone"],
    )
    reader = workload_in("reader", {"stopped", "failed"})
    logs = client.get(f"/api/v1/workloads/{reader.pk}/logs/").json()["logs"]
    assert "committed" in logs and "motd-gone" in logs


def test_it_shows_no_changes_and_commits_no_files_for_a_container_that_changed_nothing(
    world: World, busybox: Any, host: Host
) -> None:
    """The runtime's own mount points (/dev, /proc, /sys, /etc/hosts, resolv.conf, hostname) are not the
    workload's changes: they come from an init layer, never from the container's upper dir."""
    client = client_for(world, "mia")
    create(world, "mia", name="idle", image=str(busybox.pk), command=["/bin/sleep", "0"])
    workload = workload_in("idle", {"stopped"})
    assert client.get(f"/api/v1/workloads/{workload.pk}/changes/").json()["changes"] == []
    op = client.post(
        f"/api/v1/workloads/{workload.pk}/commit/", {"name": "busybox", "tag": "same"}, format="json"
    ).json()
    assert finished(op["id"]).state == "succeeded"
    from imaging.models import Image
    from imaging.services import get_store

    image = Image.objects.get(tenant=world.acme, name="busybox", tag="same")
    top = image.image_layers.order_by("-position").first()
    assert top is not None
    layer_root = get_store().layer_path(top.layer.diff_id)
    assert sorted(str(p.relative_to(layer_root)) for p in layer_root.rglob("*")) == []


def test_it_refuses_bad_input_and_creates_nothing(world: World, busybox: Any, store_dir: Path) -> None:
    make_host("bht-host-idle")
    Quota.objects.filter(tenant=world.acme).update(workloads=1, memory_mib=1024)
    from imaging.models import Image

    foreign = Image.objects.create(
        tenant=world.globex, name="secret", tag="1", manifest_digest="x", config_digest="y"
    )
    cases = [
        ({"name": "a", "image": str(foreign.pk)}, 400, "image"),
        ({"name": "Bad_Name", "image": str(busybox.pk)}, 400, "name"),
        ({"name": "big", "image": str(busybox.pk), "memory_mib": 4096}, 409, "memory_mib"),
        ({"name": "x<y>&'\"; rm -rf /", "image": str(busybox.pk)}, 400, "name"),
        ({"name": "cpu", "image": str(busybox.pk), "vcpus": "0"}, 400, "vcpus"),
    ]
    for body, status, what in cases:
        response = create(world, "mia", **body)
        assert response.status_code == status, (what, response.json())
    assert create(world, "vic", name="viewer", image=str(busybox.pk)).status_code == 403
    assert not Workload.objects.exists()
    assert Quota.objects.get(tenant=world.acme).used_workloads == 0


def test_it_hides_another_tenants_workload(world: World, busybox: Any, store_dir: Path) -> None:
    make_host("bht-host-idle")
    response = create(world, "mia", name="mine", image=str(busybox.pk), start=False)
    assert response.status_code == 202
    workload = Workload.objects.get(name="mine")
    bob = client_for(world, "bob")
    for url in ["", "logs/", "stats/", "changes/"]:
        assert bob.get(f"/api/v1/workloads/{workload.pk}/{url}").status_code == 404
    assert bob.post(f"/api/v1/workloads/{workload.pk}/stop/", {}, format="json").status_code == 404
    assert bob.delete(f"/api/v1/workloads/{workload.pk}/").status_code == 404


def test_it_places_on_two_hosts_and_runs_on_each_hosts_queue(
    world: World, busybox: Any, store_dir: Path
) -> None:
    a, b = make_host("bht-host-a"), make_host("bht-host-b")
    try:
        with (
            host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)),
            host_agent(b, BULKHEAD_STORE_DIR=str(store_dir)),
        ):
            for name in ("one", "two"):
                create(
                    world, "mia", name=name, image=str(busybox.pk), command=["/bin/sleep", "300"], vcpus="1"
                )
            one, two = workload_in("one", {"running"}), workload_in("two", {"running"})
            assert {one.host_id, two.host_id} == {a.pk, b.pk}
            from tests.compute.runtimes import oci_runtime

            assert oci_runtime(a).list_ids() == [Workload.objects.get(host=a).runtime_id]
            assert oci_runtime(b).list_ids() == [Workload.objects.get(host=b).runtime_id]
            hosts.set_host_state(actor=Actor(user=world.user("oscar")), host=b, state="draining")
            create(world, "mia", name="three", image=str(busybox.pk), command=["/bin/sleep", "300"])
            assert workload_in("three", {"running"}).host_id == a.pk
    finally:
        cleanup_host(a)
        cleanup_host(b)


def test_it_marks_a_silent_host_lost_and_its_workloads_unknown(
    world: World, busybox: Any, store_dir: Path
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    h = make_host("bht-host-quiet")
    create(world, "mia", name="quiet", image=str(busybox.pk), start=False)
    Workload.objects.filter(name="quiet").update(state="running")
    assert hosts.mark_lost_hosts(now=timezone.now() + timedelta(seconds=61)) == [h.name]
    assert Workload.objects.get(name="quiet").state == "unknown"
    hosts.heartbeat(h.pk)
    assert Host.objects.get(pk=h.pk).state == "ready"


def test_it_readopts_running_containers_after_an_agent_restart(
    world: World, busybox: Any, store_dir: Path
) -> None:
    h = make_host("bht-host-r")
    try:
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            create(world, "mia", name="survivor", image=str(busybox.pk), command=["/bin/sleep", "300"])
            survivor = workload_in("survivor", {"running"})
        # No agent now: the container keeps running; the portal thinks nothing happened.
        runtime = OciRuntime(
            h.oci_runtime,
            state_dir=hosts.host_state_dir(h) / "containers",
            cgroup_parent=f"bulkhead-{h.pk.hex[:12]}",
        )
        assert runtime.state(survivor.runtime_id).status == "running"
        Workload.objects.filter(pk=survivor.pk).update(state="unknown")
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            workload_in("survivor", {"running"})
            runtime.stop(survivor.runtime_id, grace_seconds=1)
            assert workload_in("survivor", {"stopped", "failed"}, timeout=5).exit_code is not None
    finally:
        cleanup_host(h)


# create.ahead: the container made from the message's spec while the claim was answered, not started.
CREATE_KILL_POINTS = ["create.ahead", "create.claimed", "create.layers", "create.created", "create.started"]
DELETE_KILL_POINTS = ["delete.stopped", "delete.removed"]


def leaked_mounts(h: Host) -> list[str]:
    root = str(hosts.host_state_dir(h))
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(root)]


def leaked_loop_devices(h: Host) -> list[str]:
    """Loop devices backed by a file of the host's state dir (containers' disk images)."""
    root = str(hosts.host_state_dir(h))
    backing = (device / "loop" / "backing_file" for device in Path("/sys/block").glob("loop*"))
    return [path.read_text().strip() for path in backing if path.exists() and root in path.read_text()]


@pytest.mark.parametrize("point", CREATE_KILL_POINTS)
def test_it_converges_after_the_agent_is_killed_during_create(
    world: World, busybox: Any, store_dir: Path, point: str
) -> None:
    from tests.compute.runtimes import oci_runtime

    h = make_host(f"bht-kill-{point.split('.')[1]}")
    # The points of the create after its claim exist only where it is not created ahead of the claim.
    after_claim = point in ("create.claimed", "create.layers")
    worker_env = {"BULKHEAD_FAILPOINT": point, **({"BULKHEAD_CREATE_AHEAD": "0"} if after_claim else {})}
    try:
        # resynced: the create is the worker's (the loop's re-sync at start would take a pending one over).
        with host_agent(h, worker_env, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)) as worker:
            create(world, "mia", name="victim", image=str(busybox.pk), command=["/bin/sleep", "300"])
            wait_until(
                lambda: Workload.objects.filter(name="victim").exclude(state="pending").exists(), timeout=30
            )
            assert worker.wait(timeout=30) == -signal.SIGKILL  # killed at the point, not done before it
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            workload = workload_in("victim", {"running", "failed"}, timeout=30)
            runtime = oci_runtime(h)
            assert runtime.list_ids() == ([workload.runtime_id] if workload.state == "running" else [])
            running = workload.state == "running"
            # A running container has its disk and its overlay root mounted; nothing else is left.
            expected = (
                {
                    str(runtime.bundle_dir(workload.runtime_id) / "disk"),
                    str(runtime.rootfs_dir(workload.runtime_id)),
                }
                if running
                else set()
            )
            assert set(leaked_mounts(h)) == expected
            assert len(leaked_loop_devices(h)) == (1 if running else 0)
            # The killed worker's operation is failed by the re-sync and says why; no operation hangs.
            op = finished(str(Operation.objects.get(kind="workload.create", target_id=str(workload.pk)).pk))
            assert op.state == "succeeded" or "Interrupted" in op.error
    finally:
        cleanup_host(h)
    assert leaked_mounts(h) == []
    assert leaked_loop_devices(h) == []


@pytest.mark.parametrize("point", DELETE_KILL_POINTS)
def test_it_converges_after_the_agent_is_killed_during_delete(
    world: World, busybox: Any, store_dir: Path, point: str
) -> None:
    from tests.compute.runtimes import oci_runtime

    h = make_host(f"bht-kdel-{point.split('.')[1]}")
    try:
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            create(world, "mia", name="doomed", image=str(busybox.pk), command=["/bin/sleep", "300"])
            workload = workload_in("doomed", {"running"})
        with host_agent(h, {"BULKHEAD_FAILPOINT": point}, BULKHEAD_STORE_DIR=str(store_dir)):
            client_for(world, "mia").delete(f"/api/v1/workloads/{workload.pk}/")
            wait_until(lambda: Workload.objects.filter(pk=workload.pk, state="deleting").exists(), timeout=10)
            if point == "delete.removed":
                wait_until(lambda: oci_runtime(h).list_ids() == [], timeout=30, what="the container removed")
            else:
                wait_until(lambda: oci_runtime(h).state(workload.runtime_id).status != "running", timeout=30)
        with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir)):
            wait_until(
                lambda: not Workload.objects.filter(pk=workload.pk).exists(), timeout=30, what="deletion"
            )
            assert oci_runtime(h).list_ids() == []
            assert leaked_mounts(h) == []
            assert leaked_loop_devices(h) == []
            from tenants.models import Quota

            assert Quota.objects.get(tenant=world.acme).used_workloads == 0
    finally:
        cleanup_host(h)


def test_it_shows_the_tenants_measured_usage_beside_its_quota(world: World, busybox: Any, host: Host) -> None:
    from django.test import Client

    create(world, "mia", name="measured", image=str(busybox.pk), command=["/bin/sleep", "300"])
    workload_in("measured", {"running"})
    client = Client()
    client.force_login(world.user("mia"))
    client.get("/")
    page = client.get("/").content.decode()
    assert "Measured now: 1 running workload," in page
    assert "vCPUs busy" in page
