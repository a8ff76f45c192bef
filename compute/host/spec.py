"""What the portal tells a host, as typed values: a workload's spec, the host's own profile and the
network state of the compartments it serves.

The portal resolves every value from its rows (`compute.host_reports`); the host checks the shape and
the types here once, and from then on works with frozen values, never with a row. A malformed answer
is a `SpecInvalid` (the host refuses to act on it), not a half-understood spec.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

T = TypeVar("T")

NAMESPACE = "namespace"
MICROVM = "microvm"
ISOLATIONS = (NAMESPACE, MICROVM)

# Workload states as the portal spells them (compute.choices.WorkloadState; kept here as text: the host
# package imports no model).
PENDING = "pending"
CREATING = "creating"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"
DELETING = "deleting"
UNKNOWN = "unknown"
STATES = (PENDING, CREATING, RUNNING, STOPPING, STOPPED, FAILED, DELETING, UNKNOWN)

ALWAYS = "always"
ON_FAILURE = "on-failure"


class SpecInvalid(ValueError):
    """The portal's answer does not have the shape of a spec: the host acts on none of it."""


def _get(
    data: Mapping[str, Any], name: str, kind: type[T] | tuple[type, ...], *, optional: bool = False
) -> Any:
    if not isinstance(data, Mapping):
        raise SpecInvalid(f"expected an object holding {name!r}")
    value = data.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise SpecInvalid(f"{name!r} must be a number")
    if not isinstance(value, kind):
        raise SpecInvalid(f"{name!r} has the wrong type")
    return value


def _strings(values: Any, name: str) -> tuple[str, ...]:
    if not isinstance(values, list) or any(not isinstance(v, str) for v in values):
        raise SpecInvalid(f"{name!r} must be a list of texts")
    return tuple(values)


