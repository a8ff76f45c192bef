"""Start virtlogd + libvirtd on a host without systemd, and probe whether KVM really works.

On our build machines /dev/kvm exists but a KVM guest hangs forever, and libvirtd re-probes QEMU
for about a minute on every domain start while /dev/kvm is visible. So libvirtd is started in a
private mount namespace with /dev/kvm masked (bind-mounted /dev/null) whenever the probe finds that
KVM does not work; on a host with working KVM it is started plainly and domains use type 'kvm'.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LIBVIRT_URI = "qemu:///system"
LIBVIRTD_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
KVM_DEVICE = Path("/dev/kvm")
HOST_LOCK = Path("/run/bulkhead/libvirtd.lock")
KVM_PROBE_CACHE = Path("/run/bulkhead/kvm-probe.json")

# A 512-byte boot sector: `mov al, 1; out 0xf4, al; cli; hlt; jmp $-2`. With QEMU's isa-debug-exit
# device on port 0xf4 the emulator exits with status (1 << 1) | 1 = 3 as soon as the guest runs it.
_PROBE_CODE = bytes((0xB0, 0x01, 0xE6, 0xF4, 0xFA, 0xF4, 0xEB, 0xFD))
_PROBE_BOOT_SECTOR = _PROBE_CODE + b"\0" * (510 - len(_PROBE_CODE)) + b"\x55\xaa"
_PROBE_EXIT_STATUS = 3
_PROBE_INIT_LINE = b"BULKHEAD-INIT"

# The only shell text in this module: a constant that covers /dev/kvm with "$1", then execs libvirtd
# ("$0"). "$1" is a null device node (1:3) only root may open. libvirt re-validates its QEMU capability
# cache on every define against whether /dev/kvm is accessible to the QEMU user (libvirt-qemu): the
# /dev/null of before was (0666), so each define re-probed QEMU for 25-35 s; a root-only node is not,
# which matches what the (KVM-less) probe found, and the cache stays valid. It must stay a character
# device: libvirt moves /dev's mounts into each QEMU's private /dev, and cannot move a regular file.
_MASKED_LIBVIRTD_SCRIPT = 'mount --bind "$1" /dev/kvm && exec "$0" -d'
KVM_MASK = Path("/run/bulkhead/kvm-mask")

_kvm_probe_result: bool | None = None


class LibvirtdError(RuntimeError):
    """virtlogd or libvirtd could not be started."""


def kvm_works(timeout: float = 5.0, *, kernel: Path | None = None, initrd: Path | None = None) -> bool:
    """Whether guests really run under KVM here, by booting with -accel kvm; False after `timeout`.

    Two boots: a one-instruction boot sector (fails fast where KVM is absent or refuses), then the
    Bulkhead guest kernel up to its init's first line (a real-mode boot alone can succeed on a host
    where a Linux guest then hangs forever). `kernel`/`initrd` default to the built guest.
    """
    if not KVM_DEVICE.exists() or not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return False
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="bh-kvmprobe-") as tmp:
        boot_image = Path(tmp) / "boot.img"
        boot_image.write_bytes(_PROBE_BOOT_SECTOR)
        args = [
            qemu,
            "-accel",
            "kvm",
            "-machine",
            "pc",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-m",
            "16",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-drive",
            f"file={boot_image},format=raw,if=ide,snapshot=on",
        ]
        try:
            result = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False
    if result.returncode != _PROBE_EXIT_STATUS:
        return False
    if kernel is None or initrd is None:
        from compute.guest.build import ensure_guest

        guest = ensure_guest()
        kernel, initrd = guest.kernel, guest.initrd
    return _boots_linux_under_kvm(qemu, kernel, initrd, deadline)


def _boots_linux_under_kvm(qemu: str, kernel: Path, initrd: Path, deadline: float) -> bool:
    args = [
        qemu,
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-m",
        "256",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 quiet loglevel=1 panic=-1",
    ]
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    seen = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while _PROBE_INIT_LINE not in seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return False
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    return False
                seen = seen[-4096:] + chunk
        return True
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def kvm_works_cached(timeout: float = 5.0) -> bool:
    """`kvm_works`, probed once per host boot (the answer cannot change before a reboot).

    The answer is kept in memory and in /run (tmpfs, keyed by the kernel's boot id) so that every
    agent or test process does not pay for the probe's boot again.
    """
    global _kvm_probe_result
    if _kvm_probe_result is not None:
        return _kvm_probe_result
    boot_id = _boot_id()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(KVM_PROBE_CACHE.read_text())
        if cached["boot_id"] == boot_id and isinstance(cached["kvm_works"], bool):
            _kvm_probe_result = cached["kvm_works"]
            return _kvm_probe_result
    _kvm_probe_result = kvm_works(timeout)
    with contextlib.suppress(OSError):
        KVM_PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        partial = KVM_PROBE_CACHE.with_suffix(".partial")
        partial.write_text(json.dumps({"boot_id": boot_id, "kvm_works": _kvm_probe_result}))
        partial.replace(KVM_PROBE_CACHE)
    return _kvm_probe_result


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def libvirtd_answers(uri: str = LIBVIRT_URI) -> bool:
    """Whether a libvirtd is listening and answers a connection on `uri`."""
    if not LIBVIRTD_SOCKET.exists():
        return False
    import libvirt

    try:
        connection = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        connection.getLibVersion()
    except libvirt.libvirtError:
        return False
    finally:
        connection.close()
    return True


def wants_kvm_mask(device: Path, kvm_works: Callable[[], bool]) -> bool:
    """Whether libvirtd must not see /dev/kvm: only where the device exists and KVM does not work.
    Without the device (no KVM at all) libvirt already knows there is none, and nothing is probed; with
    working KVM, domains use it (type 'kvm')."""
    return device.exists() and not kvm_works()


def ensure_libvirtd(*, mask_kvm: bool | None = None, timeout: float = 30.0) -> None:
    """Start virtlogd and libvirtd unless they already answer; idempotent and safe to call often.

    `mask_kvm`: hide /dev/kvm from libvirtd; by default only when the KVM probe says it does not work.
    A running libvirtd that sees a /dev/kvm which should be masked is restarted masked (running
    domains survive a libvirtd restart): otherwise every domain start costs a minute of re-probing.
    """
    with _host_lock():
        if not _socket_answers(VIRTLOGD_SOCKET):
            _spawn_daemon(["virtlogd", "-d"])
            _wait_until(lambda: _socket_answers(VIRTLOGD_SOCKET), timeout, "virtlogd did not come up")
        running_pid = _libvirtd_pid() if libvirtd_answers() else None
        if running_pid is not None and (mask_kvm is False or not _sees_kvm_device(running_pid)):
            return
        if mask_kvm is None:
            mask_kvm = wants_kvm_mask(KVM_DEVICE, kvm_works_cached)
        if running_pid is not None:
            if not mask_kvm:
                return
            _stop_libvirtd(running_pid, timeout)
        libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if mask_kvm:
            _make_kvm_mask()
            _spawn_daemon(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    _MASKED_LIBVIRTD_SCRIPT,
                    libvirtd,
                    str(KVM_MASK),
                ]
            )
        else:
            _spawn_daemon([libvirtd, "-d"])
        _wait_until(libvirtd_answers, timeout, "libvirtd did not come up")


def libvirtd_sees_kvm() -> bool | None:
    """Whether the running libvirtd sees the real /dev/kvm (None when no libvirtd runs)."""
    pid = _libvirtd_pid()
    return None if pid is None else _sees_kvm_device(pid)


def _libvirtd_pid() -> int | None:
    try:
        pid = int(LIBVIRTD_PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _make_kvm_mask() -> None:
    KVM_MASK.parent.mkdir(parents=True, exist_ok=True)
    try:
        found = os.stat(KVM_MASK)
    except FileNotFoundError:
        found = None
    if found is None or not stat.S_ISCHR(found.st_mode) or found.st_rdev != os.makedev(1, 3):
        KVM_MASK.unlink(missing_ok=True)
        os.mknod(KVM_MASK, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.chown(KVM_MASK, 0, 0)
    KVM_MASK.chmod(0o600)


def _sees_kvm_device(pid: int) -> bool:
    """Whether the daemon sees a /dev/kvm that counts: the real one, or the world-accessible /dev/null
    mask of before (which cost a capability re-probe on every define). Masked, it is a root-only null
    node. /proc/<pid>/root is the daemon's own mount namespace."""
    try:
        device = os.stat(f"/proc/{pid}/root/dev/kvm")
    except OSError:
        return False
    if not stat.S_ISCHR(device.st_mode):
        return False
    return device.st_rdev == os.makedev(10, 232) or bool(device.st_mode & 0o066)


def _stop_libvirtd(pid: int, timeout: float) -> None:
    os.kill(pid, signal.SIGTERM)
    _wait_until(
        lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), timeout, "libvirtd did not stop"
    )


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    # Several processes (the stack, test sessions) may ensure the daemons at once: one at a time.
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with HOST_LOCK.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def domain_type_for_host(override: str | None = None) -> str:
    """The libvirt domain type for this host: 'kvm' when KVM really works, else 'qemu' (TCG)."""
    if override in ("kvm", "qemu"):
        return override
    return "kvm" if kvm_works_cached() else "qemu"


def _spawn_daemon(args: list[str]) -> None:
    # The daemons fork into the background themselves (-d); we only wait for the parent to return.
    # Their output goes to a file, not a pipe: a daemon holding a pipe open would block us forever.
    with tempfile.TemporaryFile() as errors:
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, timeout=60, check=False
        )
        errors.seek(0)
        message = errors.read().decode(errors="replace").strip()
    if result.returncode != 0:
        raise LibvirtdError(f"{args[0]} failed ({result.returncode}): {message}")


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise LibvirtdError(message)
