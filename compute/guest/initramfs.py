"""Build the guest's initramfs: a cpio (newc) archive of busybox, the kernel modules and our init.

The archive is written by this module (no external cpio) so that it is reproducible: fixed
timestamps, owners and inode numbers, entries in a fixed order. The init script is copied verbatim
from compute/guest/init.sh; nothing in the archive depends on a workload.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")

Compression = Literal["none", "gzip"]


class ByteSink(Protocol):
    """Anything bytes can be written to (a file, a GzipFile)."""

    def write(self, data: bytes, /) -> int: ...


# Directories of the initramfs root: mount points of the init, and the /skel lower layer that
# provides the mount points an image may lack (so that mounting them never touches the upper dir).
_DIRECTORIES: tuple[str, ...] = (
    "bin",
    "dev",
    "etc",
    "etc/acpi",
    "etc/acpi/PWRF",
    "lib",
    "lib/modules",
    "mnt",
    "mnt/ro",
    "mnt/rw",
    "newroot",
    "proc",
    "run",
    "sys",
    "skel",
    "skel/dev",
    "skel/etc",
    "skel/proc",
    "skel/sys",
)

# The ACPI power button (event PWRF/00000080 in busybox acpid) asks PID 1 for a graceful stop.
_POWER_BUTTON_HANDLER = b"#!/bin/sh\nkill -TERM 1\n"


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive."""

    name: str
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def initramfs_entries(
    modules: Iterable[Path], *, busybox: Path = BUSYBOX, init_script: Path = INIT_SCRIPT
) -> list[CpioEntry]:
    """The members of the guest initramfs, in archive order."""
    module_paths = list(modules)
    entries = [CpioEntry(".", stat.S_IFDIR | 0o755)]
    entries += [CpioEntry(name, stat.S_IFDIR | 0o755) for name in _DIRECTORIES]
    entries.append(CpioEntry("tmp", stat.S_IFDIR | 0o1777))
    # The kernel opens /dev/console for PID 1 before the init mounts devtmpfs.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    # Every applet gets its link: before /proc is mounted busybox cannot re-exec itself by applet name.
    for applet in busybox_applets(busybox):
        entries.append(CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, init_script.read_bytes()))
    entries.append(CpioEntry("etc/acpi/PWRF/00000080", stat.S_IFREG | 0o755, _POWER_BUTTON_HANDLER))
    entries.append(CpioEntry("skel/etc/resolv.conf", stat.S_IFREG | 0o644))
    load_order = "".join(f"{path.name.removesuffix('.ko')}\n" for path in module_paths)
    entries.append(CpioEntry("lib/modules/load-order", stat.S_IFREG | 0o644, load_order.encode()))
    for path in module_paths:
        entries.append(CpioEntry(f"lib/modules/{path.name}", stat.S_IFREG | 0o644, path.read_bytes()))
    return entries


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """The applet names compiled into `busybox` (from `busybox --list`), without `busybox` itself."""
    result = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30)
    return sorted({name for name in result.stdout.split() if name and "/" not in name and name != "busybox"})


def write_cpio(entries: Iterable[CpioEntry], out: ByteSink) -> None:
    """Write `entries` as a cpio newc archive (with the trailer) to `out`."""
    inode = 1
    for entry in entries:
        _write_member(out, entry, inode)
        inode += 1
    _write_member(out, CpioEntry("TRAILER!!!", 0), 0)


def _write_member(out: ByteSink, entry: CpioEntry, inode: int) -> None:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        inode,
        entry.mode,
        0,
        0,
        nlink,
        0,
        len(entry.data),
        0,
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,
    )
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header)
    out.write(name)
    out.write(b"\0" * _padding(len(header) + len(name)))
    out.write(entry.data)
    out.write(b"\0" * _padding(len(entry.data)))


def _padding(length: int) -> int:
    return (4 - length % 4) % 4


def build_initramfs(
    target: Path,
    modules: Iterable[Path],
    *,
    compression: Compression = "none",
    busybox: Path = BUSYBOX,
    init_script: Path = INIT_SCRIPT,
) -> Path:
    """Write the guest initramfs to `target` atomically (temp file + rename) and return `target`."""
    entries = initramfs_entries(modules, busybox=busybox, init_script=init_script)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as raw:
            if compression == "gzip":
                # mtime=0 keeps the archive byte-for-byte reproducible.
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as compressed:
                    write_cpio(entries, compressed)
            else:
                write_cpio(entries, raw)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def initramfs_inputs_digest(
    modules: Iterable[Path],
    *,
    compression: Compression,
    busybox: Path = BUSYBOX,
    init_script: Path = INIT_SCRIPT,
) -> str:
    """A digest of everything the initramfs is built from, to skip rebuilding an identical one."""
    digest = hashlib.sha256()
    digest.update(compression.encode() + b"\0")
    for path in (busybox, init_script, Path(__file__), *modules):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
