"""Compartment and published-port services: the only code that writes Compartment, IPAllocation and
PublishedPort rows (issue 7).

Each service is one transaction: quota under the tenant's row lock, rows protected by database
constraints (a lost race is retried, never a duplicate), an audit entry, and - where a host must
change - an operation sent to the host's queue on commit.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max

from compute.choices import WorkloadState
from compute.compartments import Compartment, EgressAllowance, IPAllocation, Protocol, PublishedPort
from compute.models import Host, Workload
from compute.network import ipam, mac_for
from compute.network.nftables import ALWAYS_PROTECTED
from compute.network.spec import MAX_VNI
from compute.resolver import NameCache
from portal import operations
from portal.errors import Conflict, Invalid, NotPermitted
from portal.models import Operation
from tenants import audit, quota
from tenants.actors import Actor
from tenants.models import Tenant, dns_label

log = logging.getLogger(__name__)

DEFAULT_COMPARTMENT = "default"
POOL_PREFIXLEN = 24
FIRST_VNI = 4096
# The host driver gives a namespace container exactly one NIC (eth0) and a micro-VM one tap.
MAX_COMPARTMENTS_PER_WORKLOAD = 1
RETRIES = 8
NETWORK_ON = frozenset({"on", "true", "1", "yes"})

T = TypeVar("T")


# --- operator settings (read at call time so tests and operators can change them) ----------------


def _setting(name: str, default: str) -> str:
    value = getattr(settings, name, None)
    return str(value) if value not in (None, "") else os.environ.get(name, default)


def compartment_pool() -> IPv4Network:
    """BULKHEAD_COMPARTMENT_POOL: where compartment subnets without an explicit one come from."""
    return IPv4Network(_setting("BULKHEAD_COMPARTMENT_POOL", "10.200.0.0/16"))


def _networks_setting(name: str) -> list[IPv4Network]:
    """A comma-separated list of IPv4 networks (a setting an operator wrote: a typo is an error)."""
    return [IPv4Network(text.strip(), strict=False) for text in _setting(name, "").split(",") if text.strip()]


def compartment_pools() -> list[IPv4Network]:
    """The only ranges compartment subnets may come from: the compartment pool (where automatic
    allocation carves them) and the ranges of BULKHEAD_COMPARTMENT_POOLS (comma-separated) where a
    tenant admin may ask for a subnet by hand."""
    pool = compartment_pool()
    return [pool, *(n for n in _networks_setting("BULKHEAD_COMPARTMENT_POOLS") if n != pool)]


# Names' addresses, looked up off the request path: protected_networks() runs at every apply of every
# host, and a resolver that does not answer must not stall it.
_names = NameCache(ttl=300.0, first_wait=1.0)


def _service_names() -> list[str]:
    """Where the portal, its database and its broker live, as the settings name them (host names or
    literals): the URLs the portal and the hosts' agents use, the portal's bind address and host names."""
    database = settings.DATABASES["default"]
    names = [str(database.get("HOST") or "")]
    for setting in (
        "REDIS_URL",
        "CELERY_BROKER_URL",
        "BULKHEAD_AGENT_DATABASE_URL",
        "BULKHEAD_AGENT_REDIS_URL",
    ):
        url = str(getattr(settings, setting, "") or "")
        try:
            names.append(urllib.parse.urlsplit(url).hostname or "")
        except ValueError:
            continue
    names.append(str(getattr(settings, "BULKHEAD_BIND", "") or ""))
    # ALLOWED_HOSTS: exact names only ("*" and ".example.com" patterns name no address).
    names += [
        str(h) for h in getattr(settings, "ALLOWED_HOSTS", []) if h and h != "*" and not h.startswith(".")
    ]
    return [name for name in names if name]


def protected_networks() -> list[IPv4Network]:
    """What no workload may reach: BULKHEAD_PROTECTED_CIDRS, plus always the hosts' own networks and
    underlay addresses, and the addresses of the portal, the database and the broker (names resolved,
    see `_service_names` and `compute.resolver`: never waited for more than a second; a name not
    answered yet is added at a later apply); link-local is added by the driver. Loopback and 0.0.0.0
    stay out: a workload's packets never route there."""
    networks = [*_networks_setting("BULKHEAD_PROTECTED_CIDRS"), *_host_networks()]
    names = _service_names()
    for host in Host.objects.only("address", "labels"):
        names += [str(text or "") for text in ((host.labels or {}).get("vxlan_address"), host.address)]
    for addresses in _names.addresses(names).values():
        networks += [IPv4Network(a) for a in addresses]
    return sorted({n for n in networks if not n.is_loopback and not n.is_unspecified})


