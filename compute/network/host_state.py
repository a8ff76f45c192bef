"""Level-triggered apply of a host's whole network state: bridges, VXLAN, DNS, nftables, forwarding.

`apply_host_network` takes everything Bulkhead wants on one host and converges the host to it: missing
pieces are created, pieces changed from outside are put back, pieces no longer wanted are removed. It
remembers what it applied last (a small JSON file in the state directory), which lets its report tell
a change of the wanted state ("changed") from a repair of something broken behind its back
("repaired"). Applying the same state twice changes nothing and reports nothing.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from compute.network import dns, nftables
from compute.network.bridge import (
    delete_link,
    ensure_bridge,
    link_by_name,
    list_owned_links,
)
from compute.network.names import BRIDGE_PREFIX, VXLAN_PREFIX, gateway_mac_for, vxlan_name_for
from compute.network.netns import ensure_sysctl, host_networks, iproute
from compute.network.spec import (
    CompartmentNet,
    HostNetworkState,
    effective_mtu,
    validate_host_state,
)
from compute.network.vxlan import ensure_vxlan

RECORD_NAME = "applied.json"
AF_INET = 2


@dataclass(frozen=True)
class ApplyReport:
    """What an apply did: `changed` follows from a new wanted state, `repaired` undid outside damage.

    `repaired_by_compartment` says whose network each repair restored: a compartment's own pieces
    (bridge, VXLAN, DNS) go to it; host-wide ones (the shared nftables tables, forwarding) to every
    compartment on the host, since each of them depended on what was broken.
    """

    changed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    repaired_by_compartment: dict[str, list[str]] = field(default_factory=dict)

    @property
    def unchanged(self) -> bool:
        """True when the host already was exactly as wanted."""
        return not self.changed and not self.repaired


def _compartment_fingerprint(compartment: CompartmentNet) -> str:
    return nftables.fingerprint(
        {
            "id": compartment.compartment_id,
            "bridge": compartment.bridge,
            "subnet": str(compartment.subnet),
            "gateway": str(compartment.gateway),
            "nat": compartment.nat,
            "vni": compartment.vni,
            "peers": sorted(str(p) for p in compartment.vxlan_peers),
            "names": sorted((k, str(v)) for k, v in compartment.dns_names.items()),
            "mtu": compartment.mtu,
            "upstreams": [str(u) for u in compartment.dns_upstreams],
        }
    )


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One apply per host at a time: two agents' tasks must not interleave their changes."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(dns.DIR_MODE)
    with (state_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_record(state_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((state_dir / RECORD_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"compartments": {}, "nft": None, "ip_forward": False}
    return record if isinstance(record, dict) else {"compartments": {}, "nft": None, "ip_forward": False}


def _save_record(state_dir: Path, record: dict[str, Any]) -> None:
    scratch = state_dir / (RECORD_NAME + ".tmp")
    scratch.write_text(json.dumps(record, sort_keys=True))
    scratch.replace(state_dir / RECORD_NAME)


def _uplink_facts(ipr: IPRoute, uplink: str) -> tuple[int, IPv4Address | None]:
    link = link_by_name(ipr, uplink)
    if link is None:
        raise ValueError(f"uplink {uplink!r} does not exist on this host")
    addresses = ipr.get_addr(family=AF_INET, index=link["index"])
    first = addresses[0].get_attr("IFA_LOCAL") if addresses else None
    return link.get_attr("IFLA_MTU"), IPv4Address(first) if first else None


class _Reporter:
    """Sorts each change into changed/repaired by whether the wanted state was the same last time."""

    def __init__(self, compartment_ids: list[str] | None = None) -> None:
        self.changed: list[str] = []
        self.repaired: list[str] = []
        self.compartment_ids = compartment_ids or []
        self.by_compartment: dict[str, list[str]] = {}

    def note(
        self, what: str, changes: list[str], *, same_as_before: bool, compartment_id: str | None = None
    ) -> None:
        """Record `changes` to `what`; a repair of a compartment's own piece names its compartment."""
        if not changes:
            return
        line = f"{what}: {', '.join(changes)}"
        (self.repaired if same_as_before else self.changed).append(line)
        if same_as_before:
            for owner in [compartment_id] if compartment_id else self.compartment_ids:
                self.by_compartment.setdefault(owner, []).append(line)

    def report(self) -> ApplyReport:
        return ApplyReport(
            changed=self.changed, repaired=self.repaired, repaired_by_compartment=self.by_compartment
        )


