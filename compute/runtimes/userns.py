"""User namespaces for namespace containers: per-container id ranges and idmapped image layers.

A container's uid/gid 0..65535 map to a range of host ids that no other container on the host has
(like Incus's isolated idmaps and podman's `--userns=auto`), so a process that escapes its container
is an unprivileged, unique host user.

How the files keep the ownership the image says:

- The image's layer dirs are shared read-only by every container and hold the image's own ids
  (0 = root). Each container sees them through *idmapped mounts* (`mount_setattr(MOUNT_ATTR_IDMAP)`):
  a file owned by 0 in the layer appears owned by the range's base. Nothing is copied or chowned.
- The upper dir (what the container writes) is a plain directory holding the *host* ids
  (base + the id inside), as podman and Incus store a container's writable layer. A setuid file that
  a container makes is thus owned by its unprivileged range on the host, never by host root.
  Commit subtracts the base again (`diff_upper(id_shift=...)`), so a committed layer holds the ids
  seen inside. Because the upper dir is stored shifted, a container keeps its range for its life on
  the host: a restart that keeps the changes gets the same range back.
- Ranges are recorded on the host (`<state_dir>/_userns/<slot>.<container id>`), so an agent restart
  re-adopts running containers with their ranges and never hands a live range out twice.

The overlay is mounted by the host with the idmapped layers given as file descriptors
(`fsconfig(FSCONFIG_SET_FD, "lowerdir+")`, Linux 6.13+); on older kernels (idmapped layers work from
5.19) each layer's idmapped mount is attached under a private staging directory for the time of the
overlay mount. runc 1.1 cannot make idmapped mounts itself; doing it here serves runc and crun alike.

A container joining a network namespace made by the host (a compartment) has no capability in it
(the host's user namespace owns it): it cannot mount sysfs, bind ports below 1024, or open raw
sockets. The host mounts a sysfs of that network namespace on the container's /sys (read-only, as
Docker's is) and sets the per-namespace sysctls Docker sets by default (unprivileged ports from 0,
ping sockets for all). Raw sockets (CAP_NET_RAW) stay unavailable there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import signal
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ids a container sees: 0..65535, as a standard /etc/subuid allocation gives each user.
CONTAINER_ID_COUNT = 65536
# Incus's default when /etc/subuid has no entry for root: 1,000,000 ids from 1,000,000 on. Operators
# should reserve the pool in /etc/subuid and /etc/subgid (`root:1000000:1000000000`) so that no
# other tool hands the same host ids out.
DEFAULT_POOL_START = 1_000_000
DEFAULT_POOL_SIZE = 1_000_000_000
ALLOCATION_NAME = re.compile(r"^(\d{1,10})\.([a-z0-9][a-z0-9-]{0,62})$")

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Syscall numbers of the new mount API: the same on x86-64 and aarch64 (the unified table).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 2


class UsernsError(RuntimeError):
    """A user namespace, an id range or an idmapped mount could not be set up; the message says why."""


@dataclass(frozen=True)
class IdMapping:
    """Container ids 0..size-1 are host ids host_base..host_base+size-1 (uids and gids alike)."""

    host_base: int
    size: int = CONTAINER_ID_COUNT

    def to_host(self, container_id: int) -> int:
        """The host id of an id inside the container (ids outside the range map to the base)."""
        return self.host_base + container_id if 0 <= container_id < self.size else self.host_base

    def oci(self) -> list[dict[str, int]]:
        """The mapping as config.json's linux.uidMappings / gidMappings."""
        return [{"containerID": 0, "hostID": self.host_base, "size": self.size}]