def resolve_service_names_ahead() -> None:
    """Start looking up the portal's service names (the web server's start): its hosts' first network
    requests then find them answered."""
    _names.ask_ahead(_service_names())


def published_port_range() -> range:
    """BULKHEAD_PUBLISHED_PORT_RANGE ("20000-29999"): host ports tenants may publish on."""
    low, _, high = _setting("BULKHEAD_PUBLISHED_PORT_RANGE", "20000-29999").partition("-")
    first, last = int(low), int(high or low)
    if not 1 <= first <= last <= 65535:
        raise ValueError("BULKHEAD_PUBLISHED_PORT_RANGE must be 'FIRST-LAST' within 1-65535")
    return range(first, last + 1)


def network_enabled(host: Host) -> bool:
    """Does `host` realise compartments? Host label `netns` (a host whose network lives in a namespace)
    or `network` ("on"/"off") decides; otherwise BULKHEAD_HOST_NETWORK (default "off")."""
    labels = host.labels or {}
    if labels.get("netns"):
        return True
    mode = labels.get("network") or _setting("BULKHEAD_HOST_NETWORK", "off")
    return str(mode).strip().lower() in NETWORK_ON


# --- small helpers --------------------------------------------------------------------------------


def _retrying(create: Callable[[], T], conflict: str, field: str | None = None) -> T:
    """Run `create` in a savepoint until it does not lose a uniqueness race (then: a clear 409)."""
    for _ in range(RETRIES):
        try:
            with transaction.atomic():
                return create()
        except IntegrityError:
            continue
    raise Conflict(conflict, field=field)


def _host_networks() -> list[IPv4Network]:
    """The hosts' own networks as their agents last reported them (facts["networks"])."""
    networks: list[IPv4Network] = []
    for facts in Host.objects.values_list("facts", flat=True):
        for text in (facts or {}).get("networks", []) or []:
            try:
                networks.append(IPv4Network(str(text), strict=False))
            except ValueError:
                continue
    return networks


def _all_subnets(exclude_tenant: Tenant | None = None) -> list[tuple[IPv4Network, str, Any]]:
    rows = Compartment.objects.all()
    if exclude_tenant is not None:
        rows = rows.exclude(tenant=exclude_tenant)
    return [
        (IPv4Network(subnet), name, tenant_id)
        for subnet, name, tenant_id in rows.values_list("subnet", "name", "tenant_id")
    ]


def _choose_subnet(tenant: Tenant, requested: str | None, prefix_length: int | None) -> IPv4Network:
    taken = _all_subnets()
    # The infrastructure is never a compartment: a bridge on it would capture the hosts' own traffic.
    host_networks = _host_networks() + protected_networks()
    pools = compartment_pools()
    pool_names = ", ".join(str(p) for p in pools)
    if requested is None:
        prefixlen = prefix_length or POOL_PREFIXLEN
        try:
            return ipam.allocate_subnet(pools[0], prefixlen, [n for n, _, _ in taken], host_networks)
        except ipam.AddressPoolExhausted as error:
            raise Conflict(
                f"No free /{prefixlen} is left in the compartment pool {pools[0]}.", field="subnet"
            ) from error
        except ValueError as error:
            raise Invalid(str(error), field="prefix_length") from error
    try:
        subnet = IPv4Network(requested.strip(), strict=True)
    except ValueError as error:
        raise Invalid(
            f"{requested!r} is not an IPv4 network in CIDR form ({error}).", field="subnet"
        ) from None
    try:
        ipam.validate_compartment_subnet(subnet)
    except ValueError as error:
        raise Invalid(f"{error}; compartment subnets come from {pool_names}.", field="subnet") from None
    if not any(subnet.subnet_of(pool) for pool in pools):
        raise Invalid(
            f"Subnet {subnet} is outside the compartment pools; choose one inside {pool_names}.",
            field="subnet",
        )
    for network, name, tenant_id in taken:
        if subnet.overlaps(network):
            if tenant_id == tenant.pk:
                raise Conflict(f"Subnet {subnet} overlaps compartment {name!r} ({network}).", field="subnet")
            # Another tenant's: say that it is taken, not whose or what it is.
            raise Conflict(f"Subnet {subnet} overlaps a network in use on this installation.", field="subnet")
    if ipam.find_overlap(subnet, host_networks) is not None:
        # Which infrastructure network is not the tenant's business.
        raise Conflict(
            f"Subnet {subnet} overlaps a network reserved for the infrastructure; choose another inside "
            f"{pool_names}.",
            field="subnet",
        )
    return subnet


