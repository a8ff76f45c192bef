"""Namespace containers through an OCI runtime CLI (runc or crun), monitored by conmon.

This is a driver layer: it takes plain frozen dataclasses of server-generated values and does the
work on the host. It never imports Django. Per container it keeps, under `state_dir/<id>/`:

    config.json        the OCI runtime config built from the ContainerSpec
    rootfs/            overlay mount of the image's layer dirs + disk/upper/ + disk/work/
    disk.img           the container's writable filesystem: a sparse ext4 image of spec.disk_bytes
    disk/              disk.img loop-mounted (nodev, nosuid): the kernel enforces the size (ENOSPC)
    disk/upper/ disk/work/  the container's captured changes (upper) and overlayfs scratch (work)
    hosts resolv.conf hostname   bind-mounted over /etc/...
    container.log      stdout+stderr in conmon's k8s-file format (see `read_log`)
    container.pid conmon.pid started_at runtime

and, shared by all containers: `_runtime/<binary>/` (the runtime's --root), `_exits/<id>` (conmon
writes the exit code there when the container's init exits, with or without an agent running),
`_sockets/` (conmon's attach socket links), `_locks/<id>.lock` and `_userns/` (each container's host id
range, see `compute.runtimes.userns`).

Containers run in a user namespace unless their spec says `user_namespace=False` (an operator's
decision upstream): container root is an unprivileged host uid of a range no other container has.

conmon (podman's monitor) double-forks away from the agent, so containers survive an agent restart;
a new OciRuntime over the same state dir re-adopts them through `list_ids()` and `state()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from compute.runtimes.seccomp_default import default_seccomp_profile
from compute.runtimes.userns import (
    DEFAULT_POOL_SIZE,
    DEFAULT_POOL_START,
    IdMapping,
    IdRangeAllocator,
    UsernsError,
    attach_volume,
    mount_idmapped_overlay,
    prepare_host_netns,
    prepare_user_namespace,
    shift_owners,
)

log = logging.getLogger(__name__)

ContainerStatus = Literal["creating", "running", "stopped", "absent"]
CgroupMode = Literal["v1", "v2", "hybrid"]

# Server-generated ids ("bh-" + 32 hex); also used as hostname default, cgroup and file names.
# runc's created container waits on this fifo in its state dir until started (see _start_by_exec_fifo).
EXEC_FIFO = "exec.fifo"
EXEC_FIFO_TIMEOUT_S = 2.0
# Formatted disk images waiting for the next create of their size (`OciRuntime.prepare_spare_disk`).
SPARE_DISKS_DIR = "_spare"
CONTAINER_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOSTNAME_PATTERN = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
ENV_NAME_PATTERN = re.compile(r"^[^=\x00]+$")
# overlayfs splits its option string on ',' and lowerdir on ':'; '\\' escapes either.
OVERLAY_UNSAFE_CHARS = re.compile(r"[,:\\\x00\n]")

DOCKER_DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
DOCKER_MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DOCKER_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
MIB = 1024 * 1024
DEFAULT_LOG_SIZE_MAX = 16 * MIB
# Docker's default hard limit; capped by what this process may grant.
NOFILE_LIMIT = 1_048_576
IMAGE_FILE_MAX_BYTES = 4 * MIB
MIN_DISK_BYTES = 16 * MIB  # ext4 with a journal needs a few MiB of its own
DEFAULT_DISK_BYTES = 1024 * MIB
CONMON_SYNC_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0


class OciRuntimeError(RuntimeError):
    """The OCI runtime, conmon or the host refused an operation; the message says why."""


class ContainerNotFound(OciRuntimeError):
    """No container with this id exists on the host."""


class InvalidContainerSpec(ValueError):
    """A ContainerSpec field cannot be used (bad id, path, user...)."""


@dataclass(frozen=True)
class VolumeMountSpec:
    source: str  # the volume's directory on the host's pool
    path: str  # absolute path inside the container
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to run one namespace container; all values are server-generated."""

    container_id: str
    lower_dirs: Sequence[str]  # image layer dirs, top-most first (overlayfs lowerdir order)
    args: Sequence[str]
    env: Sequence[str] = ()  # "KEY=value"
    cwd: str = "/"
    user: str = "0:0"  # "uid[:gid]" numeric, or "name[:group]" resolved in the image's /etc files
    hostname: str = ""  # empty: the container id
    vcpus: float = 1.0
    memory_mib: int = 256
    pids_limit: int = 1024
    disk_bytes: int = DEFAULT_DISK_BYTES  # the writable layer's filesystem size
    netns_path: str | None = None  # join this prepared netns; None: a private netns with only lo
    dns_servers: Sequence[str] = ()
    dns_search: Sequence[str] = ()
    ip_address: str | None = None  # written to /etc/hosts for the hostname
    read_only_paths: Sequence[str] = DOCKER_READONLY_PATHS
    masked_paths: Sequence[str] = DOCKER_MASKED_PATHS
    # False only for a tenant an operator allowed privileged containers: container root is host root.
    user_namespace: bool = True
    # Volumes (issue 17): host directories on the volume pool, bind-mounted at `path` (idmapped with
    # the container's range). Server values only: sources are pool paths, paths were checked.
    volumes: Sequence[VolumeMountSpec] = ()

    def __post_init__(self) -> None:
        # Freeze the sequences so that a spec is really immutable (and hashable).
        for name in (
            "lower_dirs",
            "args",
            "env",
            "dns_servers",
            "dns_search",
            "read_only_paths",
            "masked_paths",
            "volumes",
        ):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InvalidContainerSpec(f"{name} must be a sequence of strings, not a string")
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class ContainerState:
    """What the host says about a container right now."""

    status: ContainerStatus
    pid: int | None = None
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    oom_killed: bool = False


@dataclass(frozen=True)
class ContainerStats:
    """Resource usage read from the container's cgroup."""

    cpu_usage_ns: int
    memory_bytes: int  # usage without inactive page cache, as `docker stats` shows it
    memory_limit_bytes: int | None = None
    pids: int | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None


@dataclass(frozen=True)
class ResolvedUser:
    """A numeric process identity for config.json."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


@dataclass
class _CgroupLayout:
    mode: CgroupMode
    v1_mounts: dict[str, Path] = field(default_factory=dict)  # controller (or "name=x") -> mount point
    unified_mount: Path | None = None


class OciRuntime:
    """Create, start, watch, stop and delete namespace containers with runc or crun + conmon."""

    def __init__(
        self,
        binary: str = "runc",
        *,
        state_dir: Path,
        conmon: str = "conmon",
        cgroup_parent: str = "bulkhead",
        log_size_max: int = DEFAULT_LOG_SIZE_MAX,
        userns_pool: tuple[int, int] = (DEFAULT_POOL_START, DEFAULT_POOL_SIZE),
    ) -> None:
        resolved_binary = shutil.which(binary)
        if resolved_binary is None:
            raise OciRuntimeError(f"OCI runtime {binary!r} not found on PATH")
        resolved_conmon = shutil.which(conmon)
        if resolved_conmon is None:
            raise OciRuntimeError(f"conmon {conmon!r} not found on PATH")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", cgroup_parent):
            raise InvalidContainerSpec(f"bad cgroup parent {cgroup_parent!r}")
        self.binary = resolved_binary
        self.runtime_name = Path(resolved_binary).name
        self.conmon = resolved_conmon
        self.state_dir = Path(state_dir).absolute()
        self.cgroup_parent = cgroup_parent
        self.log_size_max = log_size_max
        self._runtime_root = self.state_dir / "_runtime" / self.runtime_name
        self._exit_dir = self.state_dir / "_exits"
        self._socket_dir = self.state_dir / "_sockets"
        self._lock_dir = self.state_dir / "_locks"
        for directory in (self._runtime_root, self._exit_dir, self._socket_dir, self._lock_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.id_ranges = IdRangeAllocator(
            self.state_dir / "_userns", pool_start=userns_pool[0], pool_size=userns_pool[1]
        )
        # A container's root (an unprivileged host uid) must reach its bundle to mount its rootfs:
        # let anyone traverse, not list, the state dir. Bundles are 0710 root:<the container's gid>.
        mode = self.state_dir.stat().st_mode
        if mode & 0o011 != 0o011:
            os.chmod(self.state_dir, stat.S_IMODE(mode) | 0o011)  # noqa: S103 - search, not read
        self._traversable_checked = False

    # ----------------------------------------------------------------- paths

    def bundle_dir(self, container_id: str) -> Path:
        """Return the bundle directory of a container (config.json, rootfs, upper...)."""
        return self.state_dir / _checked_id(container_id)

    def log_path(self, container_id: str) -> Path:
        """Return the host file holding the container's stdout and stderr (conmon k8s-file format)."""
        return self.bundle_dir(container_id) / "container.log"

    def upper_dir(self, container_id: str) -> Path:
        """Return the overlay upper dir: every file the container created, changed or deleted."""
        return self.bundle_dir(container_id) / "disk" / "upper"

    def rootfs_dir(self, container_id: str) -> Path:
        """Return the overlay mount point that is the container's root."""
        return self.bundle_dir(container_id) / "rootfs"

    def id_mapping(self, container_id: str) -> IdMapping | None:
        """The host id range of the container's user namespace; None for a root-mapped container.

        Its upper dir holds host ids: subtract `host_base` to get the ids seen inside (commit does).
        """
        return self.id_ranges.find(_checked_id(container_id))

    def exit_file(self, container_id: str) -> Path:
        """Return the file conmon writes the exit code to when the container exits."""
        return self._exit_dir / _checked_id(container_id)

    def cgroup_path(self, container_id: str, controller: str = "memory") -> Path:
        """Return the container's cgroup directory for `controller` (v1) or the unified one (v2)."""
        layout = _cgroup_layout()
        relative = Path(self.cgroup_parent) / _checked_id(container_id)
        if layout.mode == "v2":
            assert layout.unified_mount is not None
            return layout.unified_mount / relative
        mount = layout.v1_mounts.get(controller)
        if mount is None:
            raise OciRuntimeError(f"cgroup v1 controller {controller!r} is not mounted")
        return mount / relative

    # ----------------------------------------------------------------- lifecycle

    def create(self, spec: ContainerSpec) -> None:
        """Prepare the bundle, mount the rootfs and have conmon run `<runtime> create`. Idempotent.

        After this the container exists in state "creating" (its init waits for `start`). If the
        runtime refuses, everything created here is removed again and OciRuntimeError is raised.
        """
        container_id = _checked_id(spec.container_id)
        with self._locked(container_id):
            if self._runtime_knows(container_id) and self._runtime_state(container_id) is not None:
                return
            try:
                self._prepare_bundle(spec)
                self._launch_conmon(container_id)
            except BaseException:
                self._delete_locked(container_id)
                raise

    def start(self, container_id: str) -> int:
        """Start a created container's process; return its host pid. Idempotent while it runs."""
        with self._locked(container_id):
            bundle = self.bundle_dir(container_id)
            if not self._runtime_knows(container_id):
                raise ContainerNotFound(container_id)
            if self._read_exit_code(container_id) is not None:
                raise OciRuntimeError(f"container {container_id} cannot be started: it has exited")
            started_at_file = bundle / "started_at"
            if not started_at_file.exists():
                # Recorded before the start so that a process exiting at once still has
                # started_at <= finished_at.
                _write_text_atomic(started_at_file, f"{time.time():.6f}")
                try:
                    if not self._start_by_exec_fifo(container_id):
                        self._run_runtime("start", container_id)
                except OciRuntimeError:
                    started_at_file.unlink(missing_ok=True)
                    raise
            pid = self._read_int(bundle / "container.pid")
            if pid is None:
                raise OciRuntimeError(f"container {container_id} has no pid file")
            return pid

    def _start_by_exec_fifo(self, container_id: str) -> bool:
        """What `runc start` does for a created container, without its exec (~10 ms): runc's init waits
        to open its `exec.fifo` for writing; a reader lets it write one byte and exec the process, and the
        fifo's removal is what makes runc call the container running (libcontainer's `exec()`). Only for
        runc; False (the caller runs `runc start`) when there is no such fifo or the init does not
        answer in time (e.g. it died: runc start tells why)."""
        if self.runtime_name != "runc":
            return False
        fifo = self._runtime_root / container_id / EXEC_FIFO
        try:
            if not stat.S_ISFIFO(os.stat(fifo).st_mode):
                return False
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            waiting = select.poll()  # not select(): a busy agent's fds may pass FD_SETSIZE
            waiting.register(reader, select.POLLIN)
            if not waiting.poll(EXEC_FIFO_TIMEOUT_S * 1000) or not os.read(reader, 1):
                return False
        finally:
            os.close(reader)
        fifo.unlink(missing_ok=True)
        return True

    def run(self, spec: ContainerSpec) -> int:
        """Create and start a container; return its host pid."""
        self.create(spec)
        return self.start(spec.container_id)

    def is_absent(self, container_id: str) -> bool:
        """Nothing of the container on this host: no runtime state, bundle or kept changes (no runtime
        call: a few stats)."""
        container_id = _checked_id(container_id)
        return not (
            self._runtime_knows(container_id)
            or self.bundle_dir(container_id).exists()
            or (self.state_dir / "_kept" / container_id).exists()
        )

    def state(self, container_id: str) -> ContainerState:
        """Report the container's status, pid, exit code and times as the host sees them."""
        bundle = self.bundle_dir(container_id)
        exit_code = self._read_exit_code(container_id)
        # Once conmon has recorded the exit, the runtime has nothing more to tell.
        runtime_state = self._runtime_state(container_id) if exit_code is None else None
        if runtime_state is None and not bundle.is_dir():
            return ContainerState(status="absent")
        if exit_code is None and runtime_state is not None and runtime_state.get("status") == "stopped":
            # conmon reaps and records within milliseconds; give it that long.
            exit_code = self._wait_for_exit_file(container_id, timeout=0.5)
        started_at = _timestamp(self._read_float(bundle / "started_at"))
        oom_killed = (bundle / "persist" / "oom").exists()
        if exit_code is not None:
            finished_at = _timestamp(_mtime(self.exit_file(container_id)))
            return ContainerState("stopped", None, exit_code, started_at, finished_at, oom_killed)
        if runtime_state is None:
            return ContainerState(status="creating")  # a bundle without a runtime container
        status = runtime_state.get("status")
        pid = runtime_state.get("pid") or None
        if status == "created":
            return ContainerState("creating", pid)
        if status in ("running", "paused"):
            return ContainerState("running", pid, None, started_at or _parse_rfc3339(runtime_state))
        return ContainerState("stopped", None, None, started_at, None, oom_killed)

    def wait_exit(self, container_id: str, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the container to exit; return its exit code or None."""
        deadline = time.monotonic() + timeout
        next_liveness_check = time.monotonic() + 0.5
        poll_interval = 0.001  # short exits are common (probes, `true`): look often at first
        while True:
            exit_code = self._read_exit_code(container_id)
            if exit_code is not None:
                return exit_code
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_liveness_check:
                next_liveness_check = now + 0.5
                # Without a monitor nobody will ever write the exit file: stop waiting.
                if not self._conmon_alive(container_id) and self.state(container_id).status != "running":
                    return self._read_exit_code(container_id)
            time.sleep(min(poll_interval, max(0.0, deadline - now)))
            poll_interval = min(0.01, poll_interval * 1.5)

    def exited_ids(self) -> list[str]:
        """Return the ids whose exit code conmon has recorded (cheap: one directory listing)."""
        with os.scandir(self._exit_dir) as entries:
            return sorted(entry.name for entry in entries if CONTAINER_ID_PATTERN.match(entry.name))

    def stop(self, container_id: str, grace_seconds: float = 10) -> int | None:
        """Send SIGTERM, then SIGKILL after `grace_seconds`; return the exit code (None if unknown)."""
        current = self.state(container_id)
        if current.status == "absent":
            raise ContainerNotFound(container_id)
        if current.status == "stopped":
            return current.exit_code
        if current.status == "running":
            self._kill(container_id, signal.SIGTERM)
            exit_code = self.wait_exit(container_id, grace_seconds)
            if exit_code is not None:
                return exit_code
        self._kill(container_id, signal.SIGKILL)
        return self.wait_exit(container_id, KILL_WAIT_S)

    def delete(self, container_id: str, *, keep_upper: bool = False) -> None:
        """Kill if running, delete from the runtime, unmount, remove cgroup and bundle. Idempotent.

        keep_upper: keep the container's captured changes for the next create of the same id (restart).
        """
        with self._locked(container_id):
            kept = self.state_dir / "_kept" / container_id
            disk = self.bundle_dir(container_id) / "disk.img"
            keep = keep_upper and disk.is_file()
            if keep:
                kept.parent.mkdir(mode=0o700, exist_ok=True)
                _remove_kept(kept)
            self._delete_locked(container_id, keep_upper_at=kept if keep else None)
            if not keep_upper:
                _remove_kept(kept)

    def spare_disk_path(self, size_bytes: int) -> Path:
        return self.state_dir / SPARE_DISKS_DIR / f"{int(size_bytes)}.img"

    def prepare_next_create(self, disk_bytes: int, *, user_namespace: bool = True) -> None:
        """What the next create like the last one will need and can be made now, off its path: a
        formatted disk image of this size and the user namespace of the id range it will be given."""
        self.prepare_spare_disk(disk_bytes)
        if user_namespace:
            upcoming = self.id_ranges.next_free()
            if upcoming is not None:
                prepare_user_namespace(upcoming)

    def drop_spare_disks(self, keep_sizes: Iterable[int] = ()) -> list[int]:
        """`drop_spare_disks` of this runtime's state dir."""
        return drop_spare_disks(self.state_dir, keep_sizes)

    def prepare_spare_disk(self, size_bytes: int) -> bool:
        """Format a disk image of this size for the next create to take (`mkfs.ext4`, ~25 ms, off that
        create's path). False when one is ready already. Crash-safe: the image is formatted unnamed and
        linked into place whole; two processes making one at once leave one."""
        spare = self.spare_disk_path(size_bytes)
        if spare.exists():
            return False
        spare.parent.mkdir(mode=0o700, exist_ok=True)
        return _make_disk_image_unnamed(spare, size_bytes)

    def list_ids(self) -> list[str]:
        """Return every container id that exists on the host: in the runtime or as a bundle dir."""
        ids: set[str] = set()
        foreign: set[str] = set()  # bundles of another runtime binary sharing this state dir
        output = self._run_runtime("list", "--format", "json").stdout.strip()
        for entry in json.loads(output or "null") or []:
            if CONTAINER_ID_PATTERN.match(entry.get("id", "")):
                ids.add(entry["id"])
        with os.scandir(self.state_dir) as entries:
            for entry in entries:
                if not (entry.is_dir(follow_symlinks=False) and CONTAINER_ID_PATTERN.match(entry.name)):
                    continue
                owner = _read_text(Path(entry.path) / "runtime")
                if owner is None or owner == self.runtime_name:
                    ids.add(entry.name)
                else:
                    foreign.add(entry.name)
        # A cgroup left behind by an agent killed mid-delete is a leak too; delete() removes it.
        ids.update(name for name in self._cgroup_children() if name not in foreign)
        # So is an id range whose container is gone (a range kept for a restart is listed too:
        # its workload exists, so nobody deletes it).
        ids.update(name for name in self.id_ranges.allocations() if name not in foreign)
        return sorted(ids)

    def stats(self, container_id: str) -> ContainerStats:
        """Read CPU time and memory use from the container's cgroup (v1 or v2)."""
        layout = _cgroup_layout()
        if layout.mode == "v2":
            directory = self.cgroup_path(container_id)
            cpu_stat = _read_key_values(directory / "cpu.stat")
            memory_stat = _read_key_values(directory / "memory.stat")
            current = self._read_int(directory / "memory.current")
            if current is None:
                raise ContainerNotFound(container_id)
            limit_text = _read_text(directory / "memory.max")
            io_read = io_write = 0
            for line in (_read_text(directory / "io.stat") or "").splitlines():
                fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                io_read += int(fields.get("rbytes", "0") or 0)
                io_write += int(fields.get("wbytes", "0") or 0)
            return ContainerStats(
                cpu_usage_ns=cpu_stat.get("usage_usec", 0) * 1000,
                memory_bytes=max(0, current - memory_stat.get("inactive_file", 0)),
                memory_limit_bytes=int(limit_text) if limit_text and limit_text.isdigit() else None,
                pids=self._read_int(directory / "pids.current"),
                block_read_bytes=io_read,
                block_write_bytes=io_write,
            )
        memory_dir = self.cgroup_path(container_id, "memory")
        usage = self._read_int(memory_dir / "memory.usage_in_bytes")
        if usage is None:
            raise ContainerNotFound(container_id)
        memory_stat = _read_key_values(memory_dir / "memory.stat")
        cpu_usage = self._read_int(self.cgroup_path(container_id, "cpuacct") / "cpuacct.usage") or 0
        pids = None
        if "pids" in layout.v1_mounts:
            pids = self._read_int(self.cgroup_path(container_id, "pids") / "pids.current")
        block_read = block_write = None
        if "blkio" in layout.v1_mounts:
            block_read, block_write = _blkio_totals(self.cgroup_path(container_id, "blkio"))
        return ContainerStats(
            cpu_usage_ns=cpu_usage,
            memory_bytes=max(0, usage - memory_stat.get("total_inactive_file", 0)),
            memory_limit_bytes=self._read_int(memory_dir / "memory.limit_in_bytes"),
            pids=pids,
            block_read_bytes=block_read,
            block_write_bytes=block_write,
        )

    def read_log(self, container_id: str, streams: Sequence[str] = ("stdout", "stderr")) -> bytes:
        """Return the container's output from its log file, without conmon's per-line framing."""
        try:
            raw = self.log_path(container_id).read_bytes()
        except FileNotFoundError:
            return b""
        return parse_k8s_log(raw, streams)

    # ----------------------------------------------------------------- internals: create

    def _prepare_bundle(self, spec: ContainerSpec) -> None:
        container_id = spec.container_id
        bundle = self.bundle_dir(container_id)
        lower_dirs = _checked_lower_dirs(spec.lower_dirs)
        _check_spec_values(spec)
        try:
            bundle.mkdir(mode=0o700)
            fresh = True  # nothing in it can be mounted yet: no need to read the mount table
        except FileExistsError:
            fresh = False
        _write_text_atomic(bundle / "runtime", self.runtime_name)
        kept_disk = self.state_dir / "_kept" / container_id
        if kept_disk.is_file() and not (bundle / "disk.img").exists():
            kept_disk.rename(bundle / "disk.img")  # changes kept across a restart
        disk = bundle / "disk"
        disk.mkdir(mode=0o700, exist_ok=True)
        if fresh or not _is_mount_point(disk):
            if not (bundle / "disk.img").is_file() and not _take_spare_disk(
                self.spare_disk_path(spec.disk_bytes), bundle / "disk.img"
            ):
                _make_disk_image(bundle / "disk.img", spec.disk_bytes)
            _mount_disk_image(bundle / "disk.img", disk)
        for directory in (disk / "upper", disk / "work", bundle / "rootfs"):
            directory.mkdir(mode=0o755, exist_ok=True)
        (bundle / "persist").mkdir(mode=0o700, exist_ok=True)
        # The runtime's own mount points live in an init layer under the upper dir (as Docker's): runc
        # finds them there and creates nothing in the upper dir, so `changes` and `commit` show only
        # what the workload itself changed.
        lower_dirs = [str(_prepare_init_layer(bundle / "init", lower_dirs)), *lower_dirs]
        mapping = self._user_namespace_for(spec, bundle, lower_dirs)
        rootfs = bundle / "rootfs"
        if fresh or not _is_mount_point(rootfs):
            if mapping is None:
                _mount_overlay(lower_dirs, disk / "upper", disk / "work", rootfs)
            else:
                try:
                    mount_idmapped_overlay(
                        lower_dirs,
                        disk / "upper",
                        disk / "work",
                        rootfs,
                        mapping,
                        staging_dir=bundle / "layers",
                    )
                except UsernsError as error:
                    raise OciRuntimeError(f"container {container_id}: {error}") from error
        sysfs_by_host = mapping is not None and spec.netns_path is not None
        if mapping is not None and sysfs_by_host:
            self._prepare_host_netns(spec, rootfs, mapping)
        for index, volume in enumerate(spec.volumes):
            (bundle / "volumes").mkdir(mode=0o711, exist_ok=True)
            try:
                attach_volume(
                    Path(volume.source), bundle / "volumes" / str(index), mapping, read_only=volume.read_only
                )
            except OSError as error:
                raise OciRuntimeError(
                    f"container {container_id}: volume at {volume.path}: {error}"
                ) from error
        user = resolve_user(rootfs, spec.user)
        if mapping is not None and max(user.uid, user.gid, *user.additional_gids) >= mapping.size:
            raise InvalidContainerSpec(
                f"user {spec.user!r} is outside the container's ids (0 to {mapping.size - 1})"
            )
        hostname = spec.hostname or container_id
        _write_text_atomic(bundle / "hostname", hostname + "\n")
        _write_text_atomic(bundle / "hosts", _hosts_file(hostname, spec.ip_address))
        _write_text_atomic(bundle / "resolv.conf", _resolv_conf(spec.dns_servers, spec.dns_search))
        if mapping is not None:
            # The container's root may edit them, as without a user namespace.
            for name in ("hostname", "hosts", "resolv.conf"):
                os.chown(bundle / name, mapping.host_base, mapping.host_base)
        config = build_oci_config(
            spec,
            user=user,
            bundle=bundle,
            cgroups_path=f"/{self.cgroup_parent}/{container_id}",
            cgroup_mode=cgroup_mode(),
            id_mapping=mapping,
            sysfs_by_host=sysfs_by_host,
        )
        # Compact: an indented dump runs json's pure-Python encoder over the seccomp profile (~5 ms).
        _write_text_atomic(bundle / "config.json", json.dumps(config, separators=(",", ":")))
        self.log_path(container_id).touch(mode=0o600)

    def _user_namespace_for(
        self, spec: ContainerSpec, bundle: Path, lower_dirs: list[str]
    ) -> IdMapping | None:
        """Allocate (or find) the container's id range and give it its bundle and upper dir."""
        if not spec.user_namespace:
            return None
        if not self._traversable_checked:
            _check_traversable(self.state_dir)
            self._traversable_checked = True
        upper = bundle / "disk" / "upper"
        had_range = self.id_ranges.find(spec.container_id) is not None
        mapping = self.id_ranges.allocate(spec.container_id)
        if not had_range and any(upper.iterdir()):
            # Changes kept from before user namespaces (a restart after the upgrade): give them
            # the range's ids once, so that the files keep their owners inside.
            shift_owners(upper, mapping)
        os.chown(bundle, 0, mapping.host_base)
        os.chmod(bundle, 0o710)  # noqa: S103 - only the container's own group may search it
        # The upper dir's root is the container's "/": owned and moded as the image's top layer's.
        top = os.stat(lower_dirs[0])
        upper_stat = os.lstat(upper)
        wanted = (mapping.to_host(top.st_uid), mapping.to_host(top.st_gid))
        if (upper_stat.st_uid, upper_stat.st_gid) != wanted:
            os.chown(upper, *wanted)
        if stat.S_IMODE(upper_stat.st_mode) != stat.S_IMODE(top.st_mode):
            os.chmod(upper, stat.S_IMODE(top.st_mode))
        return mapping

    def _prepare_host_netns(self, spec: ContainerSpec, rootfs: Path, mapping: IdMapping) -> None:
        # The container has no capability in a network namespace the host owns: the host mounts
        # its sysfs and lets every uid bind low ports and ping (see userns.prepare_host_netns).
        # The image decides what rootfs/sys is: everything below goes by fd, never following a link.
        assert spec.netns_path is not None
        if _is_mount_point(rootfs / "sys"):
            return
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir("sys", 0o555, dir_fd=root_fd)
            except FileExistsError:
                pass
            else:
                os.chown("sys", mapping.host_base, mapping.host_base, dir_fd=root_fd, follow_symlinks=False)
            try:
                target_fd = os.open(
                    "sys", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
                )
            except OSError as error:  # a symlink (ENOTDIR/ELOOP) or anything but a directory
                raise InvalidContainerSpec(
                    f"the image's /sys is not a directory ({error.strerror})"
                ) from None
        finally:
            os.close(root_fd)
        try:
            prepare_host_netns(spec.netns_path, target_fd)
        except UsernsError as error:
            raise OciRuntimeError(f"container {spec.container_id}: {error}") from error
        finally:
            os.close(target_fd)

    def _launch_conmon(self, container_id: str) -> None:
        bundle = self.bundle_dir(container_id)
        for stale in (self.exit_file(container_id), bundle / "container.pid", bundle / "persist" / "exit"):
            stale.unlink(missing_ok=True)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_inheritable(write_fd, True)
        command = [
            self.conmon,
            "--api-version",
            "1",
            "--cid",
            container_id,
            "--cuuid",
            container_id,
            "--name",
            container_id,
            "--runtime",
            self.binary,
            "--runtime-arg",
            f"--root={self._runtime_root}",
            "--bundle",
            str(bundle),
            "--container-pidfile",
            str(bundle / "container.pid"),
            "--conmon-pidfile",
            str(bundle / "conmon.pid"),
            "--exit-dir",
            str(self._exit_dir),
            "--persist-dir",
            str(bundle / "persist"),
            "--socket-dir-path",
            str(self._socket_dir),
            "--log-path",
            f"k8s-file:{bundle / 'container.log'}",
            "--log-size-max",
            str(self.log_size_max),
            "--log-level",
            "error",
        ]
        # conmon reports the container pid (or the runtime's error) as JSON on _OCI_SYNCPIPE.
        environment = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "_OCI_SYNCPIPE": str(write_fd)}
        try:
            launcher = subprocess.Popen(
                command,
                env=environment,
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        try:
            message = _read_sync_message(read_fd, CONMON_SYNC_TIMEOUT_S)
        finally:
            os.close(read_fd)
            # The launcher forks the real monitor and exits at once; reap it.
            try:
                _, launcher_stderr = launcher.communicate(timeout=CONMON_SYNC_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                launcher.kill()
                _, launcher_stderr = launcher.communicate()
        pid = message.get("data") if message else None
        if not isinstance(pid, int) or pid <= 0:
            reason = str((message or {}).get("message") or launcher_stderr.decode(errors="replace")).strip()
            raise OciRuntimeError(
                f"{self.runtime_name} create {container_id} failed: {reason or 'conmon gave no answer'}"
            )

    # ----------------------------------------------------------------- internals: delete

    def _delete_locked(self, container_id: str, keep_upper_at: Path | None = None) -> None:
        bundle = self.bundle_dir(container_id)
        if self._runtime_knows(container_id):
            if self._read_exit_code(container_id) is None and self._conmon_alive(container_id):
                # Kill and wait for conmon's exit record ourselves: `runc delete --force` of a live
                # container sleeps 100 ms before it even looks whether the process died.
                self._kill(container_id, signal.SIGKILL)
                self.wait_exit(container_id, KILL_WAIT_S)
            # --force still covers a container whose monitor is gone.
            completed = self._run_runtime("delete", "--force", container_id, check=False)
            if completed.returncode != 0 and self._runtime_state(container_id) is not None:
                raise OciRuntimeError(
                    f"{self.runtime_name} delete {container_id} failed: "
                    f"{_runtime_error_text(completed.stderr)}"
                )
        self._end_conmon(container_id)
        rootfs = bundle / "rootfs"
        # Submounts first (the host-made sysfs of a container in a compartment), deepest first.
        for point in sorted((p for p in _mount_points() if rootfs in p.parents), key=_depth, reverse=True):
            _unmount(point)
        for mount_point in (rootfs, bundle / "disk"):  # the overlay first: it uses the disk
            while _is_mount_point(mount_point):
                _unmount(mount_point)
        for point in (p for p in _mount_points() if (bundle / "volumes") in p.parents):
            _unmount(point)
        leftover_mounts = [mount for mount in _mount_points() if _is_within(mount, bundle)]
        if leftover_mounts:
            raise OciRuntimeError(f"refusing to remove {bundle}: still mounted: {leftover_mounts}")
        self._remove_cgroups(container_id)
        self.exit_file(container_id).unlink(missing_ok=True)
        with suppress(FileNotFoundError):
            (self._socket_dir / container_id).unlink()
        if keep_upper_at is not None:
            (bundle / "disk.img").rename(keep_upper_at)
        else:
            # The upper dir holds the range's host ids: the range goes only with it.
            self.id_ranges.release(container_id)
        if bundle.exists():
            shutil.rmtree(bundle)
        # Upstream serializes operations per workload, so dropping the lock file here is safe.
        (self._lock_dir / f"{container_id}.lock").unlink(missing_ok=True)

    def _end_conmon(self, container_id: str) -> None:
        """Let the monitor finish writing the exit file, then make sure it is gone."""
        pid = self._conmon_pid(container_id)
        if pid is None:
            return
        deadline = time.monotonic() + 2.0
        while _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _process_alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove_cgroup_parent(self) -> None:
        """Remove this runtime's parent cgroup where it is empty (a host shutting down its workloads)."""
        layout = _cgroup_layout()
        mounts = list(layout.v1_mounts.values())
        if layout.unified_mount is not None:
            mounts.append(layout.unified_mount)
        for mount in set(mounts):
            with suppress(FileNotFoundError, OSError):
                (mount / self.cgroup_parent).rmdir()  # ENOTEMPTY/EBUSY: something still lives there

    def _remove_cgroups(self, container_id: str) -> None:
        layout = _cgroup_layout()
        mounts = list(layout.v1_mounts.values())
        if layout.unified_mount is not None:
            mounts.append(layout.unified_mount)
        relative = Path(self.cgroup_parent) / container_id
        for mount in set(mounts):
            directory = mount / relative
            deadline = time.monotonic() + KILL_WAIT_S
            while directory.exists():
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    break
                except OSError as error:
                    # EBUSY while the last killed task is still leaving the group.
                    if error.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise OciRuntimeError(f"cannot remove cgroup {directory}: {error}") from error
                    time.sleep(0.01)

    # ----------------------------------------------------------------- internals: runtime CLI

    def _run_runtime(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [self.binary, f"--root={self._runtime_root}", *args]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if check and completed.returncode != 0:
            raise OciRuntimeError(
                f"{self.runtime_name} {' '.join(args)} failed: {_runtime_error_text(completed.stderr)}"
            )
        return completed

    def _runtime_state(self, container_id: str) -> dict[str, Any] | None:
        if not self._runtime_knows(_checked_id(container_id)):
            return None
        completed = self._run_runtime("state", _checked_id(container_id), check=False)
        if completed.returncode != 0:
            return None
        state: dict[str, Any] = json.loads(completed.stdout)
        return state

    def _kill(self, container_id: str, signal_number: signal.Signals) -> None:
        completed = self._run_runtime("kill", container_id, str(int(signal_number)), check=False)
        if completed.returncode == 0:
            return
        # Losing a race with the process exiting on its own is fine; anything else is not.
        runtime_state = self._runtime_state(container_id)
        if runtime_state is not None and runtime_state.get("status") != "stopped":
            raise OciRuntimeError(
                f"{self.runtime_name} kill {container_id} failed: {_runtime_error_text(completed.stderr)}"
            )

    def _cgroup_children(self) -> list[str]:
        layout = _cgroup_layout()
        mount = layout.unified_mount if layout.mode == "v2" else layout.v1_mounts.get("memory")
        if mount is None:
            return []
        try:
            with os.scandir(mount / self.cgroup_parent) as entries:
                return [
                    entry.name
                    for entry in entries
                    if entry.is_dir() and CONTAINER_ID_PATTERN.match(entry.name)
                ]
        except FileNotFoundError:
            return []

    def _runtime_knows(self, container_id: str) -> bool:
        # runc and crun both keep a directory per container under --root: a cheap first check.
        return (self._runtime_root / container_id).exists()

    # ----------------------------------------------------------------- internals: files

    def _read_exit_code(self, container_id: str) -> int | None:
        return self._read_int(self.exit_file(container_id))

    def _wait_for_exit_file(self, container_id: str, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            exit_code = self._read_exit_code(container_id)
            if exit_code is not None or time.monotonic() >= deadline or not self._conmon_alive(container_id):
                return exit_code
            time.sleep(0.01)

    def _conmon_pid(self, container_id: str) -> int | None:
        pid = self._read_int(self.bundle_dir(container_id) / "conmon.pid")
        if pid is None:
            return None
        # Guard against pid reuse: the process must be conmon for this very container.
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not argv or Path(argv[0].decode(errors="replace")).name != "conmon":
            return None
        return pid if container_id.encode() in argv else None

    def _conmon_alive(self, container_id: str) -> bool:
        pid = self._conmon_pid(container_id)
        return pid is not None and _process_alive(pid)

    @staticmethod
    def _read_int(path: Path) -> int | None:
        text = _read_text(path)
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            return None

    @staticmethod
    def _read_float(path: Path) -> float | None:
        text = _read_text(path)
        try:
            return float(text) if text else None
        except ValueError:
            return None

    @contextmanager
    def _locked(self, container_id: str) -> Iterator[None]:
        lock_path = self._lock_dir / f"{_checked_id(container_id)}.lock"
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- config.json


def build_oci_config(
    spec: ContainerSpec,
    *,
    user: ResolvedUser,
    bundle: Path,
    cgroups_path: str,
    cgroup_mode: CgroupMode,
    id_mapping: IdMapping | None = None,
    sysfs_by_host: bool = False,
) -> dict[str, Any]:
    """Build the OCI runtime config (config.json) for `spec`, Docker's defaults applied.

    id_mapping: run in a user namespace with this range. sysfs_by_host: the host mounted the rootfs's
    /sys already (a user-namespaced container joining the host's netns cannot mount it).
    """
    _check_spec_values(spec)
    env = list(spec.env)
    env_names = {entry.split("=", 1)[0] for entry in env}
    if "PATH" not in env_names:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOSTNAME" not in env_names:
        env.append(f"HOSTNAME={spec.hostname or spec.container_id}")
    if "HOME" not in env_names:
        env.append(f"HOME={user.home}")
    nofile = _nofile_limit()
    capabilities = list(DOCKER_DEFAULT_CAPABILITIES)
    namespaces: list[dict[str, str]] = [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")]
    namespaces.append(
        {"type": "network", "path": spec.netns_path} if spec.netns_path else {"type": "network"}
    )
    if cgroup_mode == "v2":
        namespaces.append({"type": "cgroup"})  # Docker's default on cgroup v2 hosts
    if id_mapping is not None:
        namespaces.append({"type": "user"})
    memory_limit = spec.memory_mib * MIB
    memory: dict[str, Any] = {"limit": memory_limit}
    if cgroup_mode == "v2" or Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists():
        memory["swap"] = memory_limit  # memory+swap == memory: no swap
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {
                "uid": user.uid,
                "gid": user.gid,
                **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {}),
            },
            "args": list(spec.args),
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.hostname or spec.container_id,
        "mounts": [
            *(
                mount
                for mount in _docker_mounts(bundle)
                if not (sysfs_by_host and mount["destination"] == "/sys")
            ),
            *(
                {
                    "destination": volume.path,
                    "type": "bind",
                    "source": str(bundle / "volumes" / str(index)),
                    "options": [
                        "rbind",
                        "rprivate",
                        "nosuid",
                        "nodev",
                        *(["ro"] if volume.read_only else []),
                    ],
                }
                for index, volume in enumerate(spec.volumes)
            ),
        ],
        "linux": {
            **(
                {"uidMappings": id_mapping.oci(), "gidMappings": id_mapping.oci()}
                if id_mapping is not None
                else {}
            ),
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": memory,
                "cpu": {"quota": max(1000, round(spec.vcpus * CPU_PERIOD_US)), "period": CPU_PERIOD_US},
                "pids": {"limit": spec.pids_limit},
            },
            "seccomp": default_seccomp_profile(),
            "maskedPaths": list(spec.masked_paths),
            "readonlyPaths": list(spec.read_only_paths),
        },
    }


def _docker_mounts(bundle: Path) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            # A mount target inside the container, not a host temp file.
            "destination": "/dev/shm",  # noqa: S108
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
    ]
    for name in ("resolv.conf", "hostname", "hosts"):
        mounts.append(
            {
                "destination": f"/etc/{name}",
                "type": "bind",
                "source": str(bundle / name),
                "options": ["rbind", "rprivate"],
            }
        )
    return mounts


def _hosts_file(hostname: str, ip_address: str | None) -> str:
    address = str(ipaddress.ip_address(ip_address)) if ip_address else "127.0.1.1"
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{address}\t{hostname}\n"


def _resolv_conf(dns_servers: Sequence[str], dns_search: Sequence[str]) -> str:
    lines = [f"nameserver {ipaddress.ip_address(server)}" for server in dns_servers]
    if dns_search:
        lines.append("search " + " ".join(dns_search))
    return "".join(line + "\n" for line in lines)


def _nofile_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, NOFILE_LIMIT)


