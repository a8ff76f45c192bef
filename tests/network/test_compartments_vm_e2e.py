"""A container and a micro-VM in one compartment reach each other by name (issue 7), on a host whose
network lives in a network namespace.

libvirt makes the VM's tap in the root namespace (`<interface type='ethernet'>`); right after the start
the agent moves it into the host's namespace onto the compartment's bridge (QEMU's open descriptor of the
tap keeps working). The VM asks the compartment's dnsmasq for the container's address and reads a line
from it; the container likewise resolves the VM by name and reads a line from it.
Deleting both leaves no domain, tap, bridge or namespace behind.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from nettopo import http_get, nslookup
from test_compartments_e2e import (  # noqa: F401 - fixtures
    Site,
    address_of,
    compartment,
    leftovers,
    logs,
    net_image,
    site,
)

from compute import services
from compute.choices import Isolation
from compute.compartments import Compartment
from compute.models import Workload
from compute.network.bridge import list_owned_links
from compute.network.netns import iproute, netns_exists
from compute.runtimes.libvirt import TAP_PREFIX, domain_name, tap_name
from tenants.actors import Actor
from tests.compute.conftest import finished, store_dir, workload_in  # noqa: F401
from tests.conftest import client_for
from tests.processes import wait_until

NEEDS_HOST = True
pytestmark = pytest.mark.django_db(transaction=True)

# The container: serves a line on 8080 and, meanwhile, resolves the VM by name and reads its line.
BOX_COMMAND = (
    "(while true; do echo hello-from-box | nc -l -p 8080; done) & "
    "for i in $(seq 600); do "
    "ip=$(nslookup vm {gateway} | sed -n 's/^Address: \\([0-9.]*\\)$/\\1/p'); "
    '[ -n "$ip" ] && got=$(nc -w 2 "$ip" 9090 </dev/null) && [ -n "$got" ] && break; sleep 0.2; done; '
    'echo "vm is $ip"; echo "box got: $got"; wait'
)
# Inside the VM: resolve the container on the gateway's dnsmasq, read its line, then serve one line.
VM_COMMAND = (
    "for i in $(seq 100); do "
    "ip=$(nslookup box {gateway} | sed -n 's/^Address: \\([0-9.]*\\)$/\\1/p'); "
    '[ -n "$ip" ] && break; sleep 0.2; done; echo "box is $ip"; '
    "for i in $(seq 100); do "
    'got=$(nc -w 2 "$ip" 8080 </dev/null) && [ -n "$got" ] && break; sleep 0.2; done; '
    'echo "got: $got"; '
    "echo hello-from-vm | nc -l -p 9090; echo vm-done"
)


@pytest.fixture
def vm_site(site: Site) -> Iterator[Site]:  # noqa: F811
    """The site of the container test; its micro-VMs are deleted also after a failure."""
    yield site
    from tests.compute.runtimes import vm_runtime

    runtime = vm_runtime(site.host)
    for vm_id in runtime.list_ids():
        runtime.delete(vm_id)


def run(where: Site, name: str, command: str, joins: Compartment, isolation: str) -> Workload:
    spec = services.WorkloadSpec(
        name=name, image=where.image, isolation=isolation, command=["/bin/sh", "-c", command]
    )
    op = services.create_workload(
        actor=Actor(user=where.world.user("mia")), tenant=where.world.acme, spec=spec, compartments=[joins]
    )
    assert finished(str(op.pk)).state == "succeeded", finished(str(op.pk)).error
    return Workload.objects.get(pk=op.target_id)


def taps(netns: str | None) -> list[str]:
    with iproute(netns) as ipr:
        return sorted(list_owned_links(ipr, TAP_PREFIX))


def domains() -> list[str]:
    listing = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()]


def test_a_container_and_a_micro_vm_in_one_compartment_reach_each_other_by_name(vm_site: Site) -> None:
    began = time.monotonic()
    front = compartment(vm_site, "front")
    gateway = str(front.gateway_address)
    box = run(vm_site, "box", BOX_COMMAND.format(gateway=gateway), front, Isolation.NAMESPACE)
    workload_in("box", {"running"})
    vm = run(vm_site, "vm", VM_COMMAND.format(gateway=gateway), front, Isolation.MICROVM)
    workload_in("vm", {"running"}, timeout=180)
    started = time.monotonic()

    # The tap sits in the host's namespace, a port of the compartment's bridge; none in the root one.
    tap = tap_name(vm.pk)
    assert tap not in taps(None)
    with iproute(vm_site.host_netns) as ipr:
        link = ipr.get_links(ifname=tap)[0]
        bridge = ipr.get_links(ifname=front.bridge)[0]
        assert link.get_attr("IFLA_MASTER") == bridge["index"]

    # VM -> container: by name through the compartment's dnsmasq, then TCP.
    wait_until(lambda: "got: " in logs(vm_site, vm), timeout=120, what="the VM reached the container")
    vm_output = logs(vm_site, vm)
    assert f"box is {address_of(box)}" in vm_output, vm_output
    assert "got: hello-from-box" in vm_output, vm_output
    vm_reached = time.monotonic()

    # Container -> VM: the container's own process resolves the VM's name and reads the VM's line.
    wait_until(lambda: "box got: " in logs(vm_site, box), timeout=120, what="the container reached the VM")
    box_output = logs(vm_site, box)
    assert f"vm is {address_of(vm)}" in box_output, box_output
    assert "box got: hello-from-vm" in box_output, box_output
    assert nslookup(box.runtime_id, "vm", front.gateway_address) == [address_of(vm)]
    vm_done = workload_in("vm", {"stopped", "failed"}, timeout=60)
    assert vm_done.state == "stopped" and vm_done.exit_code == 0, (vm_done.status_message, logs(vm_site, vm))
    assert "vm-done" in logs(vm_site, vm)
    # The tap went with QEMU when the guest powered off: nothing left in the host's namespace.
    wait_until(lambda: tap not in taps(vm_site.host_netns), timeout=10, what="the tap gone with QEMU")

    # Delete both: no domain, tap, bridge, dnsmasq or namespace of theirs is left.
    mia = client_for(vm_site.world, "mia")
    stop = mia.post(f"/api/v1/workloads/{box.pk}/stop/", {"grace_seconds": 0}, format="json")
    assert finished(stop.json()["id"]).state == "succeeded"
    for workload in (box, vm):
        assert finished(mia.delete(f"/api/v1/workloads/{workload.pk}/").json()["id"]).state == "succeeded"
    wait_until(lambda: not Workload.objects.exists(), timeout=30, what="workloads gone")
    assert domain_name(vm.pk) not in domains()
    assert tap not in taps(None) and taps(vm_site.host_netns) == []
    assert leftovers(vm_site.host, vm_site.host_netns) == []
    assert not netns_exists(box.runtime_id)
    assert client_for(vm_site.world, "amir").delete(f"/api/v1/compartments/{front.pk}/").status_code == 204
    print(
        f"timings: box+vm running {started - began:.1f} s, VM reached the container "
        f"{vm_reached - started:.1f} s later, whole test body {time.monotonic() - began:.1f} s"
    )


# Inside the VM, as its root would: probe the host, the infrastructure, the metadata address, another
# compartment and the internet; then take a neighbour-free address of the compartment, then another MAC,
# and try the internet again with each; then its own identity back, and the internet once more.
VM_ATTACK = """
probe() {{
  r=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 "$1" "$2" 2>/dev/null | tail -n 1); echo "probe $3: [$r]"
}}
own=$(ip -4 addr show dev eth0 | sed -n 's/^ *inet \\([0-9./]*\\) .*/\\1/p')
mac=$(ip link show dev eth0 | sed -n 's/^ *link\\/ether \\([0-9a-f:]*\\) .*/\\1/p')
echo "own $own $mac"
for i in $(seq 50); do probe {internet} 80 warmup | grep -q internet && break; sleep 0.2; done
probe {host} 2222 host
probe {gateway} 2222 gateway
probe {portal} 8000 portal
probe 169.254.169.254 80 metadata
probe {other} 80 other-compartment
probe {internet} 80 internet
ip addr flush dev eth0; ip addr add {forged}/{prefix} dev eth0; ip route add default via {gateway}
probe {internet} 80 forged-address
ip addr flush dev eth0; ip addr add "$own" dev eth0; ip route add default via {gateway}
ip link set dev eth0 address 02:66:66:66:66:66
probe {internet} 80 forged-mac
ip link set dev eth0 address "$mac"
probe {internet} 80 own-again
echo attack-done
"""


def test_a_micro_vm_reaches_the_internet_and_nothing_else_and_cannot_spoof(vm_site: Site) -> None:
    from nettopo import INTERNET_GATEWAY, INTERNET_SERVER, EchoHTTPServer
    from test_compartments_e2e import WEB_COMMAND

    metadata = "169.254.169.254"
    with iproute(vm_site.internet_netns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=metadata, prefixlen=32)
    portal = str(INTERNET_GATEWAY.ip)  # on the hosts' segment, which the operator protects
    servers = [
        EchoHTTPServer(vm_site.host_netns, "0.0.0.0", 2222, "host"),
        EchoHTTPServer(vm_site.internet_netns, portal, 8000, "portal"),
        EchoHTTPServer(vm_site.internet_netns, metadata, 80, "metadata"),
    ]
    try:
        front, back = compartment(vm_site, "front"), compartment(vm_site, "back")
        other = run(vm_site, "other", WEB_COMMAND, back, Isolation.NAMESPACE)
        workload_in("other", {"running"})
        # Every target is really up: each answers from where it may be reached.
        for netns, address, port, answer in (
            (vm_site.internet_netns, vm_site.uplink_ip, 2222, "host"),
            (vm_site.internet_netns, portal, 8000, "portal"),
            (vm_site.internet_netns, metadata, 80, "metadata"),
            (other.runtime_id, address_of(other), 80, "hello-from-web"),
        ):
            assert answer in (http_get(netns, address, port) or ""), (address, port)
        command = VM_ATTACK.format(
            internet=INTERNET_SERVER,
            host=vm_site.uplink_ip,
            gateway=front.gateway_address,
            portal=portal,
            other=address_of(other),
            forged=front.network.network_address + 200,
            prefix=front.network.prefixlen,
        )
        vm = run(vm_site, "vm", command, front, Isolation.MICROVM)
        wait_until(lambda: "attack-done" in logs(vm_site, vm), timeout=240, what="the VM's probes")
        output = logs(vm_site, vm)
        results = dict(re.findall(r"^probe ([a-z-]+): \[(.*)\]$", output, flags=re.MULTILINE))
        assert results.pop("internet").startswith("internet "), output
        assert results.pop("own-again").startswith("internet "), output
        results.pop("warmup", None)
        assert results == {
            "host": "",
            "gateway": "",
            "portal": "",
            "metadata": "",
            "other-compartment": "",
            "forged-address": "",
            "forged-mac": "",
        }, output
    finally:
        for server in servers:
            server.stop()


def test_a_vm_nic_for_a_netns_host_is_a_plain_tap_for_the_agent_to_move() -> None:
    import uuid
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from compute.runtimes.libvirt import VmNetwork, VmSpec, WorkloadPayload, domain_xml

    def interface(attach: str) -> ET.Element:
        network = VmNetwork("52:54:00:00:00:07", "bhb0123", "10.9.0.7/24", attach=attach)  # type: ignore[arg-type]
        spec = VmSpec(
            vm_id=uuid.uuid4(),
            vcpus=1,
            memory_mib=128,
            kernel=Path("/k"),
            initrd=Path("/i"),
            root_disk=Path("/r"),
            rw_disk=Path("/w"),
            console_log=Path("/c"),
            payload=WorkloadPayload(args=("true",)),
            network=network,
        )
        # Our own generated XML, not untrusted input.
        found = ET.fromstring(domain_xml(spec, qemu_uid=1, qemu_gid=1)).find("devices/interface")  # noqa: S314
        assert found is not None
        assert found.find("target").get("dev") == tap_name(spec.vm_id)  # type: ignore[union-attr]
        return found

    plain = interface("ethernet")
    assert plain.get("type") == "ethernet" and plain.find("source") is None
    assert plain.find("target").get("managed") == "yes"  # type: ignore[union-attr]
    bridged = interface("bridge")
    assert bridged.get("type") == "bridge" and bridged.find("source").get("bridge") == "bhb0123"  # type: ignore[union-attr]
