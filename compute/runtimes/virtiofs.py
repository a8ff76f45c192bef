"""virtiofsd for micro-VM volumes: one daemon per attached volume, started by the host for each boot.

QEMU connects to the daemon's vhost-user socket (libvirt `<filesystem>` with `<source socket=…>`): the
agent starts it itself, in the host's mount namespace where the volume pool is mounted (make run's
libvirtd runs in a private mount namespace that never sees mounts made after it started). The daemon
serves exactly one connection and exits when QEMU goes, so a stopped VM leaves no daemon behind.

Sandbox: `sandbox=namespace` (Debian's C virtiofsd: its own mount, pid and net namespaces, pivot_root
into the volume, seccomp), so a guest's requests cannot reach outside its volume. Read-only volumes
are served from a read-only bind of the volume (the C virtiofsd has no read-only option), detached
from the host's namespace once the daemon holds its own copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from compute.runtimes.userns import attach_volume

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
MNT_DETACH = 2


class VirtiofsError(RuntimeError):
    pass


def _pid_file(socket: Path) -> Path:
    return socket.with_name(socket.name + ".pid")


def _staging(socket: Path) -> Path:
    return socket.with_name(socket.name + ".ro")


def _is_virtiofsd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == VIRTIOFSD.name
    except OSError:
        return False


def stop(socket: Path) -> None:
    """End the daemon of `socket` (if it still runs) and remove its files and staging mount."""
    pid_file = _pid_file(socket)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _is_virtiofsd(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _is_virtiofsd(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    pid_file.unlink(missing_ok=True)
    socket.unlink(missing_ok=True)
    _unmount_staging(socket)


def _unmount_staging(socket: Path) -> None:
    staging = _staging(socket)
    if os.path.ismount(staging):
        subprocess.run(["umount", "-l", str(staging)], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        staging.rmdir()


def start(source: Path, socket: Path, *, read_only: bool, owner: tuple[int, int], log: Path) -> int:
    """Start virtiofsd serving `source` on `socket` (owned by QEMU's account); returns its pid."""
    if not VIRTIOFSD.is_file():
        raise VirtiofsError(f"{VIRTIOFSD} is missing (apt-get install qemu-system-x86)")
    stop(socket)
    served = source
    if read_only:
        served = _staging(socket)
        attach_volume(source, served, None, read_only=True)
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            [
                str(VIRTIOFSD),
                f"--socket-path={socket}",
                "-o",
                f"source={served}",
                "-o",
                "sandbox=namespace",
                "-o",
                "cache=auto",
                "-o",
                "no_posix_lock",
                "--thread-pool-size=4",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # outlives the agent's worker, like the VM it serves
        )
    _pid_file(socket).write_text(str(process.pid))
    deadline = time.monotonic() + 10
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(socket)
            raise VirtiofsError(f"virtiofsd did not start for {socket.name} (see {log})")
        time.sleep(0.005)
    os.chown(socket, *owner)
    os.chmod(socket, 0o600)
    return process.pid


def release_staging_when_sandboxed(socket: Path, timeout: float = 5.0) -> None:
    """After QEMU connected: once the daemon is in its own mount namespace (it has its copy of the
    read-only bind), detach the bind from the host's namespace, so nothing stays mounted there."""
    staging = _staging(socket)
    if not os.path.ismount(staging):
        return
    try:
        pid = int(_pid_file(socket).read_text())
    except (OSError, ValueError):
        return
    own = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != own:
                # The namespace is made before the daemon binds the source: give it the moment it takes.
                time.sleep(0.05)
                _unmount_staging(socket)
                return
        except OSError:
            return
        time.sleep(0.01)