def _next_vni() -> int:
    highest = Compartment.objects.aggregate(top=Max("vni"))["top"]
    vni = FIRST_VNI if highest is None else highest + 1
    if vni > MAX_VNI:
        raise Conflict("No VXLAN network identifier is left.")
    return vni


# --- compartments ---------------------------------------------------------------------------------


def _create_compartment_row(
    actor: Actor, tenant: Tenant, name: str, subnet: str | None, prefix_length: int | None, nat: bool
) -> Compartment:
    try:
        dns_label(name)
    except Exception:
        raise Invalid(
            f"{name!r} is not a DNS label (1-63 lower-case letters, digits, hyphens).", field="name"
        ) from None
    if Compartment.objects.filter(tenant=tenant, name=name).exists():
        raise Conflict(f"A compartment named {name!r} exists in this tenant.", field="name")
    quota.allocate(tenant, compartments=1)

    def create() -> Compartment:
        network = _choose_subnet(tenant, subnet, prefix_length)
        return Compartment.objects.create(
            tenant=tenant,
            name=name,
            subnet=str(network),
            gateway=str(ipam.gateway_for(network)),
            nat=nat,
            vni=_next_vni(),
        )

    compartment = _retrying(create, f"Could not create compartment {name!r}: try again.", "name")
    audit.record(
        actor,
        "compartment.create",
        compartment,
        details={"name": name, "subnet": compartment.subnet, "nat": nat},
    )
    return compartment


@audit.denials_audited
@transaction.atomic
def create_compartment(
    *,
    actor: Actor,
    tenant: Tenant,
    name: str,
    subnet: str | None = None,
    prefix_length: int | None = None,
    nat: bool = True,
) -> Compartment:
    """Create a compartment: quota, a subnet (given and validated, or the next free block of the pool),
    its gateway (first address) and a VNI. Nothing changes on hosts until a workload joins it."""
    return _create_compartment_row(actor, tenant, name, subnet, prefix_length, nat)


def default_compartment(actor: Actor, tenant: Tenant) -> Compartment:
    """The tenant's compartment "default", created on first use (inside the caller's transaction)."""
    existing = Compartment.objects.filter(tenant=tenant, name=DEFAULT_COMPARTMENT).first()
    if existing is not None:
        return existing
    return _create_compartment_row(actor, tenant, DEFAULT_COMPARTMENT, None, None, True)


@audit.denials_audited
@transaction.atomic
def delete_compartment(*, actor: Actor, compartment: Compartment) -> None:
    """Delete an unused compartment and give its quota back; refused (409) while workloads use it."""
    compartment = Compartment.objects.select_for_update().select_related("tenant").get(pk=compartment.pk)
    members = list(
        IPAllocation.objects.filter(compartment=compartment).values_list("workload__name", flat=True)[:5]
    )
    if members:
        raise Conflict(
            f"Compartment {compartment.name!r} is in use by workload(s) {', '.join(sorted(members))}.",
            audit_action="compartment.delete",
        )
    tenant = compartment.tenant
    audit.record(actor, "compartment.delete", compartment, details={"name": compartment.name})
    compartment.delete()
    quota.release(tenant, compartments=1)


# --- workload membership (called by compute.services.create_workload) ---------------------------


