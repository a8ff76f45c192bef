"""Hosts that are machines of their own (tests/compute/separate_hosts.py): each joined by the exact
`make agent` command the portal's API answers, in its own network and mount namespaces, with its own
empty layer store, reaching only the portal's HTTP port and the broker. Images imported on the portal run
on each as containers and micro-VMs; one host's credential acts on nothing of the other's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Host, Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import create, finished, workload_in
from tests.compute.separate_hosts import SeparateHost, separate_portal
from tests.conftest import World, client_for
from tests.imaging.images import (
    Entry,
    build_image,
    busybox_layers,
    make_layer,
    post_archive,
    run_inline,
    write_oci_archive,
)
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def logs_of(world: World, workload: Workload) -> str:
    return str(client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"])


def only_on(world: World, target: SeparateHost, others: list[SeparateHost]) -> None:
    """Placement's choice made for the test: every other host in maintenance."""
    oscar = Actor(user=world.user("oscar"))
    hosts.set_host_state(actor=oscar, host=Host.objects.get(pk=target.row.pk), state="ready")
    for other in others:
        hosts.set_host_state(actor=oscar, host=Host.objects.get(pk=other.row.pk), state="maintenance")


def test_a_host_without_the_database_route_reaches_only_the_portals_http_port_and_the_broker(
    world: World, store_dir: Path
) -> None:
    """The switch the lead flips when the agent stops reading the database: then no host has a route to
    PostgreSQL's port, and its settings file (0600) carries no database URL."""
    with (
        separate_portal(store_dir, world, allow_database=False) as portal,
        portal.host("bht-sep-nodb", answering=False) as host,
    ):
        portal.assert_no_route_to_database(host)
        assert host.probe("connect", portal.address, str(portal.http_port)) == "open"
        assert host.probe("connect", portal.address, str(portal.redis_port)) == "open"
        # Nothing else of the portal's machine, and not its loopback (where Redis itself listens).
        assert host.probe("connect", "127.0.0.1", str(portal.redis_port)) != "open"
        settings_file = host.probe("env-file")
        assert settings_file["mode"] == 0o600
        assert "DATABASE_URL" not in settings_file["keys"], settings_file
        assert {"BULKHEAD_HOST_CREDENTIAL", "BULKHEAD_PORTAL_URL"} <= set(settings_file["keys"])


# What no process of a host may hold: a way to the database, the portal's settings or its secret.
NOT_ON_A_HOST = (
    "DATABASE_URL",
    "BULKHEAD_AGENT_DATABASE_URL",
    "DJANGO_SETTINGS_MODULE",
    "BULKHEAD_SECRET_KEY",
)