def _uuid(text: Any, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        raise SpecInvalid(f"{name!r} must be a uuid") from None


def _list_of(values: Any, name: str, parse: Callable[[Any], T]) -> tuple[T, ...]:
    if not isinstance(values, list):
        raise SpecInvalid(f"{name!r} must be a list")
    return tuple(parse(value) for value in values)


@dataclass(frozen=True)
class ImageLayerRef:
    """One layer of the workload's image, bottom-most first in `WorkloadSpec.layers`."""

    digest: str
    diff_id: str
    media_type: str
    size: int

    @classmethod
    def parse(cls, data: Any) -> ImageLayerRef:
        return cls(
            digest=_get(data, "digest", str),
            diff_id=_get(data, "diff_id", str),
            media_type=_get(data, "media_type", str),
            size=_get(data, "size", int),
        )


@dataclass(frozen=True)
class ProcessSpec:
    """What runs: args and environment resolved by the portal (secret values unsealed there), or the
    tenant-facing `problem` that makes a start fail (no command, a secret gone...)."""

    args: tuple[str, ...] | None
    env: tuple[str, ...] | None
    cwd: str
    user: str
    problem: str = ""

    @classmethod
    def parse(cls, data: Any) -> ProcessSpec:
        args = _get(data, "args", list, optional=True)
        env = _get(data, "env", list, optional=True)
        return cls(
            args=_strings(args, "args") if args is not None else None,
            env=_strings(env, "env") if env is not None else None,
            cwd=_get(data, "cwd", str),
            user=_get(data, "user", str),
            problem=_get(data, "problem", str, optional=True) or "",
        )


@dataclass(frozen=True)
class Limits:
    vcpus: float
    memory_mib: int
    disk_gib: int

    @classmethod
    def parse(cls, data: Any) -> Limits:
        try:
            vcpus = float(_get(data, "vcpus", (str, int, float)))
        except ValueError:
            raise SpecInvalid("'vcpus' must be a number") from None
        return cls(
            vcpus=vcpus, memory_mib=_get(data, "memory_mib", int), disk_gib=_get(data, "disk_gib", int)
        )


@dataclass(frozen=True)
class NetworkAttachment:
    """The workload's one NIC: its compartment (driver id) and the address and MAC the portal gave it."""

    compartment: str
    address: IPv4Address
    mac: str
    gateway: IPv4Address | None = None  # the compartment's (its DNS server); absent from older portals

    @classmethod
    def parse(cls, data: Any) -> NetworkAttachment:
        gateway = _get(data, "gateway", str, optional=True)
        try:
            address = IPv4Address(_get(data, "address", str))
            gateway = IPv4Address(gateway) if gateway is not None else None
        except ValueError:
            raise SpecInvalid("'address' and 'gateway' must be IPv4 addresses") from None
        compartment, mac = _get(data, "compartment", str), _get(data, "mac", str)
        return cls(compartment=compartment, address=address, mac=mac, gateway=gateway)


@dataclass(frozen=True)
class VolumeMount:
    """A volume the workload mounts: its name in the host's pool, where, and how (`tag`: the guest's
    virtiofs tag for a micro-VM). `on_host`: the portal placed the volume on this workload's host."""

    volume: str
    name: str
    pool_name: str
    path: str
    read_only: bool
    tag: str
    on_host: bool

    @classmethod
    def parse(cls, data: Any) -> VolumeMount:
        return cls(
            volume=_get(data, "volume", str),
            name=_get(data, "name", str),
            pool_name=_get(data, "pool_name", str),
            path=_get(data, "path", str),
            read_only=_get(data, "read_only", bool),
            tag=_get(data, "tag", str),
            on_host=_get(data, "on_host", bool),
        )


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload placed on this host, as the portal resolved it (`GET hosts/self/workloads/<id>/`)."""

    id: uuid.UUID
    runtime_id: str
    name: str
    tenant: str
    isolation: str
    state: str
    desired_running: bool
    restart_policy: str
    exit_code: int | None
    started: bool
    image_id: str
    layers: tuple[ImageLayerRef, ...]
    process: ProcessSpec
    limits: Limits
    privileged: bool
    network: NetworkAttachment | None
    volumes: tuple[VolumeMount, ...] = ()
    status_message: str = ""
    # The image's repository in the portal's registry, where a host fetches the blobs it lacks.
    image_repository: str = ""

    @property
    def pk(self) -> uuid.UUID:  # the name portal-side callers of the host's read helpers use
        return self.id

    @classmethod
    def parse(cls, data: Any) -> WorkloadSpec:
        image = _get(data, "image", Mapping)
        isolation = _get(data, "isolation", str)
        if isolation not in ISOLATIONS:
            raise SpecInvalid(f"unknown isolation {isolation[:20]!r}")
        state = _get(data, "state", str)
        if state not in STATES:
            raise SpecInvalid(f"unknown state {state[:20]!r}")
        network = _get(data, "network", Mapping, optional=True)
        return cls(
            id=_uuid(_get(data, "id", str), "id"),
            runtime_id=_get(data, "runtime_id", str),
            name=_get(data, "name", str),
            tenant=_get(data, "tenant", str),
            isolation=isolation,
            state=state,
            desired_running=_get(data, "desired_running", bool),
            restart_policy=_get(data, "restart_policy", str),
            exit_code=_get(data, "exit_code", int, optional=True),
            started=_get(data, "started", bool),
            image_id=_get(image, "id", str),
            layers=_list_of(_get(image, "layers", list), "layers", ImageLayerRef.parse),
            process=ProcessSpec.parse(_get(data, "process", Mapping)),
            limits=Limits.parse(_get(data, "limits", Mapping)),
            privileged=_get(data, "privileged", bool),
            network=NetworkAttachment.parse(network) if network is not None else None,
            volumes=_list_of(data.get("volumes") or [], "volumes", VolumeMount.parse),
            status_message=_get(data, "status_message", str, optional=True) or "",
            image_repository=_get(image, "repository", str, optional=True) or "",
        )

    def seen(self, answer: Mapping[str, Any]) -> WorkloadSpec:
        """The spec with the row's state as a report's answer gave it (what `refresh_from_db` was)."""
        changes: dict[str, Any] = {}
        if answer.get("state") in STATES:
            changes["state"] = answer["state"]
        if isinstance(answer.get("desired_running"), bool):
            changes["desired_running"] = answer["desired_running"]
        if "exit_code" in answer and (answer["exit_code"] is None or isinstance(answer["exit_code"], int)):
            changes["exit_code"] = answer["exit_code"]
        if isinstance(answer.get("status_message"), str):
            changes["status_message"] = answer["status_message"]
        if "started_at" in answer:
            changes["started"] = answer["started_at"] is not None
        return replace(self, **changes) if changes else self


@dataclass(frozen=True)
class HostProfile:
    """What the portal says about this host (`GET hosts/self/`): who it is and how it runs things."""

    id: uuid.UUID
    name: str
    queue: str
    oci_runtime: str
    domain_type: str
    network_enabled: bool
    netns: str | None
    uplink: str
    networks: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Any) -> HostProfile:
        network = _get(data, "network", Mapping)
        runtime = _get(data, "oci_runtime", str)
        if runtime not in ("runc", "crun"):
            raise SpecInvalid("'oci_runtime' must be runc or crun")
        return cls(
            id=_uuid(_get(data, "id", str), "id"),
            name=_get(data, "name", str),
            queue=_get(data, "queue", str),
            oci_runtime=runtime,
            domain_type=_get(data, "domain_type", str),
            network_enabled=_get(network, "enabled", bool),
            netns=_get(network, "netns", str, optional=True) or None,
            uplink=_get(network, "uplink", str, optional=True) or "",
            networks=_strings(network.get("networks") or [], "networks"),
        )


def _address(text: Any, name: str) -> IPv4Address:
    try:
        return IPv4Address(str(text))
    except ValueError:
        raise SpecInvalid(f"{name!r} must be an IPv4 address") from None


def _network(text: Any, name: str) -> IPv4Network:
    try:
        return IPv4Network(str(text))
    except ValueError:
        raise SpecInvalid(f"{name!r} must be an IPv4 network") from None


@dataclass(frozen=True)
class ServedCompartment:
    """A compartment with a member on this host, as the network driver realises it."""

    compartment_id: str
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    nat: bool
    vni: int | None
    vxlan_peers: tuple[IPv4Address, ...]
    dns_names: Mapping[str, IPv4Address]
    dns_upstreams: tuple[IPv4Address, ...]
    egress_allowed: tuple[IPv4Network, ...]

    @classmethod
    def parse(cls, data: Any) -> ServedCompartment:
        names = _get(data, "dns_names", Mapping)
        return cls(
            compartment_id=_get(data, "compartment_id", str),
            bridge=_get(data, "bridge", str),
            subnet=_network(_get(data, "subnet", str), "subnet"),
            gateway=_address(_get(data, "gateway", str), "gateway"),
            nat=_get(data, "nat", bool),
            vni=_get(data, "vni", int, optional=True),
            vxlan_peers=tuple(
                _address(a, "vxlan_peers") for a in _strings(data["vxlan_peers"], "vxlan_peers")
            ),
            dns_names={str(k): _address(v, "dns_names") for k, v in names.items()},
            dns_upstreams=tuple(
                _address(a, "dns_upstreams") for a in _strings(data.get("dns_upstreams"), "dns_upstreams")
            ),
            egress_allowed=tuple(
                _network(n, "egress_allowed") for n in _strings(data.get("egress_allowed"), "egress_allowed")
            ),
        )


@dataclass(frozen=True)
class ServedPort:
    protocol: str
    host_port: int
    address: IPv4Address
    workload_port: int

    @classmethod
    def parse(cls, data: Any) -> ServedPort:
        protocol = _get(data, "protocol", str)
        if protocol not in ("tcp", "udp"):
            raise SpecInvalid("'protocol' must be tcp or udp")
        return cls(
            protocol=protocol,
            host_port=_get(data, "host_port", int),
            address=_address(_get(data, "address", str), "address"),
            workload_port=_get(data, "workload_port", int),
        )


@dataclass(frozen=True)
class ServedBinding:
    """A member of a served compartment on this host: its port is bound to its MAC and address."""

    workload: uuid.UUID
    runtime_id: str
    isolation: str
    mac: str
    address: IPv4Address

    @classmethod
    def parse(cls, data: Any) -> ServedBinding:
        isolation = _get(data, "isolation", str)
        if isolation not in ISOLATIONS:
            raise SpecInvalid("unknown isolation")
        return cls(
            workload=_uuid(_get(data, "workload", str), "workload"),
            runtime_id=_get(data, "runtime_id", str),
            isolation=isolation,
            mac=_get(data, "mac", str),
            address=_address(_get(data, "address", str), "address"),
        )


@dataclass(frozen=True)
class NetworkState:
    """`GET hosts/self/network/`: only the compartments with a member on this host, the ports published
    on it, what no workload may reach. `uplink` empty: the device of the host's default route."""

    uplink: str
    compartments: tuple[ServedCompartment, ...]
    ports: tuple[ServedPort, ...]
    protected: tuple[IPv4Network, ...]
    bindings: tuple[ServedBinding, ...] = field(default=())

    @classmethod
    def parse(cls, data: Any) -> NetworkState:
        return cls(
            uplink=_get(data, "uplink", str, optional=True) or "",
            compartments=_list_of(_get(data, "compartments", list), "compartments", ServedCompartment.parse),
            ports=_list_of(_get(data, "ports", list), "ports", ServedPort.parse),
            protected=tuple(
                _network(n, "protected") for n in _strings(_get(data, "protected", list), "protected")
            ),
            bindings=_list_of(_get(data, "bindings", list), "bindings", ServedBinding.parse),
        )

    def compartment(self, compartment_id: str) -> ServedCompartment | None:
        return next((c for c in self.compartments if c.compartment_id == compartment_id), None)
