"""A micro-VM guest attacks its host through the disks they share; the host must never follow it.

The workload runs as root in its guest and can do anything to its own writable disk (/dev/vdb): plant
symlinks (absolute and relative) where the host used to write the workload spec and read the captured
changes, hard links, device nodes, a crafted superblock, and power off before its init exports
anything. Then the tenant uses the public API (`changes`, `commit`, `start`) as usual. Everything runs
for real: API, host agent (Celery worker + agent loop), libvirt, QEMU (TCG) and the project's guest.

What must hold: no host file outside is written, read, listed or mounted (canary files and directories
checked byte for byte, and every `mount`/`e2fsck`/`losetup`/`debugfs` the agent runs is logged by a
wrapper first on its PATH), and the tenant gets either a clear refusal or only its own data.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, wait_until

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None or shutil.which("libvirtd") is None,
        reason="needs root, QEMU and libvirtd",
    ),
]

BOOT_TIMEOUT = 240.0
SPIED_TOOLS = ("mount", "umount", "e2fsck", "fsck", "fsck.ext4", "losetup", "debugfs", "tune2fs")
# Far more "../" than any host path is deep: a relative link resolved on the host lands at its root.
UP = "../" * 24


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """Host files and directories a hostile guest would like the host to write, read or list."""
    root = tmp_path / "host-canary"
    (root / "dir" / "nested").mkdir(parents=True)
    (root / "dir" / "secret.txt").write_bytes(b"host secret " + secrets.token_hex(16).encode() + b"\n")
    (root / "dir" / "nested" / "keys").write_bytes(secrets.token_bytes(64))
    (root / "file.txt").write_bytes(b"host file " + secrets.token_hex(16).encode() + b"\n")
    (root / "other.txt").write_bytes(b"other host file " + secrets.token_hex(16).encode() + b"\n")
    return root


@pytest.fixture
def spy(tmp_path: Path) -> Path:
    """A PATH directory whose mount/fsck/loop tools log their arguments, then run the real one."""
    directory = tmp_path / "spy-bin"
    directory.mkdir()
    log = tmp_path / "spy.log"
    log.touch()
    for tool in SPIED_TOOLS:
        real = shutil.which(tool)
        if real is None:
            continue
        wrapper = directory / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >>{log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return directory


@pytest.fixture
def host(world: World, store_dir: Path, spy: Path) -> Iterator[Host]:
    h = make_host("bht-host-vmbound")
    with host_agent(h, BULKHEAD_STORE_DIR=str(store_dir), PATH=f"{spy}:{os.environ['PATH']}"):
        yield h
    from tests.compute.runtimes import vm_runtime

    for workload in Workload.objects.filter(host=h, isolation="microvm"):
        vm_runtime(h).delete(workload.pk)
    cleanup_host(h)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `root`: its mode and content (a symlink's target), byte for byte."""
    entries: dict[str, tuple[int, bytes]] = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(info.st_mode):
            content = os.readlink(path).encode()
        else:
            content = b""
        entries[str(path.relative_to(root))] = (info.st_mode, content)
    return entries


def hostile(script: str) -> list[str]:
    """Run `script` as root in the guest with every busybox applet (the image links only a few)."""
    setup = "/bin/busybox mkdir -p /bb && /bin/busybox --install -s /bb && export PATH=/bb:/bin"
    return ["/bin/busybox", "sh", "-c", f"set -e; {setup}; {script}"]


def run_vm(world: World, busybox: Any, name: str, script: str) -> Workload:
    response = create(
        world,
        "mia",
        name=name,
        image=str(busybox.pk),
        isolation="microvm",
        command=hostile(script),
        user="0:0",
        memory_mib=192,
    )
    assert response.status_code == 202, response.json()
    return Workload.objects.get(name=name)


def spied_calls(spy: Path) -> list[str]:
    return [line for line in (spy.parent / "spy.log").read_text().splitlines() if line.strip()]


