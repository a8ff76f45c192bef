"""The first process of a separate test host, run as `unshare -m --propagation private python -m THIS`.

In its own mount namespace it makes the machine a host would be: the portal's data directory (this
checkout's var/) is covered by an empty tmpfs, so nothing of the portal's (secret key, Redis password,
layer store, database files) is readable; back into it go only what the host machine's own `make setup`
would have left there: the guest it built (read-only) and the set-up stamp. Django and the portal's code
are hidden too (`hide_the_portals_code`): a host runs only the host package, and this machine would
show it if any of its processes needed more. Then it execs the command it was given (the
`make agent PORTAL=… JOIN_TOKEN=…` the operator copied), never through a shell.

Usage: python -m tests.compute.separate_host_launcher --portal-data DIR --staging DIR -- ARGV...
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def become_a_host(portal_data: Path, staging: Path) -> None:
    guest = portal_data / "guest"
    stamp = portal_data / ".system-packages"
    stamp_times = (stamp.stat().st_atime, stamp.stat().st_mtime) if stamp.exists() else None
    # Hold the guest through a mount point outside the directory about to be covered.
    staging.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(guest), str(staging))
    mount("-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", str(portal_data))
    (portal_data / "guest").mkdir()
    mount("--move", str(staging), str(portal_data / "guest"))
    mount("-o", "remount,bind,ro", str(portal_data / "guest"))
    if stamp_times is not None:
        stamp.touch()
        os.utime(stamp, stamp_times)


ROOT = Path(__file__).resolve().parents[2]
# Installed packages only the portal runs: a tmpfs over each (nothing of them importable).
PORTAL_LIBRARIES = ("django", "rest_framework", "channels", "django_filters", "daphne")
# The portal's apps and project: covered, except the Django-free leaves the host package imports
# (tests/compute/test_host_boundary.py's allow-list: `portal.errors`, `portal.failpoints`).
PORTAL_APPS = ("volumes", "backups", "tenants", "frontend")
PORTAL_LEAVES = ("__init__.py", "errors.py", "failpoints.py")


def hide_the_portals_code() -> None:
    """A tmpfs over Django (and the other portal-only libraries: importing them fails as if absent), an
    empty one over every portal app but the host's own package, and over portal/ but its two Django-free
    leaves; manage.py becomes empty."""
    for library in PORTAL_LIBRARIES:
        spec = importlib.util.find_spec(library)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                # An empty directory would import as a namespace package: the library's place says it
                # is not installed, as `import django` on a machine without it does (ImportError).
                mount("-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", location)
                absent = f"raise ImportError('{library} is not on this host')\n"
                Path(location, "__init__.py").write_text(absent)
                mount("-o", "remount,ro", location)
    for app in PORTAL_APPS:
        mount("-t", "tmpfs", "-o", "mode=0755,size=1m,ro", "tmpfs", str(ROOT / app))
    leaves = {name: (ROOT / "portal" / name).read_bytes() for name in PORTAL_LEAVES}
    mount("-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", str(ROOT / "portal"))
    for name, content in leaves.items():
        (ROOT / "portal" / name).write_bytes(content)
    mount("-o", "remount,ro", str(ROOT / "portal"))
    mount("--bind", "/dev/null", str(ROOT / "manage.py"))
    # The shared venv's editable install maps this project's packages to whichever checkout installed it
    # last: a host's venv knows only its own checkout (its working directory here), nothing elsewhere.
    for editable in Path(sysconfig.get_paths()["purelib"]).glob("__editable__*.pth"):
        mount("--bind", "/dev/null", str(editable))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--portal-data", required=True, type=Path)
    parser.add_argument("--staging", required=True, type=Path)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    become_a_host(args.portal_data, args.staging)
    hide_the_portals_code()
    executable = shutil.which(argv[0]) or argv[0]
    os.execv(executable, argv)


if __name__ == "__main__":
    main()