def apply_host_network(
    state: HostNetworkState, host_netns: str | None = None, *, state_dir: Path | None = None
) -> ApplyReport:
    """Converge the host (`host_netns`, None = the real host) to `state`; idempotent.

    Validates everything first (ValueError, nothing touched), then ensures forwarding, one bridge per
    compartment with its gateway, VXLAN links, a dnsmasq per compartment, and Bulkhead's nftables
    tables (replaced in one transaction when they differ); removes bridges, VXLAN links and DNS of
    compartments no longer in `state`. `state_dir` defaults to /run/bulkhead/network/<netns|root>.
    """
    validate_host_state(state)
    state_dir = state_dir or dns.state_dir_for(host_netns)
    with iproute(host_netns) as ipr:
        uplink_mtu, uplink_address = _uplink_facts(ipr, state.uplink)
        validate_host_state(state, host_networks(host_netns, ipr=ipr))
        vxlan_local = state.vxlan_local or uplink_address
        if vxlan_local is None and any(c.vni is not None for c in state.compartments):
            raise ValueError(f"uplink {state.uplink!r} has no IPv4 address to carry VXLAN")
        with _locked(state_dir):
            return _apply_locked(state, host_netns, state_dir, ipr, uplink_mtu, vxlan_local)


def ensure_compartment_bridge(
    state: HostNetworkState,
    compartment_id: str,
    host_netns: str | None = None,
    *,
    state_dir: Path | None = None,
) -> None:
    """Only the bridge of one of `state`'s compartments, exactly as `apply_host_network` makes it (the
    state validated the same way first): a container can be attached to a new compartment before the
    whole apply, which then realises its published ports in one load instead of two."""
    validate_host_state(state)
    compartment = next((c for c in state.compartments if c.compartment_id == compartment_id), None)
    if compartment is None:
        raise ValueError(f"compartment {compartment_id!r} is not in the host's state")
    state_dir = state_dir or dns.state_dir_for(host_netns)
    with iproute(host_netns) as ipr:
        uplink_mtu, _address = _uplink_facts(ipr, state.uplink)
        validate_host_state(state, host_networks(host_netns, ipr=ipr))
        gateway = IPv4Interface(f"{compartment.gateway}/{compartment.subnet.prefixlen}")
        with _locked(state_dir):
            ensure_bridge(
                compartment.bridge,
                gateway,
                gateway_mac_for(compartment.compartment_id),
                effective_mtu(compartment, uplink_mtu),
                host_netns,
                ipr=ipr,
            )


def _apply_locked(
    state: HostNetworkState,
    host_netns: str | None,
    state_dir: Path,
    ipr: IPRoute,
    uplink_mtu: int,
    vxlan_local: IPv4Address | None,
) -> ApplyReport:
    record = _load_record(state_dir)
    previous: dict[str, str] = record.get("compartments", {})
    reporter = _Reporter([c.compartment_id for c in state.compartments])

    if ensure_sysctl("net.ipv4.ip_forward", "1", host_netns):
        reporter.note("ip_forward", ["enabled"], same_as_before=bool(record.get("ip_forward")))

    wanted_bridges = {c.bridge for c in state.compartments}
    wanted_vxlans = {vxlan_name_for(c.compartment_id) for c in state.compartments if c.vni is not None}
    wanted_ids = {c.compartment_id for c in state.compartments}

    # Removals first, so a compartment that moved to another bridge name frees its subnet first.
    for name in sorted(set(list_owned_links(ipr, VXLAN_PREFIX)) - wanted_vxlans):
        if delete_link(name, ipr=ipr):
            reporter.note(f"vxlan {name}", ["removed"], same_as_before=False)
    for name in sorted(set(list_owned_links(ipr, BRIDGE_PREFIX)) - wanted_bridges):
        if delete_link(name, ipr=ipr):
            reporter.note(f"bridge {name}", ["removed"], same_as_before=False)
    for compartment_id in sorted(set(dns.list_dns(state_dir)) - wanted_ids):
        if dns.stop_dns(compartment_id, state_dir, host_netns):
            reporter.note(f"dns {compartment_id}", ["stopped"], same_as_before=False)

    fingerprints: dict[str, str] = {}
    for compartment in state.compartments:
        fingerprint = _compartment_fingerprint(compartment)
        fingerprints[compartment.compartment_id] = fingerprint
        same = previous.get(compartment.compartment_id) == fingerprint
        mtu = effective_mtu(compartment, uplink_mtu)
        gateway = IPv4Interface(f"{compartment.gateway}/{compartment.subnet.prefixlen}")
        changes = ensure_bridge(
            compartment.bridge,
            gateway,
            gateway_mac_for(compartment.compartment_id),
            mtu,
            host_netns,
            ipr=ipr,
        )
        reporter.note(
            f"bridge {compartment.bridge}",
            changes,
            same_as_before=same,
            compartment_id=compartment.compartment_id,
        )
        if compartment.vni is not None:
            assert vxlan_local is not None
            bridge = link_by_name(ipr, compartment.bridge)
            assert bridge is not None
            name = vxlan_name_for(compartment.compartment_id)
            changes = ensure_vxlan(
                name,
                compartment.vni,
                vxlan_local,
                compartment.vxlan_peers,
                bridge["index"],
                mtu,
                host_netns,
                ipr=ipr,
            )
            reporter.note(
                f"vxlan {name}", changes, same_as_before=same, compartment_id=compartment.compartment_id
            )
        changes = dns.ensure_dns(compartment, state_dir, host_netns)
        reporter.note(
            f"dns {compartment.compartment_id}",
            changes,
            same_as_before=same,
            compartment_id=compartment.compartment_id,
        )

    record["nft"] = _converge_nftables(state, host_netns, record.get("nft"), reporter)
    record["compartments"] = fingerprints
    record["ip_forward"] = True
    _save_record(state_dir, record)
    return reporter.report()


