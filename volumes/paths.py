"""Where a volume may be mounted inside a workload: pure logic, shared by the services and the document."""

from __future__ import annotations

import posixpath
from typing import Final

# Paths a volume may not cover: the runtime's own mounts and the system directories every image needs.
RESERVED_PATHS: Final = (
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/bin",
    "/sbin",
    "/usr",
    "/lib",
    "/lib64",
    "/run",
)
MAX_PATH: Final = 255


def mount_path_problem(path: object) -> str | None:
    """What is wrong with ``path`` as a volume's mount point, or None when it is usable as it is."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH:
        return "A volume's path must be an absolute path of at most 255 characters."
    if any(ch in path for ch in " \\,:") or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return "A volume's path cannot contain control characters, commas, colons or backslashes."
    normal = posixpath.normpath(path)
    if normal != path or ".." in normal.split("/"):
        return "A volume's path must be normalised (no '..', '.', '//' or trailing '/')."
    if normal in RESERVED_PATHS or normal.startswith(("/proc/", "/sys/", "/dev/")):
        return f"A volume cannot be mounted at {normal}."
    return None