def _check_spec_values(spec: ContainerSpec) -> None:
    _checked_id(spec.container_id)
    if not spec.args:
        raise InvalidContainerSpec("args must not be empty")
    if any("\x00" in arg for arg in spec.args):
        raise InvalidContainerSpec("args must not contain NUL")
    for entry in spec.env:
        name, separator, _ = entry.partition("=")
        if not separator or not ENV_NAME_PATTERN.match(name) or "\x00" in entry:
            raise InvalidContainerSpec(f"bad environment entry {entry!r}")
    if not spec.cwd.startswith("/") or "\x00" in spec.cwd:
        raise InvalidContainerSpec("cwd must be an absolute path")
    if spec.hostname and not HOSTNAME_PATTERN.match(spec.hostname):
        raise InvalidContainerSpec(f"bad hostname {spec.hostname!r}")
    if not (0 < spec.vcpus <= 1024):
        raise InvalidContainerSpec("vcpus must be in (0, 1024]")
    if not (4 <= spec.memory_mib <= 16 * 1024 * 1024):
        raise InvalidContainerSpec("memory_mib must be at least 4")
    if spec.pids_limit < 1:
        raise InvalidContainerSpec("pids_limit must be positive")
    if spec.disk_bytes < MIN_DISK_BYTES:
        raise InvalidContainerSpec(f"disk_bytes must be at least {MIN_DISK_BYTES}")
    if spec.netns_path is not None and not Path(spec.netns_path).is_absolute():
        raise InvalidContainerSpec("netns_path must be an absolute path")
    for name in spec.dns_search:
        if not HOSTNAME_PATTERN.match(name):
            raise InvalidContainerSpec(f"bad DNS search domain {name!r}")
    for server in (*spec.dns_servers, *([spec.ip_address] if spec.ip_address else [])):
        try:
            ipaddress.ip_address(server)
        except ValueError as error:
            raise InvalidContainerSpec(str(error)) from error
    for path in (*spec.read_only_paths, *spec.masked_paths):
        if not path.startswith("/"):
            raise InvalidContainerSpec(f"masked and read-only paths must be absolute: {path!r}")
    for volume in spec.volumes:
        parts = volume.path.split("/")
        if not volume.path.startswith("/") or "\x00" in volume.path or ".." in parts or volume.path == "/":
            raise InvalidContainerSpec(f"bad volume path {volume.path!r}")
        if not Path(volume.source).is_absolute():
            raise InvalidContainerSpec("a volume's source must be an absolute path")