def join_compartments(
    *, actor: Actor, tenant: Tenant, workload: Workload, compartments: Sequence[Compartment] | None
) -> list[IPAllocation]:
    """Give `workload` an address in each compartment (None: the tenant's default compartment, when its
    host realises compartments; []: no network). Runs in create_workload's transaction."""
    assert workload.host is not None
    if compartments is None:
        if not network_enabled(workload.host):
            return []
        compartments = [default_compartment(actor, tenant)]
    compartments = list(dict.fromkeys(compartments))
    if not compartments:
        return []
    if len(compartments) > MAX_COMPARTMENTS_PER_WORKLOAD:
        raise Invalid(
            f"A workload can join at most {MAX_COMPARTMENTS_PER_WORKLOAD} compartment for now.",
            field="compartments",
        )
    if any(c.tenant_id != tenant.pk for c in compartments):
        raise Invalid("No such compartment.", field="compartments")
    if not network_enabled(workload.host):
        raise Conflict(
            f"Host {workload.host.name} does not realise compartments (host label network=on).",
            field="compartments",
        )
    allocations = [allocate_address(workload, compartment) for compartment in compartments]
    sync_member_hosts(actor, compartments, changed_on=workload.host)
    return allocations


def sync_member_hosts(
    actor: Actor, compartments: Sequence[Compartment], *, changed_on: Host
) -> list[Operation]:
    """Have the other hosts with members of ``compartments`` re-apply their network now.

    A compartment spanning hosts lists, on each host, the VXLAN peers and the names of every member: a
    workload joining or leaving on one host changes what the others need. They would catch up at their
    next periodic re-apply (30 s); this tells them at once (on commit, one operation per host).
    """
    order = {compartment.pk: index for index, compartment in enumerate(compartments)}
    # Each other host, with the first of ``compartments`` it has a member in (the operation's target).
    targets: dict[Any, tuple[Host, Compartment]] = {}
    members = (
        IPAllocation.objects.filter(compartment__in=compartments)
        .exclude(workload__state=WorkloadState.DELETING)
        .exclude(workload__host=changed_on)
        .select_related("workload__host", "compartment__tenant")
    )
    for allocation in members:
        host = allocation.workload.host
        if host is None or not network_enabled(host):
            continue
        known = targets.get(host.pk)
        if known is None or order[allocation.compartment_id] < order[known[1].pk]:
            targets[host.pk] = (host, allocation.compartment)
    ops = []
    for host, compartment in sorted(targets.values(), key=lambda target: target[0].name):
        ops.append(_apply_op(actor, compartment.tenant, compartment, host, "compartment.sync"))
    return ops


def allocate_address(workload: Workload, compartment: Compartment) -> IPAllocation:
    """The lowest free address of the compartment; the (compartment, address) constraint settles races."""

    def create() -> IPAllocation:
        taken = [IPv4Address(a) for a in compartment.allocations.values_list("address", flat=True)]
        try:
            address = ipam.allocate_address(compartment.network, taken, compartment.gateway_address)
        except ipam.AddressPoolExhausted as error:
            raise Conflict(
                f"Compartment {compartment.name!r} has no free address.", field="compartments"
            ) from error
        return IPAllocation.objects.create(
            compartment=compartment,
            workload=workload,
            address=str(address),
            mac=mac_for(f"{workload.pk}/{compartment.pk}"),
        )

    return _retrying(create, f"Could not allocate an address in {compartment.name!r}: try again.")


def primary_allocation(workload: Workload) -> IPAllocation | None:
    """The allocation the host realises (the driver attaches one NIC per workload)."""
    return IPAllocation.objects.select_related("compartment").filter(workload=workload).first()


def release_workload(workload: Workload) -> int:
    """Before the row goes: tell the compartments' other hosts it leaves; return the number of published
    ports to give back to the quota (rows cascade)."""
    compartments = list(Compartment.objects.filter(allocations__workload=workload).distinct())
    if compartments and workload.host is not None:
        sync_member_hosts(Actor.system("agent"), compartments, changed_on=workload.host)
    return PublishedPort.objects.filter(workload=workload).count()


# --- published ports ------------------------------------------------------------------------------


