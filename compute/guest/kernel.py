"""Fetch the micro-VM guest kernel from Debian's packages and keep what the initramfs needs.

The guest kernel is Debian's `linux-image-cloud-amd64` (a meta package that depends on the versioned
`linux-image-<ver>-cloud-amd64`). We download it with `apt-get download`, unpack it with `dpkg-deb -x`
and keep only the compressed kernel image plus the handful of modules the guest's init loads, in an
order derived from the modules' own `depends=` records (the package ships no modules.dep).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"

# The modules the guest init loads (their dependencies are added automatically):
# virtio transport for PCI (q35) and MMIO (microvm), disks, network, the root/overlay filesystems,
# and the ACPI power button + evdev so that a graceful shutdown request reaches the init.
WANTED_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "overlay",
    "erofs",
    "button",
    "evdev",
    "virtiofs",  # volumes (issue 17); pulls in fuse
)

MANIFEST_NAME = "manifest.json"
_DEPENDS_RE = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")
_VERSIONED_RE = re.compile(r"^linux-image-(\d[\w.+~-]*-cloud-amd64)$")


class KernelFetchError(RuntimeError):
    """The guest kernel could not be downloaded or unpacked."""


@dataclass(frozen=True)
class GuestKernel:
    """A guest kernel kept under a directory: the image, its modules in load order, and its version."""

    version: str  # e.g. "6.1.0-56-cloud-amd64" (what `uname -r` prints in the guest)
    package: str  # e.g. "linux-image-6.1.0-56-cloud-amd64"
    package_version: str  # Debian version of that package, e.g. "6.1.192-2"
    vmlinuz: Path
    modules: tuple[Path, ...]  # .ko files in dependency order (load first to last)

    def to_manifest(self, base: Path) -> dict[str, object]:
        """The JSON-serialisable manifest of this kernel with paths relative to `base`."""
        return {
            "version": self.version,
            "package": self.package,
            "package_version": self.package_version,
            "vmlinuz": str(self.vmlinuz.relative_to(base)),
            "modules": [str(module.relative_to(base)) for module in self.modules],
        }


def load_kernel(guest_dir: Path) -> GuestKernel | None:
    """Read the kernel recorded under `guest_dir`, or None when it is missing or incomplete."""
    manifest_path = guest_dir / "kernel" / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    kernel = GuestKernel(
        version=str(manifest["version"]),
        package=str(manifest["package"]),
        package_version=str(manifest["package_version"]),
        vmlinuz=guest_dir / manifest["vmlinuz"],
        modules=tuple(guest_dir / module for module in manifest["modules"]),
    )
    if not kernel.vmlinuz.is_file() or not all(module.is_file() for module in kernel.modules):
        return None
    kept = {_module_name(module.name) for module in kernel.modules}
    if not all(_module_name(name) in kept for name in WANTED_MODULES):
        return None  # a module wanted since it was fetched: fetch again
    return kernel


def ensure_kernel(guest_dir: Path, *, meta_package: str = META_PACKAGE) -> GuestKernel:
    """Return the guest kernel under `guest_dir`, downloading and unpacking it only when missing."""
    existing = load_kernel(guest_dir)
    if existing is not None:
        return existing
    return fetch_kernel(guest_dir, meta_package=meta_package)


def fetch_kernel(guest_dir: Path, *, meta_package: str = META_PACKAGE) -> GuestKernel:
    """Download the newest `meta_package` kernel and keep vmlinuz + the needed modules under guest_dir."""
    package = _versioned_package(meta_package)
    kernel_dir = guest_dir / "kernel"
    with tempfile.TemporaryDirectory(prefix="bh-kernel-") as tmp:
        tmp_path = Path(tmp)
        # apt drops privileges to _apt for downloads; a root-only temp dir would only cause a warning.
        tmp_path.chmod(0o755)
        _run(["apt-get", "download", "-q", package], cwd=tmp_path)
        debs = sorted(tmp_path.glob("*.deb"))
        if len(debs) != 1:
            raise KernelFetchError(f"expected one .deb for {package}, found {[d.name for d in debs]}")
        package_version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).strip()
        unpacked = tmp_path / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        version = package.removeprefix("linux-image-")
        vmlinuz_src = unpacked / "boot" / f"vmlinuz-{version}"
        modules_root = unpacked / "lib" / "modules" / version
        if not vmlinuz_src.is_file() or not modules_root.is_dir():
            raise KernelFetchError(f"{debs[0].name} has no vmlinuz-{version} or modules")
        ordered = module_load_order(modules_root, WANTED_MODULES)

        staging = Path(tempfile.mkdtemp(prefix=".kernel-", dir=guest_dir))
        try:
            # QEMU runs as an unprivileged user and must read the kernel.
            staging.chmod(0o755)
            (staging / "modules").mkdir()
            shutil.copy2(vmlinuz_src, staging / "vmlinuz")
            kept = []
            for source in ordered:
                target = staging / "modules" / source.name
                shutil.copy2(source, target)
                kept.append(kernel_dir / "modules" / source.name)
            kernel = GuestKernel(
                version=version,
                package=package,
                package_version=package_version,
                vmlinuz=kernel_dir / "vmlinuz",
                modules=tuple(kept),
            )
            (staging / MANIFEST_NAME).write_text(json.dumps(kernel.to_manifest(guest_dir), indent=2) + "\n")
            # Swap the finished directory in as a whole so that a reader never sees half a kernel.
            if kernel_dir.exists():
                shutil.rmtree(kernel_dir)
            staging.rename(kernel_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return kernel


def module_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` plus their dependencies, each after everything it depends on."""
    index: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko"):
        index[_module_name(path.name)] = path
    ordered: list[Path] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise KernelFetchError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise KernelFetchError(f"module {name} is not in {modules_root}")
        for dependency in module_dependencies(path):
            visit(dependency, (*chain, name))
        done.add(name)
        ordered.append(path)

    for name in wanted:
        visit(_module_name(name), ())
    return ordered


def module_dependencies(ko_path: Path) -> list[str]:
    """The module names listed in the `depends=` record of a .ko file's modinfo section."""
    match = _DEPENDS_RE.search(ko_path.read_bytes())
    if match is None or not match.group(1):
        return []
    return [_module_name(name) for name in match.group(1).decode().split(",") if name]


def _module_name(name: str) -> str:
    # Kernel module names treat '-' and '_' alike; the file names use either.
    return name.removesuffix(".ko").replace("-", "_")


def _versioned_package(meta_package: str) -> str:
    output = _run(["apt-cache", "depends", "--important", meta_package])
    for line in output.splitlines():
        field, _, value = line.strip().partition(":")
        if field == "Depends" and _VERSIONED_RE.match(value.strip()):
            return value.strip()
    raise KernelFetchError(f"{meta_package} does not depend on a versioned linux-image package")


def _run(args: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
        raise KernelFetchError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout
