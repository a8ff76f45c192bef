"""Build tiny busybox-static root directories for the container runtime tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

BUSYBOX_BINARY = Path("/bin/busybox")

# The applets the tests call; each becomes a symlink to /bin/busybox.
BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh",
    "ash",
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
    "wc",
    "test",
    "[",
    "printf",
    "stat",
    "mount",
    "readlink",
    "dd",
    "whoami",
    "seq",
    "tr",
    "unshare",
)

ETC_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
)
ETC_GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nstaff:x:50:app\n"


def build_busybox_rootfs(root: Path) -> Path:
    """Create a minimal image root at `root`: /bin/busybox, applet symlinks, /etc/passwd and /etc/group.

    Returns `root`. The mount points a runtime needs (/proc, /sys, /dev, /etc/hosts...) are created
    here too, so that a container's upper dir only holds what the container itself wrote.
    """
    busybox = _busybox_path()
    for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "var", "run"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "home/app").chmod(0o755)
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text(ETC_PASSWD)
    (root / "etc/group").write_text(ETC_GROUP)
    for mount_target in ("hosts", "resolv.conf", "hostname"):
        (root / "etc" / mount_target).touch()
    return root


def build_layer_on_top(root: Path, files: dict[str, str]) -> Path:
    """Create an image layer directory at `root` holding `files` (path inside the image -> text)."""
    for relative_path, text in files.items():
        target = root / relative_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


def _busybox_path() -> Path:
    if BUSYBOX_BINARY.exists():
        return BUSYBOX_BINARY.resolve()
    found = shutil.which("busybox")
    if found is None:
        raise FileNotFoundError("busybox-static is not installed (apt-get install busybox-static)")
    return Path(found).resolve()