class IdRangeAllocator:
    """Hands out one id range per container from a pool, recorded as files under `directory`.

    An allocation is the empty file `<slot>.<container id>`: a directory listing is the whole table,
    so finding a free slot costs one listing under a lock, and the record survives agent restarts.
    """

    def __init__(
        self,
        directory: Path,
        *,
        pool_start: int = DEFAULT_POOL_START,
        pool_size: int = DEFAULT_POOL_SIZE,
        range_size: int = CONTAINER_ID_COUNT,
    ) -> None:
        if pool_start <= 0 or range_size <= 0 or pool_size < range_size:
            raise UsernsError("the id pool must start above 0 and hold at least one range")
        if pool_start + pool_size > 2**32 - 1:
            raise UsernsError("the id pool ends beyond the largest host id")
        self.directory = directory
        self.pool_start = pool_start
        self.range_size = range_size
        self.slots = pool_size // range_size
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def mapping_for_slot(self, slot: int) -> IdMapping:
        return IdMapping(host_base=self.pool_start + slot * self.range_size, size=self.range_size)

    def find(self, container_id: str) -> IdMapping | None:
        """The range recorded for `container_id`, or None."""
        for slot, owner in self._allocations():
            if owner == container_id:
                return self.mapping_for_slot(slot)
        return None

    def allocate(self, container_id: str) -> IdMapping:
        """The container's range: the one it has, or the lowest free one (recorded before returning)."""
        with self._locked():
            allocations = self._allocations()
            used = set()
            for slot, owner in allocations:
                if owner == container_id:
                    return self.mapping_for_slot(slot)
                used.add(slot)
            free = next((candidate for candidate in range(self.slots) if candidate not in used), None)
            if free is None:
                raise UsernsError(f"all {self.slots} id ranges of the pool are in use")
            record = self.directory / f"{free}.{container_id}"
            os.close(os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            return self.mapping_for_slot(free)

    def next_free(self) -> IdMapping | None:
        """The range the next `allocate` of a new container would hand out (None: the pool is full)."""
        used = {slot for slot, _owner in self._allocations()}
        free = next((candidate for candidate in range(self.slots) if candidate not in used), None)
        return None if free is None else self.mapping_for_slot(free)

    def release(self, container_id: str) -> None:
        """Forget the container's range (idempotent)."""
        with self._locked():
            for slot, owner in self._allocations():
                if owner == container_id:
                    (self.directory / f"{slot}.{owner}").unlink(missing_ok=True)

    def allocations(self) -> dict[str, IdMapping]:
        """Every recorded range by container id."""
        return {owner: self.mapping_for_slot(slot) for slot, owner in self._allocations()}

    def _allocations(self) -> list[tuple[int, str]]:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = ALLOCATION_NAME.match(entry.name)
                if match and int(match.group(1)) < self.slots:
                    found.append((int(match.group(1)), match.group(2)))
        return found

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def shift_owners(tree: Path, mapping: IdMapping) -> None:
    """Give every entry of `tree` owned by a container id (< size) the range's host id. Idempotent.

    For an upper dir written without a user namespace. Never follows a symlink (lchown, a walk that
    does not descend into links); the container is not running while this runs. chown clears
    setuid/setgid bits, so the mode is set again.
    """
    _shift_one(str(tree), mapping)
    for directory, dirnames, filenames in os.walk(tree, followlinks=False):
        for name in (*dirnames, *filenames):
            _shift_one(os.path.join(directory, name), mapping)


def _shift_one(path: str, mapping: IdMapping) -> None:
    entry = os.lstat(path)
    uid = entry.st_uid + mapping.host_base if entry.st_uid < mapping.size else entry.st_uid
    gid = entry.st_gid + mapping.host_base if entry.st_gid < mapping.size else entry.st_gid
    if (uid, gid) == (entry.st_uid, entry.st_gid):
        return
    os.lchown(path, uid, gid)
    if not stat.S_ISLNK(entry.st_mode) and os.lstat(path).st_mode != entry.st_mode:
        os.chmod(path, stat.S_IMODE(entry.st_mode))


# --------------------------------------------------------------------------- idmapped overlay


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall(number: int, *args: Any, what: str) -> int:
    result: int = _LIBC.syscall(number, *args)
    if result < 0:
        error_number = ctypes.get_errno()
        raise OSError(error_number, f"{what}: {os.strerror(error_number)}")
    return result


@contextmanager
def user_namespace_fd(mapping: IdMapping) -> Iterator[int]:
    """An fd of a user namespace with `mapping` (for MOUNT_ATTR_IDMAP); closed on exit.

    Namespaces are kept per mapping for the life of the process (ranges are reused: a freed range is
    the next one handed out), so most creates skip making one (a fork, ~1.5 ms). The caller gets
    its own dup of the fd: evicting a namespace from the cache never closes an fd in use.
    """
    with _NAMESPACES_LOCK:
        cached = _NAMESPACES.pop(mapping, None)
        if cached is None:
            cached = _new_user_namespace(mapping)
        _NAMESPACES[mapping] = cached  # most recently used last
        while len(_NAMESPACES) > NAMESPACE_CACHE_SIZE:
            _, evicted = _NAMESPACES.popitem(last=False)
            os.close(evicted)
        namespace_fd = os.dup(cached)
    try:
        yield namespace_fd
    finally:
        os.close(namespace_fd)


def prepare_user_namespace(mapping: IdMapping) -> None:
    """Make (and keep) the namespace of `mapping` ahead of the create that will need it."""
    with user_namespace_fd(mapping):
        pass


NAMESPACE_CACHE_SIZE = 256
_NAMESPACES: OrderedDict[IdMapping, int] = OrderedDict()
_NAMESPACES_LOCK = threading.Lock()


def forget_user_namespaces() -> None:
    """Drop the kept namespaces (benchmarks measure a cold create with it)."""
    with _NAMESPACES_LOCK:
        while _NAMESPACES:
            os.close(_NAMESPACES.popitem()[1])


def _new_user_namespace(mapping: IdMapping) -> int:
    # A user namespace needs a process to make it: a forked child unshares, the parent writes its
    # maps and opens /proc/<child>/ns/user, and the child exits. The fd keeps the namespace alive.
    ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    # The child is born with every signal blocked: no handler inherited from the caller (a Celery pool
    # process's raises SystemExit) can run in it and carry it past its os._exit (issue 16).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:  # the child only unshares and waits: no Python-level work after fork
        try:
            os.close(ready_read)
            os.close(go_write)
            status = 0 if _LIBC.unshare(CLONE_NEWUSER) == 0 else 1
            os.write(ready_write, bytes([status]))
            os.read(go_read, 1)
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(ready_write)
    os.close(go_read)
    try:
        if os.read(ready_read, 1) != b"\x00":
            raise UsernsError("could not create a user namespace (unshare(CLONE_NEWUSER) failed)")
        line = f"0 {mapping.host_base} {mapping.size}\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as map_file:
                map_file.write(line)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_read)
        os.close(go_write)  # lets the child exit
        os.waitpid(pid, 0)