def _apply_op(actor: Actor, tenant: Tenant, target: Any, host: Host, kind: str) -> Operation:
    from compute.host import tasks as host_tasks

    return operations.start(
        kind=kind,
        task=host_tasks.apply_network,
        actor=actor,
        tenant=tenant,
        target=target,
        queue=host.queue,
        params={"host": str(host.pk)},
    )


def _free_ports(host: Host, protocol: str, ports: range) -> Iterator[int]:
    used = set(PublishedPort.objects.filter(host=host, protocol=protocol).values_list("host_port", flat=True))
    return (port for port in ports if port not in used)


@audit.denials_audited
@transaction.atomic
def publish_port(
    *,
    actor: Actor,
    workload: Workload,
    workload_port: int,
    protocol: str = Protocol.TCP,
    host_port: int | None = None,
) -> tuple[PublishedPort, Operation]:
    """Publish `host_port` (or the lowest free port of the operator's range) on the workload's host's
    uplink to the workload's address; the host re-applies its network on commit."""
    workload = (
        Workload.objects.select_for_update(of=("self",)).select_related("host", "tenant").get(pk=workload.pk)
    )
    tenant = workload.tenant
    if protocol not in Protocol.values:
        raise Invalid("protocol must be tcp or udp.", field="protocol")
    if not 1 <= workload_port <= 65535:
        raise Invalid("workload_port must be in 1-65535.", field="workload_port")
    ports = published_port_range()
    if host_port is not None and host_port not in ports:
        raise Invalid(
            f"host_port must be within the published port range {ports.start}-{ports.stop - 1}.",
            field="host_port",
        )
    if workload.state == WorkloadState.DELETING:
        raise Conflict("The workload is being deleted.", field="workload")
    if workload.host is None or primary_allocation(workload) is None:
        raise Conflict("The workload is in no compartment: it has no address to publish.", field="workload")
    host = workload.host
    if (
        host_port is not None
        and PublishedPort.objects.filter(host=host, protocol=protocol, host_port=host_port).exists()
    ):
        raise Conflict(f"Port {protocol}/{host_port} is already published on this host.", field="host_port")
    quota.allocate(tenant, published_ports=1)

    def create() -> PublishedPort:
        port = host_port if host_port is not None else next(_free_ports(host, protocol, ports), None)
        if port is None:
            raise Conflict("No free port is left in the published port range.", field="host_port")
        return PublishedPort.objects.create(
            tenant=tenant,
            workload=workload,
            host=host,
            protocol=protocol,
            host_port=port,
            workload_port=workload_port,
        )

    if host_port is not None:
        try:
            with transaction.atomic():
                published = create()
        except IntegrityError:
            raise Conflict(
                f"Port {protocol}/{host_port} is already published on this host.", field="host_port"
            ) from None
    else:
        published = _retrying(create, "Could not find a free port: try again.", "host_port")
    audit.record(
        actor,
        "port.publish",
        published,
        details={
            "workload": workload.name,
            "protocol": protocol,
            "host_port": published.host_port,
            "workload_port": workload_port,
            "host": host.name,
        },
    )
    return published, _apply_op(actor, tenant, published, host, "port.publish")


@audit.denials_audited
@transaction.atomic
def unpublish_port(*, actor: Actor, port: PublishedPort) -> Operation:
    """Remove a published port and give its quota back; the host re-applies its network on commit."""
    port = PublishedPort.objects.select_for_update().select_related("tenant", "host").get(pk=port.pk)
    tenant, host = port.tenant, port.host
    audit.record(
        actor, "port.unpublish", port, details={"protocol": port.protocol, "host_port": port.host_port}
    )
    op = _apply_op(actor, tenant, port, host, "port.unpublish")
    port.delete()
    quota.release(tenant, published_ports=1)
    return op


# How long the record of a repair is kept (the audit log keeps it for good).
REPAIR_RETENTION_DAYS = 7


