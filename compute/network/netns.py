"""Named network namespaces: create, remove, run a netlink socket or a command inside one.

`host_netns` everywhere in this package is the name of the namespace that plays the host (None: the real
root namespace). Tests build several hosts as namespaces on one machine; production passes None.

Nothing here forks. pyroute2 makes namespaces and opens sockets in them from a forked copy of the
calling process, which it ends with SIGTERM once it has answered: in a Celery pool process that copy
runs the pool's inherited SIGTERM handler (billiard's raises SystemExit), skips its `os._exit`, unwinds
the copied task and tells the Celery master, under the pool process's pid, that the pool process died,
and the master SIGTERMs the real one mid-task (issue 16's `WorkerLostError: ... signal 15`). A short
thread that joins (or unshares) the namespace does the same work without a second process.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

from compute.network.names import validate_netns_name

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
NETLINK_ROUTE = 0
_LIBC = ctypes.CDLL(None, use_errno=True)
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
        # A stale placeholder file from an interrupted create: it is mounted over again.
        path.unlink()
    _in_own_thread(f"netns-create-{name}", lambda: _create_netns(path))
    return True


def _create_netns(path: Path) -> None:
    """iproute2's `ip netns add`, in a thread of its own that it leaves behind in the new namespace:
    /run/netns a shared mount point, an empty file bind-mounted over by this thread's namespace."""
    NETNS_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    run_dir = bytes(NETNS_RUN_DIR)
    if _LIBC.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
        _check(_LIBC.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), "bind-mount", NETNS_RUN_DIR)
        _check(_LIBC.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None), "share", NETNS_RUN_DIR)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    try:
        _check(_LIBC.unshare(CLONE_NEWNET), "unshare a network namespace for", path)
        # /proc/thread-self: unshare moved this thread only, not the process /proc/self names.
        _check(_LIBC.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", MS_BIND, None), "mount", path)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def _check(result: int, doing: str, path: Path) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot {doing} {path}: {os.strerror(errno)}", str(path))


def delete_netns(name: str) -> bool:
    """Unmount and remove the named namespace; True if it existed. Idempotent."""
    path = Path(netns_path(name))
    if not path.exists():
        return False
    _LIBC.umount2(bytes(path), MNT_DETACH)  # a placeholder never mounted over: nothing to unmount
    path.unlink(missing_ok=True)
    return True


@contextmanager
def iproute(netns: str | None) -> Iterator[IPRoute]:
    """An RTNL socket in `netns` (None: this process's namespace). Never creates the namespace."""
    if netns is None:
        ipr = IPRoute()
    else:
        validate_netns_name(netns)
        # A socket stays in the namespace it was made in; pyroute2 owns (and closes) it from here.
        ipr = IPRoute(fileno=run_in_netns(netns, _rtnl_socket_descriptor))
    try:
        yield ipr
    finally:
        ipr.close()


def _rtnl_socket_descriptor() -> int:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE).detach()


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

    def joined() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _LIBC.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno), path)
        finally:
            os.close(fd)
        return function()

    return _in_own_thread(f"netns-{netns}", joined)


def _in_own_thread(name: str, function: Callable[[], T]) -> T:
    """`function`'s result (or exception), computed in a new thread that ends with it: a thread that
    joined or made a namespace is never reused for anything else."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
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