def idmapped_mount_fd(path: str, namespace_fd: int, *, read_only: bool = True) -> int:
    """A detached, idmapped (and read-only, nosuid, nodev) clone of the mount at `path`; caller closes."""
    tree_fd = _syscall(
        SYS_OPEN_TREE,
        AT_FDCWD,
        path.encode(),
        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        what=f"open_tree {path}",
    )
    attributes = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    if read_only:
        attributes |= MOUNT_ATTR_RDONLY
    attr = _MountAttr(attributes, 0, 0, namespace_fd)
    try:
        _syscall(
            SYS_MOUNT_SETATTR,
            tree_fd,
            b"",
            AT_EMPTY_PATH,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
            what=f"idmapping {path}",
        )
    except OSError:
        os.close(tree_fd)
        raise
    return tree_fd


def mount_idmapped_overlay(
    lower_dirs: Sequence[str],
    upper: Path,
    work: Path,
    target: Path,
    mapping: IdMapping,
    *,
    staging_dir: Path,
    layers_by_fd: bool | None = None,
) -> None:
    """Mount an overlay on `target` whose lower layers appear owned by `mapping`'s host ids.

    `layers_by_fd`: None tries file descriptors first and falls back to staging mounts (older
    kernels); True/False forces one way (tests prove both).
    """
    with user_namespace_fd(mapping) as namespace_fd:
        layer_fds: list[int] = []
        try:
            for lower in lower_dirs:
                layer_fds.append(idmapped_mount_fd(lower, namespace_fd))
            if layers_by_fd is not False:
                try:
                    _overlay_from_fds(layer_fds, upper, work, target)
                    return
                except _LayersByFdUnsupported:
                    if layers_by_fd:
                        raise UsernsError(
                            "this kernel cannot take overlay layers as file descriptors"
                        ) from None
            _overlay_from_staging(layer_fds, upper, work, target, staging_dir)
        except OSError as error:
            if error.errno == errno.EINVAL and "idmapping" in str(error):
                raise UsernsError(
                    f"the layer store's filesystem cannot be idmapped ({error}); "
                    "user namespaces need ext4, xfs, btrfs or tmpfs (Linux 6.3+)"
                ) from error
            raise UsernsError(str(error)) from error
        finally:
            for fd in layer_fds:
                os.close(fd)