def host_mounts_of(workload: Workload) -> list[str]:
    """Mounts and loop devices on the host that involve the VM's writable disk or its state."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found = [line for line in mounts if str(workload.pk) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return found + [line for line in loops.splitlines() if str(workload.pk) in line]


def layer_files(store_dir: Path, diff_id: str) -> dict[str, bytes]:
    from imaging.store import LayerStore

    root = LayerStore(store_dir).layer_path(diff_id)
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        for path in root.rglob("*")
    }


def test_a_guest_cannot_make_its_host_write_read_list_or_mount_host_files(
    world: World, busybox: Any, host: Host, canary: Path, spy: Path, store_dir: Path
) -> None:
    before = snapshot(canary)
    client = client_for(world, "mia")
    disk = "/bin/busybox mkdir -p /x && /bin/busybox mount -t ext4 /dev/vdb /x"
    scripts = {
        # The old spec dir and the upper dir become links to host directories (absolute and relative).
        "links-to-dirs": (
            f"{disk}; rm -rf /x/bulkhead; ln -s {canary}/dir /x/bulkhead; "
            f"mv /x/upper /x/upper-moved; ln -s {UP}{str(canary).lstrip('/')}/dir /x/upper; sync"
        ),
        # Spec files become links to host files; the guest's own data has a hard link and a link out.
        "links-to-files": (
            f"{disk}; mkdir -p /x/bulkhead; "
            f"for f in args env cwd user nonce tty; do rm -f /x/bulkhead/$f; done; "
            f"ln -s {canary}/file.txt /x/bulkhead/args; "
            f"ln -s {UP}{str(canary).lstrip('/')}/other.txt /x/bulkhead/env; "
            f"for f in cwd user nonce tty; do ln -s {canary}/dir/made-$f /x/bulkhead/$f; done; "
            f"echo mine > /mine.txt; ln /mine.txt /mine-link.txt; ln -s {canary}/dir/secret.txt /points-out; "
            f"ln /x/upper/mine.txt /x/upper/disk-link.txt 2>/dev/null || true; sync"
        ),
        # Device nodes in the changes, written through the overlay and straight onto the disk.
        "devices": (f"{disk}; mknod /host-disk b 8 0; mknod /x/upper/mem c 1 1; mkfifo /x/upper/fifo; sync"),
        # A crafted superblock, and a power-off before the init can export or unmount anything.
        "superblock": (
            f"{disk}; echo mine > /x/upper/mine.txt; sync; umount /x; "
            "echo CRAFTED-SUPERBLOCK-CRAFTED-SUPERBLOCK | dd of=/dev/vdb bs=1 seek=1028 conv=notrunc; "
            "sync; poweroff -f"
        ),
    }
    workloads = {name: run_vm(world, busybox, name, script) for name, script in scripts.items()}
    for name in scripts:
        workloads[name] = workload_in(name, {"stopped", "failed"}, timeout=BOOT_TIMEOUT)

    answers = {}
    for name, workload in workloads.items():
        answers[name] = client.get(f"/api/v1/workloads/{workload.pk}/changes/")
        assert host_mounts_of(workload) == [], name

    # Only its own data, or a clear refusal.
    own = answers["links-to-files"]
    assert own.status_code == 200, own.json()
    paths = {change["path"] for change in own.json()["changes"]}
    assert {"/mine.txt", "/mine-link.txt", "/points-out"} <= paths
    assert not any("secret" in path or "nested" in path or "keys" in path for path in paths)
    for name in ("links-to-dirs", "superblock"):
        assert answers[name].status_code == 409, (name, answers[name].json())
        assert str(canary) not in answers[name].content.decode()
    # Device nodes and FIFOs are left out of the guest's changes, as of any image layer (the store skips
    # them): the tenant sees its own files and no node.
    devices = answers["devices"]
    assert devices.status_code == 200, devices.json()
    device_paths = {change["path"] for change in devices.json()["changes"]}
    assert not {"/host-disk", "/mem", "/fifo"} & device_paths
    assert str(canary) not in devices.content.decode()
    assert "stops cleanly" in answers["superblock"].json()["error"]["message"]

    commits = {
        name: client.post(
            f"/api/v1/workloads/{workload.pk}/commit/", {"name": "taken", "tag": name}, format="json"
        ).json()
        for name, workload in workloads.items()
    }
    outcomes = {name: finished(op["id"], timeout=120) for name, op in commits.items()}
    assert outcomes["links-to-files"].state == "succeeded", outcomes["links-to-files"].error
    for name in ("links-to-dirs", "superblock"):
        assert outcomes[name].state == "failed", name
    assert outcomes["devices"].state == "succeeded", outcomes["devices"].error
    from imaging.models import Image

    image = Image.objects.get(tenant=world.acme, name="taken", tag="links-to-files")
    top = image.image_layers.order_by("-position").first()
    assert top is not None
    committed = layer_files(store_dir, top.layer.diff_id)
    assert committed["mine.txt"] == b"mine\n" and committed["mine-link.txt"] == b"mine\n"
    secrets_on_host = [content for _mode, content in before.values() if content]
    assert not any(secret in data for data in committed.values() for secret in secrets_on_host)

    # Start again: the host prepares each boot without opening the guest's disk.
    for workload in workloads.values():
        response = client.post(f"/api/v1/workloads/{workload.pk}/start/")
        assert response.status_code == 202, response.json()
    for workload in workloads.values():
        wait_until(
            lambda w=workload: (
                Workload.objects.filter(pk=w.pk, state__in=["stopped", "failed"])
                .exclude(started_at=w.started_at)
                .first()
            ),
            timeout=BOOT_TIMEOUT,
            what=f"{workload.name} to run again",
        )
        assert host_mounts_of(workload) == [], workload.name

    assert snapshot(canary) == before
    calls = [line for line in spied_calls(spy) if "ext4" in line or "/vms/" in line or "loop" in line]
    assert calls == []