@transaction.atomic
def record_repairs(*, actor: Actor, host: Host, repaired_by_compartment: dict[str, list[str]]) -> int:
    """Record what the host agent restored, per compartment, with an audit entry in each tenant.

    Keys are the driver's compartment ids (``Compartment.network_id``); unknown ones (a compartment
    deleted meanwhile) are skipped. Returns how many compartments were recorded.
    """
    from django.utils import timezone

    from compute.compartments import NetworkRepair

    now = timezone.now()
    ids = {key[1:]: details for key, details in repaired_by_compartment.items() if key.startswith("c")}
    recorded = 0
    for compartment in Compartment.objects.filter(pk__in=list(ids)).select_related("tenant"):
        details = ids[compartment.pk.hex]
        NetworkRepair.objects.create(compartment=compartment, host=host, details=details, at=now)
        audit.record(
            actor,
            "compartment.repaired",
            compartment,
            details={"host": host.name, "repaired": details},
        )
        recorded += 1
    NetworkRepair.objects.filter(host=host, at__lt=now - timedelta(days=REPAIR_RETENTION_DAYS)).delete()
    return recorded


# --- operator exceptions to the egress policy, per tenant -----------------------------------------


def _require_operator(actor: Actor, action: str) -> None:
    # A scoped or read-only token of an operator is no operator.
    if not actor.is_operator:
        raise NotPermitted(
            "Only operators may change what a tenant's workloads can reach.", audit_action=action
        )
    if actor.token is not None and actor.token.read_only:
        raise NotPermitted("This token is read-only.", audit_action=action)


def _allowance_network(text: str, action: str) -> IPv4Network:
    try:
        network = IPv4Network(str(text).strip(), strict=True)
    except ValueError as error:
        raise Invalid(
            f"{text!r} is not an IPv4 network in CIDR form ({error}).", field="network", audit_action=action
        ) from None
    if any(network.overlaps(never) for never in ALWAYS_PROTECTED):
        raise Invalid(
            f"{network} overlaps link-local addresses (169.254.0.0/16, the metadata service), which no "
            "workload may ever reach.",
            field="network",
            audit_action=action,
        )
    if network.is_loopback or network.is_multicast or network.is_unspecified:
        raise Invalid(
            f"{network} is not a network a workload could reach.", field="network", audit_action=action
        )
    return network


def egress_allowed(tenant_id: Any) -> list[IPv4Network]:
    """The protected networks an operator opened to the tenant's workloads (fed to the host driver)."""
    return [
        IPv4Network(text)
        for text in EgressAllowance.objects.filter(tenant_id=tenant_id).values_list("network", flat=True)
    ]


def _reapply_tenant_hosts(actor: Actor, tenant: Tenant, target: Any, kind: str) -> list[Operation]:
    """Have every host with a member of the tenant's compartments re-apply its network (on commit)."""
    hosts = {
        allocation.workload.host.pk: allocation.workload.host
        for allocation in IPAllocation.objects.filter(compartment__tenant=tenant)
        .exclude(workload__state=WorkloadState.DELETING)
        .select_related("workload__host")
        if allocation.workload.host is not None and network_enabled(allocation.workload.host)
    }
    return [
        _apply_op(actor, tenant, target, host, kind) for host in sorted(hosts.values(), key=lambda h: h.name)
    ]


@audit.denials_audited
@transaction.atomic
def allow_egress(
    *, actor: Actor, tenant: Tenant, network: str, note: str = ""
) -> tuple[EgressAllowance, list[Operation]]:
    """Let the tenant's workloads reach `network` although it is protected (operators only); the hosts of
    the tenant's compartments re-apply their network on commit. Link-local stays closed whatever."""
    action = "tenant.egress_allow"
    _require_operator(actor, action)
    if not isinstance(note, str) or len(note) > 200:
        raise Invalid("note must be text of at most 200 characters.", field="note", audit_action=action)
    if not isinstance(network, str) or not network.strip():
        raise Invalid("network is required (IPv4, CIDR form).", field="network", audit_action=action)
    parsed = _allowance_network(network, action)
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if EgressAllowance.objects.filter(tenant=tenant, network=str(parsed)).exists():
        raise Conflict(f"{parsed} is already allowed to {tenant.name}.", field="network", audit_action=action)
    allowance = EgressAllowance.objects.create(tenant=tenant, network=str(parsed), note=note)
    audit.record(actor, action, tenant, details={"network": str(parsed), "note": note})
    return allowance, _reapply_tenant_hosts(actor, tenant, allowance, action)