def _checked_id(container_id: str) -> str:
    if not CONTAINER_ID_PATTERN.match(container_id):
        raise InvalidContainerSpec(f"bad container id {container_id!r}")
    return container_id


def _checked_lower_dirs(lower_dirs: Sequence[str]) -> list[str]:
    if not lower_dirs:
        raise InvalidContainerSpec("at least one lower dir is needed")
    checked = []
    for lower in lower_dirs:
        path = Path(lower)
        if not path.is_absolute() or OVERLAY_UNSAFE_CHARS.search(lower):
            raise InvalidContainerSpec(f"lower dir must be an absolute path without , : \\ : {lower!r}")
        if not path.is_dir():
            raise InvalidContainerSpec(f"lower dir does not exist: {lower}")
        checked.append(str(path))
    return checked


# --------------------------------------------------------------------------- user resolution


def resolve_user(rootfs: Path, user: str) -> ResolvedUser:
    """Resolve "uid[:gid]" or "name[:group]" against the image's /etc/passwd and /etc/group.

    The files are opened with the kernel confining every path lookup to `rootfs`, so a symlinked
    /etc/passwd in an image cannot make the host read its own files.
    """
    user_part, _, group_part = (user or "0").partition(":")
    passwd = _parse_colon_file(read_file_in_root(rootfs, "etc/passwd"))
    groups = _parse_colon_file(read_file_in_root(rootfs, "etc/group"))
    passwd_entry: list[str] | None = None
    if user_part.isdigit():
        uid = int(user_part)
        passwd_entry = next((entry for entry in passwd if len(entry) >= 4 and entry[2] == user_part), None)
    else:
        passwd_entry = next((entry for entry in passwd if len(entry) >= 4 and entry[0] == user_part), None)
        if passwd_entry is None or not passwd_entry[2].isdigit():
            raise InvalidContainerSpec(f"user {user_part!r} not found in the image's /etc/passwd")
        uid = int(passwd_entry[2])
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            group_entry = next(
                (entry for entry in groups if len(entry) >= 3 and entry[0] == group_part), None
            )
            if group_entry is None or not group_entry[2].isdigit():
                raise InvalidContainerSpec(f"group {group_part!r} not found in the image's /etc/group")
            gid = int(group_entry[2])
    elif passwd_entry is not None and passwd_entry[3].isdigit():
        gid = int(passwd_entry[3])
    else:
        gid = 0 if uid == 0 else uid
    additional: list[int] = []
    if passwd_entry is not None and not group_part:
        additional.append(gid)  # as initgroups() does at a login
        # Like Docker: supplementary groups listing the user by name, when no group was forced.
        for entry in groups:
            if len(entry) >= 4 and entry[2].isdigit() and passwd_entry[0] in entry[3].split(","):
                group_id = int(entry[2])
                if group_id not in additional:
                    additional.append(group_id)
    home = passwd_entry[5] if passwd_entry is not None and len(passwd_entry) >= 6 and passwd_entry[5] else "/"
    return ResolvedUser(uid=uid, gid=gid, additional_gids=tuple(additional), home=home)