def environment_of(pid: int) -> dict[str, str]:
    pairs = (entry.partition(b"=") for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    return {key.decode(): value.decode(errors="replace") for key, sep, value in pairs if sep}


def command_of(pid: int) -> list[str]:
    parts = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    return [part.decode(errors="replace") for part in parts]


def test_a_joined_host_runs_no_django_process_and_its_processes_hold_no_database_setting(
    world: World, store_dir: Path
) -> None:
    """The host's machine has no Django and none of the portal's code (the harness hides them: a tmpfs
    over each), yet it joins and answers; its processes are the host package's (worker and agent),
    and none of them holds a database URL, a settings module or the portal's secret."""
    with separate_portal(store_dir, world) as portal, portal.host("bht-sep-nodj") as host:
        hidden = [
            "django",
            "rest_framework",
            "portal.settings",
            "portal.celery",
            "compute.models",
            "volumes.services",
        ]
        present = ["compute.host.worker", "compute.host.agent_loop", "compute.host.volume_tasks"]
        imports = host.probe("importable", *hidden, *present)
        assert [module for module in hidden if imports[module] is True] == [], imports
        assert [module for module in present if imports[module] is not True] == [], imports
        commands = {pid: command_of(pid) for pid in host.processes()}
        lines = [" ".join(command) for command in commands.values()]
        worker = f"-m celery -A compute.host.worker worker -l WARNING -Q host.{host.row.pk} "
        assert any(worker in line for line in lines), lines
        assert any(command[-3:] == ["-m", "compute.host", "agent"] for command in commands.values()), commands
        for pid, command in commands.items():
            line = " ".join(command)
            assert "manage.py" not in line and "-A portal" not in line and "portal.stack" not in line, line
            environment = environment_of(pid)
            held = [name for name in environment if name in NOT_ON_A_HOST or name.startswith("PG")]
            assert held == [], (line, held)
        assert Host.objects.get(pk=host.row.pk).state == "ready"


def import_image(world: World, tmp_path: Path, name: str, layers: list[Any]) -> Any:
    """An image imported on the portal (its layers in the portal's store only)."""
    from imaging.models import Image

    archive = write_oci_archive(build_image(layers), tmp_path / f"{name}.tar")
    response = post_archive(client_for(world, "alice"), archive, name=name, tag="1", tenant=world.acme)
    assert response.status_code == 202, response.json()
    assert run_inline(response.json()["id"]).state == "succeeded"
    return Image.objects.get(tenant=world.acme, name=name, tag="1")


def run(world: World, image: Any, name: str, script: str, isolation: str = "namespace") -> Workload:
    response = create(
        world, "mia", name=name, image=str(image.pk), isolation=isolation,
        command=["/bin/sh", "-c", script], memory_mib=256,
    )  # fmt: skip
    assert response.status_code == 202, response.json()
    op = finished(response.json()["id"], timeout=180)
    assert op.state == "succeeded", (op.error, op.operator_details)
    return Workload.objects.get(name=name)


def blobs_in(host: SeparateHost) -> set[str]:
    return {p.name for p in (host.data_dir / "store" / "blobs" / "sha256").glob("*")}


def test_an_image_imported_on_the_portal_runs_on_two_separate_hosts_and_neither_acts_on_the_other(
    world: World, busybox: Any, store_dir: Path, tmp_path: Path
) -> None:
    marked = [*busybox_layers(), make_layer({"only-b": Entry(b"b's alone\n")})]
    only_b = import_image(world, tmp_path, "only-b", marked)
    shared = set(busybox.layers.values_list("digest", flat=True))
    (only_b_digest,) = set(only_b.layers.values_list("digest", flat=True)) - shared
    mia = client_for(world, "mia")
    with (
        separate_portal(store_dir, world) as portal,
        portal.host("bht-sep-a") as a,
        portal.host("bht-sep-b") as b,
    ):
        assert blobs_in(a) == blobs_in(b) == set()  # each host's own store starts empty
        placed: dict[str, Workload] = {}
        for host, other in ((a, b), (b, a)):
            only_on(world, host, [other])
            container = run(world, busybox, f"c-{host.name}", f"echo ran-on-{host.name}; exec sleep 300")
            assert container.host_id == host.row.pk
            wait_until(lambda: f"ran-on-{host.name}" in logs_of(world, container), timeout=30, what="logs")  # noqa: B023
            stopped = finished(mia.post(f"/api/v1/workloads/{container.pk}/stop/", {}).json()["id"])
            assert stopped.state == "succeeded", stopped.error
            assert Workload.objects.get(pk=container.pk).state == "stopped"
            started = finished(mia.post(f"/api/v1/workloads/{container.pk}/start/", {}).json()["id"])
            assert started.state == "succeeded", started.error
            workload_in(container.name, {"running"})
            vm = run(world, busybox, f"vm-{host.name}", f"echo vm-on-{host.name}", isolation="microvm")
            assert vm.host_id == host.row.pk
            vm = workload_in(vm.name, {"stopped", "failed"}, timeout=120)
            assert (vm.state, vm.exit_code) == ("stopped", 0), vm.status_message
            assert f"vm-on-{host.name}" in logs_of(world, vm)
            placed[host.name] = container
        # Every layer came from the portal with the host's own credential, into the host's own store.
        busybox_blobs = {layer.digest.removeprefix("sha256:") for layer in busybox.layers.all()}
        assert busybox_blobs <= blobs_in(a) and busybox_blobs <= blobs_in(b)

        only_on(world, b, [a])
        b_only = run(world, only_b, "b-only", "cat /only-b; exec sleep 300")
        wait_until(lambda: "b's alone" in logs_of(world, b_only), timeout=30, what="b's logs")
        assert only_b_digest.removeprefix("sha256:") in blobs_in(b)

        # A process on host a with a's settings file: its own things answer, b's are like missing ones.
        assert a.probe("get", f"/api/v1/hosts/self/workloads/{placed[a.name].pk}/") == 200
        assert a.probe("get", f"/api/v1/hosts/self/workloads/{b_only.pk}/") == 404
        assert a.probe("get", f"/api/v1/hosts/self/workloads/{placed[b.name].pk}/") == 404
        assert a.probe("get", f"/v2/acme/only-b/blobs/{only_b_digest}") == 404
        assert b.probe("get", f"/v2/acme/only-b/blobs/{only_b_digest}") == 200
        assert only_b_digest.removeprefix("sha256:") not in blobs_in(a)
        denied = AuditEntry.objects.filter(outcome="denied", actor_label="host bht-sep-a")
        assert {"host.workload.read", "host.blob.fetch"} <= set(denied.values_list("action", flat=True))
        assert not AuditEntry.objects.filter(outcome="denied", actor_label="host bht-sep-b").exists()
