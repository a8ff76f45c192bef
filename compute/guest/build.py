"""Build (or confirm) the micro-VM guest: `python -m compute.guest.build [--out DIR]`.

Idempotent: the kernel is downloaded only when missing, the initramfs is rebuilt only when one of
its inputs (busybox, init.sh, modules, compression) changed. Prints the guest manifest as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from compute.guest.initramfs import Compression, build_initramfs, initramfs_inputs_digest
from compute.guest.kernel import GuestKernel, ensure_kernel

DEFAULT_GUEST_DIR = Path(__file__).resolve().parents[2] / "var" / "guest"
MANIFEST_NAME = "manifest.json"
# Measured (bench/README-microvm.md): gzip boots as fast as or slightly faster than the uncompressed
# archive under TCG (1.5 MB instead of 3.3 MB to copy in; the guest's gunzip of it is quick).
DEFAULT_COMPRESSION: Compression = "gzip"


@dataclass(frozen=True)
class GuestArtifacts:
    """What a micro-VM boots: kernel image, initramfs, and the kernel version the portal shows."""

    kernel: Path
    initrd: Path
    kernel_version: str
    kernel_package: str
    kernel_package_version: str
    initrd_digest: str


def ensure_guest(
    guest_dir: Path = DEFAULT_GUEST_DIR, *, compression: Compression = DEFAULT_COMPRESSION
) -> GuestArtifacts:
    """Make sure the guest kernel and initramfs exist under `guest_dir` and return their paths."""
    guest_dir.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel(guest_dir)
    initrd = guest_dir / ("initramfs.cpio.gz" if compression == "gzip" else "initramfs.cpio")
    digest = initramfs_inputs_digest(kernel.modules, compression=compression)
    manifest_path = guest_dir / MANIFEST_NAME
    recorded = _read_manifest(manifest_path)
    if (
        not initrd.is_file()
        or recorded.get("initrd_inputs_digest") != digest
        or recorded.get("initrd") != initrd.name
    ):
        build_initramfs(initrd, kernel.modules, compression=compression)
    artifacts = _artifacts(kernel, initrd, digest)
    manifest = {
        "kernel_version": artifacts.kernel_version,
        "kernel_package": artifacts.kernel_package,
        "kernel_package_version": artifacts.kernel_package_version,
        "kernel": str(kernel.vmlinuz.relative_to(guest_dir)),
        "initrd": initrd.name,
        "initrd_compression": compression,
        "initrd_inputs_digest": digest,
        "modules": [path.name.removesuffix(".ko") for path in kernel.modules],
    }
    if manifest != recorded:
        partial = manifest_path.with_suffix(".partial")
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(manifest_path)
    return artifacts


def load_guest(guest_dir: Path = DEFAULT_GUEST_DIR) -> GuestArtifacts | None:
    """The guest recorded under `guest_dir` without building anything, or None if it is not built."""
    manifest = _read_manifest(guest_dir / MANIFEST_NAME)
    if not manifest:
        return None
    artifacts = GuestArtifacts(
        kernel=guest_dir / str(manifest["kernel"]),
        initrd=guest_dir / str(manifest["initrd"]),
        kernel_version=str(manifest["kernel_version"]),
        kernel_package=str(manifest["kernel_package"]),
        kernel_package_version=str(manifest["kernel_package_version"]),
        initrd_digest=str(manifest["initrd_inputs_digest"]),
    )
    if not artifacts.kernel.is_file() or not artifacts.initrd.is_file():
        return None
    return artifacts


def _artifacts(kernel: GuestKernel, initrd: Path, digest: str) -> GuestArtifacts:
    return GuestArtifacts(
        kernel=kernel.vmlinuz,
        initrd=initrd,
        kernel_version=kernel.version,
        kernel_package=kernel.package,
        kernel_package_version=kernel.package_version,
        initrd_digest=digest,
    )


def _read_manifest(path: Path) -> dict[str, object]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build the guest under --out (default var/guest) and print its manifest."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_GUEST_DIR, help="guest directory")
    parser.add_argument("--compression", choices=["gzip", "none"], default=DEFAULT_COMPRESSION)
    options = parser.parse_args(argv)
    artifacts = ensure_guest(options.out.resolve(), compression=options.compression)
    print(
        json.dumps(
            {
                "kernel": str(artifacts.kernel),
                "initrd": str(artifacts.initrd),
                "kernel_version": artifacts.kernel_version,
                "kernel_package": f"{artifacts.kernel_package}={artifacts.kernel_package_version}",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
