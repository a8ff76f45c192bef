"""A workload's verbs on hosts that are machines of their own (tests/compute/separate_hosts.py: own
network and mount namespaces, no route to the database, the portal's data masked): logs, the console,
stop, start, changes and commit all travel through the host's own outbound connections (the host API
with its credential, its broker user), and the committed image runs on the other host, which fetches
the new layer from the portal. Once for a namespace container, once for a micro-VM (TCG: slow, so one)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.urls import reverse

from compute.models import Workload
from imaging.models import Image
from portal.asgi import application
from tenants.models import AuditEntry
from tests.compute.conftest import finished, workload_in
from tests.compute.separate_hosts import SeparateHost, separate_portal
from tests.compute.test_console import console_path, session_headers
from tests.compute.test_separate_hosts import blobs_in, logs_of, only_on, run
from tests.conftest import World, client_for
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

VM_BOOT = 180.0


def console_bytes(world: World, workload: Workload, until: bytes, timeout: float = 60) -> tuple[str, bytes]:
    """Open the workload's console websocket as mia (token from the UI's endpoint) and read until
    `until` arrives: (the hello's mode, what was read)."""
    browser = Client()
    browser.force_login(world.user("mia"))
    token = browser.post(reverse("workload-console-token", args=[workload.pk])).json()["token"]
    headers = session_headers(world.user("mia"))

    async def watch() -> tuple[str, bytes]:
        ws = WebsocketCommunicator(application, console_path(workload, token), headers=headers)
        connected, _ = await ws.connect()
        assert connected
        hello = json.loads(await ws.receive_from(timeout=30))
        seen = b""
        deadline = time.monotonic() + timeout
        while until not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            output = await ws.receive_output(timeout=timeout)
            assert output["type"] == "websocket.send", output
            seen += output.get("bytes") or b""
        await ws.disconnect()
        return str(hello["mode"]), seen

    return async_to_sync(watch)()


def verb(world: World, workload: Workload, name: str, timeout: float = 120, **body: Any) -> None:
    answer = client_for(world, "mia").post(f"/api/v1/workloads/{workload.pk}/{name}/", body, format="json")
    assert answer.status_code == 202, answer.json()
    op = finished(answer.json()["id"], timeout=timeout)
    assert op.state == "succeeded", (name, op.error, op.operator_details)


def changes_of(world: World, workload: Workload) -> list[dict[str, str]]:
    answer = client_for(world, "mia").get(f"/api/v1/workloads/{workload.pk}/changes/")
    assert answer.status_code == 200, answer.json()
    return list(answer.json()["changes"])


def commit(world: World, workload: Workload, tag: str, timeout: float = 120) -> Image:
    answer = client_for(world, "mia").post(
        f"/api/v1/workloads/{workload.pk}/commit/", {"name": "committed", "tag": tag}, format="json"
    )
    assert answer.status_code == 202, answer.json()
    op = finished(answer.json()["id"], timeout=timeout)
    assert op.state == "succeeded", (op.error, op.operator_details)
    image = Image.objects.get(tenant=world.acme, name="committed", tag=tag)
    assert op.result == {"image": str(image.pk)}
    return image


def top_layer_blob(image: Image) -> str:
    top = image.image_layers.order_by("-position").select_related("layer").first()
    assert top is not None
    return top.layer.digest.removeprefix("sha256:")


def test_a_containers_and_a_microvms_verbs_work_on_separate_hosts_and_their_commits_run_on_the_other(
    world: World, busybox: Any, store_dir: Path
) -> None:
    ticking = "i=0; while true; do echo {tag}-tick $i; i=$((i+1)); sleep 1; done"
    with (
        separate_portal(store_dir, world) as portal,
        portal.host("bht-sepv-a") as a,
        portal.host("bht-sepv-b") as b,
    ):
        hosts_by_name: dict[str, SeparateHost] = {a.name: a, b.name: b}
        # --- a container on a ----------------------------------------------------------------------
        only_on(world, a, [b])
        script = "echo made > /made.txt; rm /etc/motd; " + ticking.format(tag="c")
        container = run(world, busybox, "c-verbs", script)
        assert container.host_id == a.row.pk
        wait_until(lambda: "c-tick" in logs_of(world, container), timeout=30, what="the container's logs")
        mode, seen = console_bytes(world, container, until=b"c-tick")
        assert mode == "output" and b"c-tick" in seen
        verb(world, container, "stop", grace_seconds=2)
        assert Workload.objects.get(pk=container.pk).state == "stopped"
        verb(world, container, "start")
        workload_in(container.name, {"running"})
        changes = changes_of(world, container)
        assert {"kind": "A", "path": "/made.txt"} in changes and {"kind": "D", "path": "/etc/motd"} in changes
        verb(world, container, "stop", grace_seconds=2)
        from_container = commit(world, container, "from-container")
        assert from_container.layers.count() == busybox.layers.count() + 1
        assert top_layer_blob(from_container) not in blobs_in(b)
        # ... runs on b, which fetches the new layer from the portal with its own credential.
        only_on(world, b, [a])
        reader = run(world, from_container, "c-reader", "cat /made.txt; test -e /etc/motd || echo motd-gone")
        assert reader.host_id == b.row.pk
        reader = workload_in(reader.name, {"stopped", "failed"}, timeout=60)
        assert "made" in logs_of(world, reader) and "motd-gone" in logs_of(world, reader)
        assert top_layer_blob(from_container) in blobs_in(b)

        # --- a micro-VM on b -----------------------------------------------------------------------
        vm = run(
            world, busybox, "vm-verbs", "echo vm-made > /vm-made.txt; " + ticking.format(tag="vm"), "microvm"
        )
        assert vm.host_id == b.row.pk
        wait_until(lambda: "vm-tick" in logs_of(world, vm), timeout=VM_BOOT, what="the micro-VM's logs")
        # Its serial console, relayed by b's agent over b's own broker connection.
        mode, seen = console_bytes(world, vm, until=b"vm-tick", timeout=60)
        assert mode == "console" and b"vm-tick" in seen
        verb(world, vm, "stop", timeout=VM_BOOT, grace_seconds=20)  # a clean stop exports its changes
        assert Workload.objects.get(pk=vm.pk).state == "stopped"
        assert {"kind": "A", "path": "/vm-made.txt"} in changes_of(world, vm)
        from_vm = commit(world, vm, "from-microvm", timeout=VM_BOOT)
        verb(world, vm, "start", timeout=VM_BOOT)
        workload_in(vm.name, {"running"}, timeout=VM_BOOT)
        # ... runs on a, as a micro-VM too.
        only_on(world, a, [b])
        vm_reader = run(world, from_vm, "vm-reader", "cat /vm-made.txt", "microvm")
        assert vm_reader.host_id == a.row.pk
        vm_reader = workload_in(vm_reader.name, {"stopped", "failed"}, timeout=VM_BOOT)
        assert (vm_reader.state, vm_reader.exit_code) == ("stopped", 0), vm_reader.status_message
        assert "vm-made" in logs_of(world, vm_reader)
        assert top_layer_blob(from_vm) in blobs_in(a)
        # Neither host was refused anything: each acted on its own workloads only.
        refused = AuditEntry.objects.filter(
            outcome="denied", actor_label__in=[f"host {n}" for n in hosts_by_name]
        )
        assert not refused.exists(), list(refused.values_list("action", "details"))