def _parse_colon_file(text: str | None) -> list[list[str]]:
    if not text:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # the same number on x86-64 and aarch64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def read_file_in_root(root: Path, relative_path: str, max_bytes: int = IMAGE_FILE_MAX_BYTES) -> str | None:
    """Read a regular file of an image root with every lookup confined to `root` (openat2).

    Returns None if it does not exist or is not a regular file; reads at most `max_bytes`.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # O_PATH first: opening a device node or FIFO for reading could have side effects.
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        path_fd = _LIBC.syscall(
            SYS_OPENAT2, root_fd, relative_path.encode(), ctypes.byref(how), ctypes.sizeof(how)
        )
        if path_fd < 0:
            error_number = ctypes.get_errno()
            if error_number in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise OSError(error_number, os.strerror(error_number), relative_path)
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None
        # Re-open the very inode already resolved, for reading.
        with open(f"/proc/self/fd/{path_fd}", "rb") as file:
            return file.read(max_bytes).decode(errors="replace")
    finally:
        os.close(path_fd)


# --------------------------------------------------------------------------- mounts

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2
AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


# Where the runtime mounts something of its own (relative to the rootfs), as directories or files.
INIT_LAYER_DIRS = ("dev", "proc", "sys", "etc")
INIT_LAYER_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")


def _prepare_init_layer(directory: Path, lower_dirs: Sequence[str]) -> Path:
    """A layer holding the runtime's mount points, each with the attributes the image gives it (its
    topmost layer that has it), so that the merged view of a directory the image has is unchanged."""
    directory.mkdir(mode=0o755, exist_ok=True)
    made = set()
    for relative in INIT_LAYER_DIRS:
        found = _topmost_in_image(relative, lower_dirs)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            continue  # the image has a symlink or file there: never shadow it with a directory
        target = directory / relative
        target.mkdir(mode=0o755, exist_ok=True)
        if found is not None:
            os.chown(target, found.st_uid, found.st_gid)
            os.chmod(target, stat.S_IMODE(found.st_mode))
        made.add(relative)
    for relative in INIT_LAYER_FILES:
        target = directory / relative
        if relative.split("/")[0] in made and not target.exists():
            target.touch(mode=0o644)
    return directory


def _topmost_in_image(relative: str, lower_dirs: Sequence[str]) -> os.stat_result | None:
    for lower in lower_dirs:  # topmost first, as overlay reads them
        try:
            return os.lstat(Path(lower) / relative)
        except OSError:
            continue
    return None


def _mount_overlay(lower_dirs: Sequence[str], upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={':'.join(lower_dirs)},upperdir={upper},workdir={work}"
    if len(options.encode()) >= 4096:
        raise OciRuntimeError(
            f"overlay options exceed one page ({len(lower_dirs)} layers): shorten the layer paths"
        )
    result = _LIBC.mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode())
    if result != 0:
        error_number = ctypes.get_errno()
        raise OciRuntimeError(f"mount overlay on {target}: {os.strerror(error_number)}")


# The image is a fresh sparse file, whose unwritten blocks read as zeros: zeroing its journal
# (`lazy_journal_init=0`, mkfs' default) wrote 32-64 MiB per disk for nothing (33 MiB -> 0.7 MiB on the
# host for 1 GiB, 69 -> 4 MiB for 10 GiB, and a faster mkfs).
MKFS_EXT4 = (
    "mkfs.ext4", "-q", "-F", "-m", "0",
    "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
)  # fmt: skip


def _make_disk_image(image: Path, size_bytes: int) -> None:
    """A sparse ext4 image of ``size_bytes`` (built aside, renamed into place: a kill leaves no half disk).

    No reserved blocks: root in the container gets exactly the size, and its files take host space only
    as they are written.
    """
    partial = image.with_name(image.name + ".partial")
    with open(partial, "wb") as handle:
        handle.truncate(size_bytes)
    result = subprocess.run(
        [*MKFS_EXT4, str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OciRuntimeError(f"mkfs.ext4 {image}: {result.stderr.strip()}")
    partial.rename(image)


def _make_disk_image_unnamed(image: Path, size_bytes: int) -> bool:
    """`_make_disk_image` for a spare: formatted as an unnamed file (O_TMPFILE, given to mkfs as
    /proc/self/fd/N) and linked into place only when whole, so a killed process leaves nothing and a
    concurrent maker's image is never overwritten. False when one was linked there first."""
    fd = os.open(image.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
        result = subprocess.run(
            [*MKFS_EXT4, f"/proc/self/fd/{fd}"],
            capture_output=True,
            text=True,
            check=False,
            pass_fds=(fd,),
        )
        if result.returncode != 0:
            raise OciRuntimeError(f"mkfs.ext4 {image}: {result.stderr.strip()}")
        # linkat(AT_SYMLINK_FOLLOW) names the open file (os.link's plain link(2) would not follow).
        source = f"/proc/self/fd/{fd}".encode()
        if _LIBC.linkat(AT_FDCWD, source, AT_FDCWD, str(image).encode(), AT_SYMLINK_FOLLOW) != 0:
            error_number = ctypes.get_errno()
            if error_number == errno.EEXIST:
                return False
            raise OciRuntimeError(f"link {image}: {os.strerror(error_number)}")
        return True
    finally:
        os.close(fd)


def drop_spare_disks(state_dir: Path, keep_sizes: Iterable[int] = ()) -> list[int]:
    """Remove the disks formatted ahead under a runtime's `state_dir`, but those of `keep_sizes` (an
    agent's start keeps the sizes its placed containers have; a host that leaves keeps none). Each one
    is unlinked on its own: a create taking one, or a worker linking a new one in, meanwhile is safe.
    The sizes removed."""
    keep = {int(size) for size in keep_sizes}
    removed = []
    try:
        spares = list((state_dir / SPARE_DISKS_DIR).glob("*.img"))
    except OSError:
        return []
    for spare in spares:
        size = spare.name.removesuffix(".img")
        if size.isdigit() and int(size) in keep:
            continue
        with suppress(FileNotFoundError):
            spare.unlink()
            removed.append(int(size) if size.isdigit() else -1)
    return sorted(removed)


def _take_spare_disk(spare: Path, image: Path) -> bool:
    """Move a formatted spare into place as the container's disk (a rename: one taker wins)."""
    try:
        spare.rename(image)
    except FileNotFoundError:
        return False
    return True


# The kernel's loop device interface (linux/loop.h): a free device, configured from a file in one call.
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
MS_NOSUID, MS_NODEV, MS_NOATIME = 2, 4, 1024
LOOP_ATTEMPTS = 8  # another process may take the free device first: ask again


class _LoopInfo64(ctypes.Structure):
    _fields_ = (
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    )


class _LoopConfig(ctypes.Structure):
    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    )