class _LayersByFdUnsupported(Exception):
    pass


def _overlay_from_fds(layer_fds: Sequence[int], upper: Path, work: Path, target: Path) -> None:
    context_fd = _syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC, what="fsopen overlay")
    try:
        for layer_fd in layer_fds:
            if _LIBC.syscall(SYS_FSCONFIG, context_fd, FSCONFIG_SET_FD, b"lowerdir+", None, layer_fd) < 0:
                error_number = ctypes.get_errno()
                if error_number == errno.EINVAL:
                    raise _LayersByFdUnsupported
                raise OSError(error_number, f"overlay lowerdir+: {os.strerror(error_number)}")
        for key, path in ((b"upperdir", upper), (b"workdir", work)):
            _syscall(
                SYS_FSCONFIG,
                context_fd,
                FSCONFIG_SET_STRING,
                key,
                str(path).encode(),
                0,
                what=f"overlay {key.decode()}",
            )
        _syscall(SYS_FSCONFIG, context_fd, FSCONFIG_CMD_CREATE, None, None, 0, what="creating the overlay")
        mount_fd = _syscall(SYS_FSMOUNT, context_fd, FSMOUNT_CLOEXEC, 0, what="fsmount overlay")
        try:
            _syscall(
                SYS_MOVE_MOUNT,
                mount_fd,
                b"",
                AT_FDCWD,
                str(target).encode(),
                MOVE_MOUNT_F_EMPTY_PATH,
                what=f"attaching the overlay on {target}",
            )
        finally:
            os.close(mount_fd)
    finally:
        os.close(context_fd)


def _overlay_from_staging(
    layer_fds: Sequence[int], upper: Path, work: Path, target: Path, staging_dir: Path
) -> None:
    # overlayfs keeps private clones of its layers: the staging mounts can go right after.
    staging_dir.mkdir(mode=0o700, exist_ok=True)
    attached: list[Path] = []
    try:
        for index, layer_fd in enumerate(layer_fds):
            point = staging_dir / str(index)
            point.mkdir(mode=0o700, exist_ok=True)
            _syscall(
                SYS_MOVE_MOUNT,
                layer_fd,
                b"",
                AT_FDCWD,
                str(point).encode(),
                MOVE_MOUNT_F_EMPTY_PATH,
                what=f"attaching a layer on {point}",
            )
            attached.append(point)
        options = f"lowerdir={':'.join(str(point) for point in attached)},upperdir={upper},workdir={work}"
        if _LIBC.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
            error_number = ctypes.get_errno()
            raise OSError(error_number, f"mount overlay on {target}: {os.strerror(error_number)}")
    finally:
        for point in attached:
            _LIBC.umount2(str(point).encode(), MNT_DETACH)
        with suppress(OSError):
            for point in staging_dir.iterdir():
                point.rmdir()
            staging_dir.rmdir()


