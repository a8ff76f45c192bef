"""Named network namespaces: create, remove, run a netlink socket or a command inside one.

`host_netns` everywhere in this package is the name of the namespace that plays the host (None: the real
root namespace). Tests build several hosts as namespaces on one machine; production passes None.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from compute.network.names import validate_netns_name

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_OWNED_PREFIXES = ("bhb", "bhx", "bhv")

T = TypeVar("T")


def netns_path(name: str) -> str:
    """Path of a named namespace, as the OCI runtime's ``linux.namespaces[network].path`` wants it."""
    return str(NETNS_RUN_DIR / validate_netns_name(name))


def netns_exists(name: str) -> bool:
    """True if the named namespace is mounted under /run/netns."""
    return os.path.ismount(netns_path(name))


def ensure_netns(name: str) -> bool:
    """Create the named namespace unless it exists; True if it was created."""
    if netns_exists(name):
        return False
    path = Path(netns_path(name))
    if path.exists():
        # A stale placeholder file from an interrupted create: pyroute2 would refuse it.
        path.unlink()
    pyroute2_netns.create(name)
    return True


def delete_netns(name: str) -> bool:
    """Unmount and remove the named namespace; True if it existed. Idempotent."""
    path = Path(netns_path(name))
    if not path.exists():
        return False
    pyroute2_netns.remove(name)
    return True


@contextmanager
def iproute(netns: str | None) -> Iterator[IPRoute]:
    """An RTNL socket in `netns` (None: this process's namespace). Never creates the namespace."""
    ipr = IPRoute() if netns is None else IPRoute(netns=validate_netns_name(netns), flags=0)
    try:
        yield ipr
    finally:
        ipr.close()


def ns_command(argv: list[str], netns: str | None) -> list[str]:
    """`argv` wrapped so it runs inside `netns` (an argument list, never a shell string)."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def run_in_netns(netns: str | None, function: Callable[[], T]) -> T:
    """Run `function` in a short-lived thread that has joined `netns`; return its result.

    setns(CLONE_NEWNET) changes only the calling thread, so the caller's own thread and sockets stay
    where they are; sockets created inside `function` belong to `netns` for their whole life.
    """
    if netns is None:
        return function()
    path = netns_path(netns)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno), path)
            finally:
                os.close(fd)
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _sysctl_path(key: str) -> Path:
    parts = key.split(".")
    if not all(part and part.replace("_", "").replace("-", "").isalnum() for part in parts):
        raise ValueError(f"invalid sysctl key: {key!r}")
    return Path("/proc/sys", *parts)


def read_sysctl(key: str, netns: str | None) -> str:
    """Read a per-namespace sysctl such as ``net.ipv4.ip_forward`` inside `netns`."""
    path = _sysctl_path(key)
    return run_in_netns(netns, lambda: path.read_text().strip())


def ensure_sysctl(key: str, value: str, netns: str | None) -> bool:
    """Set a per-namespace sysctl inside `netns` unless it already has `value`; True if it changed."""
    path = _sysctl_path(key)

    def converge() -> bool:
        if path.read_text().strip() == value:
            return False
        path.write_text(value)
        return True

    return run_in_netns(netns, converge)


def host_networks(netns: str | None, *, ipr: IPRoute | None = None) -> list[IPv4Network]:
    """The host's own IPv4 networks (addresses and routes) outside Bulkhead's interfaces.

    Compartment subnets must not overlap these, or they would shadow the host's own routes. `ipr`
    reuses an open RTNL socket in `netns`.
    """
    if ipr is None:
        with iproute(netns) as own:
            return host_networks(netns, ipr=own)
    networks: set[IPv4Network] = set()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

    def foreign(index: int | None) -> bool:
        name = names.get(index or -1, "")
        return not name.startswith(_OWNED_PREFIXES) and name != "lo"

    for address in ipr.get_addr(family=2):
        if foreign(address["index"]):
            local = address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS")
            networks.add(IPv4Network(f"{local}/{address['prefixlen']}", strict=False))
    for route in ipr.get_routes(family=2, table=254):
        destination = route.get_attr("RTA_DST")
        if destination is None or route["dst_len"] == 0:
            continue  # the default route is not a network of the host
        if foreign(route.get_attr("RTA_OIF")):
            networks.add(IPv4Network(f"{destination}/{route['dst_len']}", strict=False))
    return sorted(networks, key=lambda n: (int(n.network_address), n.prefixlen))