def _loop_mount(image: Path, target: Path) -> None:
    """`mount -o loop` without its exec (~10 ms here): a free loop device configured on the image with
    autoclear (it detaches at its last close: after the unmount, or when this process dies before the
    mount), then mount(2). OSError when the kernel or /dev lacks any of it."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _attempt in range(LOOP_ATTEMPTS):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device_path = f"/dev/loop{number}"
                device = os.open(device_path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    config = _LoopConfig(fd=backing)
                    config.info.lo_flags = LO_FLAGS_AUTOCLEAR
                    config.info.lo_file_name = str(image).encode()[:63]
                    try:
                        fcntl.ioctl(device, LOOP_CONFIGURE, bytes(config))
                    except OSError as error:
                        if error.errno == errno.EBUSY:
                            continue  # taken by another process since it was free
                        raise
                    flags = MS_NODEV | MS_NOSUID | MS_NOATIME
                    if _LIBC.mount(device_path.encode(), str(target).encode(), b"ext4", flags, None) != 0:
                        error_number = ctypes.get_errno()
                        raise OSError(error_number, f"mount {device_path}: {os.strerror(error_number)}")
                    return
                finally:
                    os.close(device)  # the mount holds the device now (or autoclear detaches it)
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    finally:
        os.close(backing)


def _mount_disk_image(image: Path, target: Path) -> None:
    """Loop-mount the container's disk image, its loop device set to clear itself on its last close,
    so neither an unmount nor a process killed before the mount leaks a device. By the kernel's calls
    (`_loop_mount`); where they are refused, `mount -o loop` (which sets autoclear too). The container
    reaches this filesystem only through the overlay (the kernel's ext4), never as a block device."""
    try:
        _loop_mount(image, target)
        return
    except OSError as error:
        log.info("loop mount of %s by ioctl refused (%s): mount -o loop", image, error)
    result = subprocess.run(
        ["mount", "-t", "ext4", "-o", "loop,nodev,nosuid,noatime", str(image), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise OciRuntimeError(f"mount {image}: {result.stderr.strip()}")


def _remove_kept(kept: Path) -> None:
    """Remove a kept writable layer: a disk image, or an upper dir kept before disks had a size."""
    if kept.is_dir() and not kept.is_symlink():
        shutil.rmtree(kept)
    else:
        kept.unlink(missing_ok=True)


def _unmount(target: Path) -> None:
    if _LIBC.umount2(str(target).encode(), 0) == 0:
        return
    error_number = ctypes.get_errno()
    if error_number == errno.EINVAL:  # not a mount point (any more)
        return
    if error_number == errno.EBUSY and _LIBC.umount2(str(target).encode(), MNT_DETACH) == 0:
        return
    raise OciRuntimeError(f"umount {target}: {os.strerror(ctypes.get_errno() or error_number)}")


def _mount_points() -> list[Path]:
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split(" ")
            if len(fields) > 4:
                points.append(Path(_unescape_mountinfo(fields[4])))
    return points


def _is_mount_point(path: Path) -> bool:
    return path in _mount_points()


def _depth(path: Path) -> int:
    return len(path.parts)


def _check_traversable(directory: Path) -> None:
    # Every directory above a bundle must let an unprivileged host uid pass (others' x bit).
    for ancestor in (directory, *directory.parents):
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            raise OciRuntimeError(
                f"{ancestor} must be searchable by others (chmod o+x): a container's root is an "
                f"unprivileged host user and must reach its rootfs below {directory}"
            )


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _blkio_totals(directory: Path) -> tuple[int, int]:
    """Bytes read and written by a v1 blkio cgroup (the "Total"-less per-device Read/Write lines)."""
    read = write = 0
    text = _read_text(directory / "blkio.throttle.io_service_bytes_recursive") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return read, write


def _unescape_mountinfo(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


# --------------------------------------------------------------------------- cgroups


def cgroup_mode() -> CgroupMode:
    """Return how cgroups are mounted on this host: "v1", "v2" or "hybrid" (v1 + unified)."""
    return _cgroup_layout().mode


# The cgroup mounts do not change under a running agent; parsing mountinfo (which grows with every
# container's rootfs) on each call made reading one container's counters cost about 2 ms.
_LAYOUT_TTL_SECONDS = 60.0
_layout_cache: tuple[float, _CgroupLayout] | None = None


def _cgroup_layout() -> _CgroupLayout:
    global _layout_cache
    now = time.monotonic()
    if _layout_cache is None or now - _layout_cache[0] > _LAYOUT_TTL_SECONDS:
        _layout_cache = (now, _read_cgroup_layout())
    return _layout_cache[1]


def _read_cgroup_layout() -> _CgroupLayout:
    v1_mounts: dict[str, Path] = {}
    unified: Path | None = None
    root_is_v2 = False
    known_controllers = _kernel_cgroup_controllers()
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fields = before.split(" ")
            after_fields = after.split(" ")
            if len(fields) < 5 or len(after_fields) < 3:
                continue
            fs_type, mount_point = after_fields[0], Path(_unescape_mountinfo(fields[4]))
            if fs_type == "cgroup2":
                unified = mount_point
                root_is_v2 = root_is_v2 or mount_point == Path("/sys/fs/cgroup")
            elif fs_type == "cgroup":
                for option in after_fields[2].strip().split(","):
                    if option in known_controllers or option.startswith("name="):
                        v1_mounts[option] = mount_point
    if root_is_v2 or (unified is not None and not v1_mounts):
        return _CgroupLayout(mode="v2", unified_mount=unified)
    if unified is not None:
        return _CgroupLayout(mode="hybrid", v1_mounts=v1_mounts, unified_mount=unified)
    return _CgroupLayout(mode="v1", v1_mounts=v1_mounts)


def _kernel_cgroup_controllers() -> set[str]:
    controllers = set()
    with open("/proc/cgroups") as cgroups:
        for line in cgroups:
            if not line.startswith("#") and line.strip():
                controllers.add(line.split()[0])
    return controllers


def _read_key_values(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in (_read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        with suppress(ValueError):
            values[key] = int(value)
    return values


# --------------------------------------------------------------------------- small helpers


def parse_k8s_log(raw: bytes, streams: Sequence[str] = ("stdout", "stderr")) -> bytes:
    """Turn conmon's k8s-file log ("<time> <stream> <F|P> <text>" lines) back into raw output."""
    wanted = {stream.encode() for stream in streams}
    output = bytearray()
    for line in raw.split(b"\n"):
        parts = line.split(b" ", 3)
        if len(parts) < 3 or parts[1] not in wanted:
            continue
        output += parts[3] if len(parts) == 4 else b""
        if parts[2] == b"F":
            output += b"\n"
    return bytes(output)


def _read_sync_message(read_fd: int, timeout: float) -> dict[str, Any] | None:
    buffer = b""
    deadline = time.monotonic() + timeout
    waiting = select.poll()  # not select(): a busy agent's (or portal's) fds pass FD_SETSIZE (1024)
    waiting.register(read_fd, select.POLLIN)
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not waiting.poll(remaining * 1000):
            return None
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buffer += chunk
    first_line = buffer.split(b"\n", 1)[0].strip()
    if not first_line:
        return None
    try:
        message: dict[str, Any] = json.loads(first_line)
    except ValueError:
        return {"data": -1, "message": first_line.decode(errors="replace")}
    return message


def _runtime_error_text(stderr: str) -> str:
    # runc logs logrus lines (time=... level=error msg="..."); keep just the messages.
    messages = re.findall(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    return "; ".join(messages) if messages else stderr.strip()


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            # A zombie has exited; its parent (init here) just has not reaped it yet.
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _timestamp(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def _parse_rfc3339(runtime_state: dict[str, Any]) -> datetime | None:
    created = runtime_state.get("created")
    if not isinstance(created, str):
        return None
    # runc prints nanoseconds; Python parses at most microseconds.
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", created).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(trimmed)
    except ValueError:
        return None