def attach_volume(source: Path, target: Path, mapping: IdMapping | None, *, read_only: bool) -> None:
    """Mount the volume directory `source` on `target` (a staging point the runtime binds from).

    In a user namespace: idmapped with the container's range, so the ids on the volume are the ids
    seen inside (0 = the container's root, whatever its range on this host): a volume moves between
    containers of different ranges and micro-VMs (virtiofsd stores the guest's ids as they are)
    unchanged. nosuid,nodev always (the pool is mounted so too): nothing on a volume gains a privilege.
    """
    target.mkdir(mode=0o700, exist_ok=True)
    if _is_mount_point(target):
        return
    if mapping is None:
        tree_fd = _syscall(
            SYS_OPEN_TREE,
            AT_FDCWD,
            str(source).encode(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
            what=f"open_tree {source}",
        )
        attributes = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if read_only else 0)
        attr = _MountAttr(attributes, 0, 0, 0)
        try:
            _syscall(
                SYS_MOUNT_SETATTR,
                tree_fd,
                b"",
                AT_EMPTY_PATH,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
                what=f"mount attributes of {source}",
            )
        except OSError:
            os.close(tree_fd)
            raise
    else:
        with user_namespace_fd(mapping) as namespace_fd:
            tree_fd = idmapped_mount_fd(str(source), namespace_fd, read_only=read_only)
    try:
        _syscall(
            SYS_MOVE_MOUNT,
            tree_fd,
            b"",
            AT_FDCWD,
            str(target).encode(),
            MOVE_MOUNT_F_EMPTY_PATH,
            what=f"attaching a volume on {target}",
        )
    finally:
        os.close(tree_fd)


def _is_mount_point(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


# --------------------------------------------------------------------------- a host-made netns

# What a user-namespaced container cannot have in a network namespace the host owns (its capabilities
# count only in namespaces its user namespace owns), given per namespace as Docker does by default:
# binding ports below 1024 and ICMP echo sockets (ping) for every uid.
USERNS_NETNS_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/ipv4/ip_unprivileged_port_start", "0"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
)


def prepare_host_netns(netns_path: str, sysfs_target_fd: int) -> None:
    """Ready a host-made network namespace for a user-namespaced container that joins it.

    Attaches a read-only sysfs showing that namespace to the directory `sysfs_target_fd` refers to
    (an O_PATH fd the caller opened inside the rootfs without following symlinks: a path could be an
    image's symlink to a host directory) and sets `USERNS_NETNS_SYSCTLS` in it. Done on a
    short-lived thread: setns(CLONE_NEWNET) changes only the calling thread, and both sysfs and
    /proc/sys/net take the network namespace of the thread that makes or opens them.
    """
    failure: list[BaseException] = []

    def in_netns() -> None:
        try:
            netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(netns_fd, CLONE_NEWNET) != 0:
                    error_number = ctypes.get_errno()
                    raise OSError(error_number, f"setns {netns_path}: {os.strerror(error_number)}")
            finally:
                os.close(netns_fd)
            for name, value in USERNS_NETNS_SYSCTLS:
                with open(f"/proc/sys/{name}", "w") as sysctl:
                    sysctl.write(value)
            _attach_sysfs(sysfs_target_fd)
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    thread = threading.Thread(target=in_netns, name="prepare-host-netns")
    thread.start()
    thread.join()
    if failure:
        raise UsernsError(str(failure[0])) from failure[0]


def _attach_sysfs(target_fd: int) -> None:
    context_fd = _syscall(SYS_FSOPEN, b"sysfs", FSOPEN_CLOEXEC, what="fsopen sysfs")
    try:
        _syscall(SYS_FSCONFIG, context_fd, FSCONFIG_CMD_CREATE, None, None, 0, what="creating sysfs")
        attributes = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        mount_fd = _syscall(SYS_FSMOUNT, context_fd, FSMOUNT_CLOEXEC, attributes, what="fsmount sysfs")
    finally:
        os.close(context_fd)
    try:
        _syscall(
            SYS_MOVE_MOUNT,
            mount_fd,
            b"",
            target_fd,
            b"",
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            what="attaching sysfs",
        )
    finally:
        os.close(mount_fd)
