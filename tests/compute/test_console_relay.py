"""A micro-VM's serial console through its host's agent: the web process asks, the agent opens libvirt's
stream and relays it over the host's own broker connection (its ACL user), both ways, until the guest
ends it. Real libvirtd + QEMU (TCG here), real Redis with ACLs; another host's user sees none of it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from compute import broker_access, hosts
from compute.guest.build import ensure_guest
from compute.host import console, rpc
from compute.host.broker import url_with_credential
from compute.host.context import host_context
from compute.host.queries import SpecQueries
from compute.host_reports import InProcessLink
from compute.host_rpc import HostConsole
from compute.models import Host, Workload
from compute.runtimes.libvirt import VmRuntime, VmSpec, WorkloadPayload
from compute.runtimes.libvirtd import domain_type_for_host, ensure_libvirtd
from tenants.actors import Actor
from tests.compute.guestroot import build_busybox_root, build_root_disk
from tests.conftest import World
from tests.imaging.images import db_image
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

BOOT_TIMEOUT = 120.0


@pytest.fixture
def interactive_vm() -> Iterator[tuple[VmRuntime, uuid.UUID]]:
    """One micro-VM whose console is a shell (`sh` on the serial console)."""
    ensure_libvirtd()
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="bht-vmrelay-"))
    work.chmod(0o755)  # QEMU runs as its own user and reads the disks under here
    runtime = VmRuntime(state_dir=work / "state")
    vm_id = uuid.uuid4()
    try:
        (work / "disks").mkdir()
        (work / "logs").mkdir()
        root = build_root_disk(build_busybox_root(work / "image"), work / "root.erofs", "erofs")
        spec = VmSpec(
            vm_id=vm_id,
            vcpus=1,
            memory_mib=192,
            kernel=guest.kernel,
            initrd=guest.initrd,
            root_disk=root,
            rw_disk=work / "disks" / f"{vm_id}.ext4",
            console_log=work / "logs" / f"{vm_id}.log",
            payload=WorkloadPayload(args=("sh",), env=("PATH=/bin",), tty=True),
            rw_disk_size_mib=256,
            domain_type=domain_type_for_host(),  # type: ignore[arg-type]
        )
        runtime.create(spec)
        runtime.start(vm_id)
        wait_until(
            lambda: b"BULKHEAD-START" in runtime.console_log(vm_id), timeout=BOOT_TIMEOUT, what="the boot"
        )
        yield runtime, vm_id
    finally:
        with contextlib.suppress(Exception):
            runtime.delete(vm_id)
        shutil.rmtree(work, ignore_errors=True)


def joined_host(name: str) -> tuple[Host, redis.Redis]:
    """A host with its credential and the broker connection its agent makes (its own ACL user)."""
    facts = {"cpus": 2, "memory_mib": 2048, "disk_gib": 20, "libvirt": True}
    host = hosts.register_host(actor=Actor.system("test"), name=name, facts=facts)
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    url = url_with_credential(broker_access.agent_broker_url(host.pk), secret)
    return host, redis.Redis.from_url(url, socket_timeout=10)


@contextlib.contextmanager
def agent_answering(host: Host, client: redis.Redis, runtime: VmRuntime, vm_id: uuid.UUID) -> Iterator[None]:
    """The agent loop's answerer on the host's own connection; its consoles open the test VM's."""
    relays = console.ConsoleRelays(
        client, host.pk, lambda target: runtime.open_console(vm_id, nonblocking=True)
    )
    answerer = rpc.Answerer(
        client,
        host.pk,
        rpc.handlers_for(SpecQueries(host_context(host.pk)), relays),
        rpc.PlacedWorkloads(InProcessLink(host)).holds,
    )
    stop = threading.Event()

    def loop() -> None:
        from django.db import connection

        try:
            while not stop.is_set():
                answerer.serve(0.1)
        finally:
            connection.close()

    answerer.serve(0)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_a_microvm_console_travels_through_its_hosts_own_broker_connection(
    world: World, interactive_vm: tuple[VmRuntime, uuid.UUID]
) -> None:
    runtime, vm_id = interactive_vm
    host, host_client = joined_host("bht-vmrelay-a")
    _, other_client = joined_host("bht-vmrelay-b")
    workload = Workload.objects.create(
        id=vm_id,
        tenant=world.acme,
        name="relayed",
        image=db_image(world.acme, "img-relayed"),
        host=host,
        isolation="microvm",
        state="running",
    )
    try:
        with agent_answering(host, host_client, runtime, vm_id):
            remote = HostConsole(workload)
            remote.open()
            # Another host's broker user can neither read the console nor type into it.
            for attempt in (
                lambda: other_client.lrange(remote.outbox, 0, -1),
                lambda: other_client.rpush(remote.inbox, b"reboot\n"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    attempt()
            remote.send(b"echo relay-$((6 * 7)); exit 5\n")
            received = b""
            ended = False

            def read() -> bool:
                nonlocal received, ended
                chunk: Any = remote.recv(0.2)
                if chunk is None:
                    ended = True
                else:
                    received += chunk
                return ended

            wait_until(read, timeout=BOOT_TIMEOUT, interval=0, what="the console to end with the guest")
            remote.close()
        assert b"relay-42" in received
        wait_until(
            lambda: runtime.state(vm_id).status != "running", timeout=BOOT_TIMEOUT, what="the VM to stop"
        )
        assert runtime.state(vm_id).exit_code == 5
    finally:
        for h in Host.objects.filter(name__startswith="bht-vmrelay-"):
            broker_access.revoke(h.pk)