def _converge_nftables(
    state: HostNetworkState,
    host_netns: str | None,
    previous: dict[str, str] | None,
    reporter: _Reporter,
) -> dict[str, str] | None:
    """Replace Bulkhead's tables if they differ from what the last apply of this state left behind.

    The kernel's tables are listed before the load only when the wanted rules are the ones last loaded
    (to see whether they were changed from outside): rules that differ are replaced anyway, and each
    `nft` run is ~10-15 ms on a create's path (a published port, a new member)."""
    if not state.compartments and not state.ports:
        # Nothing of Bulkhead's on this host: no tables either.
        if nftables.list_owned(host_netns):
            nftables.delete_tables(host_netns)
            reporter.note("nftables", ["tables removed"], same_as_before=False)
        return None
    document = nftables.build_ruleset(state)
    desired_hash = nftables.fingerprint(document)
    same = previous is not None and previous.get("desired") == desired_hash
    missing: list[str] = []
    if same:
        observed = nftables.list_owned(host_netns)
        if previous is not None and previous.get("observed") == nftables.fingerprint(observed):
            return previous
        missing = [
            f"{family} {name}" for family, name in nftables.OWNED_TABLES if f"{family} {name}" not in observed
        ]
    nftables.run_nft(document, host_netns)
    if not same:
        reporter.note("nftables", ["rules replaced"], same_as_before=False)
    elif missing:
        reporter.note("nftables", [f"table {table} recreated" for table in missing], same_as_before=True)
    else:
        reporter.note("nftables", ["rules restored after an outside change"], same_as_before=True)
    return {"desired": desired_hash, "observed": nftables.fingerprint(nftables.list_owned(host_netns))}


def remove_host_network(host_netns: str | None = None, *, state_dir: Path | None = None) -> ApplyReport:
    """Remove everything Bulkhead's network driver owns on the host: DNS, VXLAN, bridges, tables.

    Workload veths are left to `detach_container`; ip_forward is left as it is (others may rely on it).
    """
    state_dir = state_dir or dns.state_dir_for(host_netns)
    reporter = _Reporter()
    with iproute(host_netns) as ipr, _locked(state_dir):
        for compartment_id in dns.list_dns(state_dir):
            if dns.stop_dns(compartment_id, state_dir, host_netns):
                reporter.note(f"dns {compartment_id}", ["stopped"], same_as_before=False)
        for prefix in (VXLAN_PREFIX, BRIDGE_PREFIX):
            for name in sorted(list_owned_links(ipr, prefix)):
                if delete_link(name, ipr=ipr):
                    reporter.note(name, ["removed"], same_as_before=False)
        if nftables.list_owned(host_netns):
            nftables.delete_tables(host_netns)
            reporter.note("nftables", ["tables removed"], same_as_before=False)
        (state_dir / RECORD_NAME).unlink(missing_ok=True)
    return reporter.report()