@audit.denials_audited
@transaction.atomic
def revoke_egress(*, actor: Actor, allowance: EgressAllowance) -> list[Operation]:
    """Close an allowed network to the tenant's workloads again (operators only); hosts re-apply on commit.

    New connections are refused once the hosts re-applied; one already open stays until it ends (its
    conntrack entry is established, and established traffic is not re-checked)."""
    action = "tenant.egress_revoke"
    allowance = EgressAllowance.objects.select_related("tenant").get(pk=allowance.pk)
    tenant = allowance.tenant
    _require_operator(actor, action)
    audit.record(actor, action, tenant, details={"network": allowance.network})
    ops = _reapply_tenant_hosts(actor, tenant, tenant, action)
    allowance.delete()
    return ops


# --- what a host realises: served to it through the host API (GET hosts/self/network/) --------------


def _live_allocations(queryset: Any) -> Any:
    # A workload being deleted leaves the network at once: its name, address and ports go first.
    return queryset.exclude(workload__state=WorkloadState.DELETING)


def _underlay(host: Host) -> IPv4Address | None:
    text = (host.labels or {}).get("vxlan_address") or host.address
    try:
        return IPv4Address(str(text)) if text else None
    except ValueError:
        return None


def compartment_view(compartment: Compartment, host: Host) -> dict[str, Any]:
    """A compartment as `host` realises it: members' names, and VXLAN peers on other hosts."""
    members = _live_allocations(IPAllocation.objects.filter(compartment=compartment)).select_related(
        "workload", "workload__host"
    )
    names = {a.workload.name: str(IPv4Address(a.address)) for a in members}
    peers: list[IPv4Address] = []
    for other in {a.workload.host for a in members if a.workload.host and a.workload.host_id != host.pk}:
        address = _underlay(other)
        if address is None:
            log.warning("host %s has no underlay address: compartment %s cannot reach it", other, compartment)
        elif address not in peers:
            peers.append(address)
    upstreams = [
        str(IPv4Address(text.strip()))
        for text in _setting("BULKHEAD_COMPARTMENT_DNS_UPSTREAMS", "").split(",")
        if text.strip()
    ]
    return {
        "compartment_id": compartment.network_id,
        "bridge": compartment.bridge,
        "subnet": str(compartment.network),
        "gateway": str(compartment.gateway_address),
        "nat": compartment.nat,
        "vni": compartment.vni if peers else None,
        "vxlan_peers": [str(peer) for peer in sorted(peers)],
        "dns_names": names,
        "dns_upstreams": upstreams,
        "egress_allowed": [str(network) for network in egress_allowed(compartment.tenant_id)],
    }


def host_network_view(host: Host) -> dict[str, Any]:
    """Everything Bulkhead wants on `host`'s network, from the rows: only compartments with a member on
    it, the ports published on it, what no workload may reach, each member's port binding."""
    allocations = _live_allocations(IPAllocation.objects.filter(workload__host=host)).select_related(
        "compartment", "workload"
    )
    compartments = {a.compartment_id: a.compartment for a in allocations}
    ports = []
    for port in _live_allocations(PublishedPort.objects.filter(host=host)).select_related("workload"):
        allocation = primary_allocation(port.workload)
        if allocation is None:
            continue
        ports.append(
            {
                "protocol": port.protocol,
                "host_port": port.host_port,
                "address": str(IPv4Address(allocation.address)),
                "workload_port": port.workload_port,
            }
        )
    bindings: dict[Any, dict[str, Any]] = {}
    for allocation in allocations:
        if allocation.workload_id not in bindings:  # the primary allocation is the one attached
            bindings[allocation.workload_id] = {
                "workload": str(allocation.workload_id),
                "runtime_id": allocation.workload.runtime_id,
                "isolation": allocation.workload.isolation,
                "mac": allocation.mac,
                "address": str(IPv4Address(allocation.address)),
            }
    return {
        "uplink": str((host.labels or {}).get("uplink") or _setting("BULKHEAD_UPLINK", "")),
        "compartments": [
            compartment_view(c, host) for c in sorted(compartments.values(), key=lambda c: c.network_id)
        ],
        "ports": ports,
        "protected": [str(network) for network in protected_networks()],
        "bindings": list(bindings.values()),
    }
