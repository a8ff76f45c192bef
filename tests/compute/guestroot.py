"""Build tiny busybox root disks (EROFS and ext4) for the micro-VM tests and benchmark.

The disks are what the layer store builds for an image chain: a read-only filesystem image of the
image's root directory, made without mounting anything (`mkfs.erofs DIR` / `mkfs.ext4 -d DIR`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

BUSYBOX_BINARY = Path("/bin/busybox")
DiskFormat = Literal["erofs", "ext4"]

# The applets the tests call; each becomes a symlink to /bin/busybox.
BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh",
    "echo",
    "cat",
    "sleep",
    "uname",
    "env",
    "id",
    "pwd",
    "ls",
    "true",
    "false",
    "hostname",
    "ip",
    "ps",
    "kill",
    "touch",
    "mkdir",
    "rm",
    "grep",
    "head",
    "printf",
    "stat",
    "mount",
    "seq",
    "tr",
    "dd",
    "sync",
    "wc",
    "mknod",
    "ln",
    "mv",
    "cut",
    "sort",
)

ETC_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
)
ETC_GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\n"


def build_busybox_root(root: Path) -> Path:
    """Create a minimal image root directory at `root` (busybox, applet links, passwd, group)."""
    directories = ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "srv/data", "var", "run")
    for directory in directories:
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX_BINARY, root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text(ETC_PASSWD)
    (root / "etc/group").write_text(ETC_GROUP)
    (root / "etc/image-release").write_text("bulkhead test image\n")
    (root / "srv/data/old.txt").write_text("from the image\n")
    (root / "srv/data/doomed.txt").write_text("the workload deletes me\n")
    # /srv/work belongs to the unprivileged app user so a workload running as 1000:1000 can write there.
    (root / "srv/work").mkdir(exist_ok=True)
    os.chown(root / "srv/work", 1000, 1000)
    os.chown(root / "home/app", 1000, 1000)
    return root


def build_root_disk(root: Path, disk: Path, disk_format: DiskFormat) -> Path:
    """Write the directory `root` as a read-only root disk image `disk` in `disk_format`; returns `disk`."""
    disk.unlink(missing_ok=True)
    if disk_format == "erofs":
        command = ["mkfs.erofs", "--quiet", str(disk), str(root)]
    else:
        command = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-d",
            str(root),
            "-L",
            "bhtroot",
            "-O",
            "^has_journal",
            str(disk),
            "32M",
        ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    disk.chmod(0o644)
    return disk
