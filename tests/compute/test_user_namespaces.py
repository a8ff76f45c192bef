"""Containers run in user namespaces: container root is an unprivileged host uid, unique per container.

Written as the hostile side acts: a process that gets out of its container (or reaches a host
directory by any other way) must find itself an unprivileged, unique host user, and everything it
wrote on the host owned by that user, never by host root. Real runc, conmon, overlayfs and idmapped
mounts; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute.runtimes.oci import ContainerSpec, InvalidContainerSpec, OciRuntime
from compute.runtimes.userns import (
    AT_FDCWD,
    MOVE_MOUNT_F_EMPTY_PATH,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    SYS_MOVE_MOUNT,
    SYS_OPEN_TREE,
    IdMapping,
    IdRangeAllocator,
    mount_idmapped_overlay,
)
from imaging.store import LayerStore
from tests.compute.rootfs import build_busybox_rootfs
from tests.compute.test_oci_runtime import run_to_exit, spec_for, wait_until

APP_UID = 1000
CLONE_NEWNS = 0x00020000
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc") is None or shutil.which("conmon") is None,
    reason="needs root, runc and conmon",
)


TEST_CGROUP_PARENT = "bht-test-userns"


@pytest.fixture(scope="module", autouse=True)
def remove_test_cgroup_parent() -> Iterator[None]:
    yield
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            (hierarchy / TEST_CGROUP_PARENT).rmdir()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state dir (conmon's socket paths), searchable by others like a real host's."""
    directory = Path(tempfile.mkdtemp(prefix="bht-state-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def runtime(state_dir: Path) -> Iterator[OciRuntime]:
    oci_runtime = OciRuntime("runc", state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)
    yield oci_runtime
    for container_id in oci_runtime.list_ids():
        oci_runtime.delete(container_id)


@pytest.fixture
def new_id() -> Callable[[], str]:
    return lambda: f"bht-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def netns_name() -> Iterator[str]:
    name = f"bht-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="module")
def owned_image() -> Iterator[list[str]]:
    """One busybox layer whose /home/app and a file in it belong to uid/gid 1000, as the image says."""
    directory = Path(tempfile.mkdtemp(prefix="bht-owned-"))
    root = build_busybox_rootfs(directory / "base")
    (root / "mnt").mkdir()
    (root / "home/app/notes.txt").write_text("app's file\n")
    for path in (root / "home/app", root / "home/app/notes.txt"):
        os.chown(path, APP_UID, APP_UID)
    yield [str(root)]
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory of the host, writable by anyone who reaches it (like a shared volume or /tmp)."""
    directory = Path(tempfile.mkdtemp(prefix="bht-shared-"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def status_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and fs uids and gids of a host process, as the host sees them."""
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            fields[key] = [int(number) for number in value.split()]
    return fields["Uid"], fields["Gid"]


def attach_host_dir(container_pid: int, host_directory: Path, target: str) -> None:
    """Make a host directory reachable inside a running container at `target`.

    What a leaked mount, a volume or a breakout would give the container's processes: a path to
    host files. Done by a forked child that enters the container's mount namespace.
    """
    tree = _LIBC.syscall(
        SYS_OPEN_TREE, AT_FDCWD, str(host_directory).encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    )
    assert tree >= 0, os.strerror(ctypes.get_errno())
    try:
        child = os.fork()
        if child == 0:
            code = 1
            try:
                namespace = os.open(f"/proc/{container_pid}/ns/mnt", os.O_RDONLY)
                if _LIBC.setns(namespace, CLONE_NEWNS) == 0 and (
                    _LIBC.syscall(
                        SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
                    )
                    == 0
                ):
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "could not attach the host dir"
    finally:
        os.close(tree)


def mount_points() -> list[str]:
    return [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def run_and_wait_ready(runtime: OciRuntime, spec: ContainerSpec) -> int:
    pid = runtime.run(spec)
    wait_until(lambda: b"ready" in runtime.read_log(spec.container_id), 5, "the container to be ready")
    return pid


SLEEPER = ("sh", "-c", "echo ready; exec sleep 60")


# --------------------------------------------------------------------------- the attacker's view


def test_it_runs_container_root_as_an_unprivileged_host_uid(runtime, owned_image, new_id):
    spec = spec_for(new_id(), owned_image, *SLEEPER)

    pid = run_and_wait_ready(runtime, spec)

    uids, gids = status_ids(pid)
    assert 0 not in uids and 0 not in gids
    mapping = runtime.id_mapping(spec.container_id)
    assert mapping is not None
    assert uids == [mapping.host_base] * 4 and gids == [mapping.host_base] * 4
    assert mapping.host_base >= 65536  # no ordinary host user or group


def test_it_creates_files_in_a_reachable_host_dir_as_an_unprivileged_uid(
    runtime, owned_image, new_id, host_dir
):
    spec = spec_for(new_id(), owned_image, *SLEEPER)
    pid = run_and_wait_ready(runtime, spec)
    attach_host_dir(pid, host_dir, "/mnt")

    # The container's root plants a setuid-root shell where the host can run it, and tries to take
    # over a host-owned file.
    (host_dir / "host-file").write_text("the host's\n")
    script = (
        "cp /bin/busybox /mnt/rootshell && chmod 4755 /mnt/rootshell; "
        "chown 0:0 /mnt/host-file && echo chown-ok; echo owned > /mnt/host-file && echo write-ok"
    )
    completed = subprocess.run(
        ["runc", f"--root={runtime.state_dir}/_runtime/runc", "exec", spec.container_id, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    planted = (host_dir / "rootshell").stat()
    assert planted.st_uid != 0 and planted.st_gid != 0
    assert "write-ok" not in completed.stdout
    mapping = runtime.id_mapping(spec.container_id)
    assert mapping is not None
    assert (planted.st_uid, planted.st_gid) == (mapping.host_base, mapping.host_base)
    assert (host_dir / "host-file").read_text() == "the host's\n"
    assert (host_dir / "host-file").stat().st_uid == 0


def test_it_shows_the_files_owned_as_the_image_says(runtime, owned_image, new_id):
    script = (
        "id -u; stat -c '%u:%g' /etc/passwd /home/app /home/app/notes.txt /etc/hosts /; "
        "echo '10.9.9.9 extra' >> /etc/hosts && echo hosts-writable"
    )
    spec = spec_for(new_id(), owned_image, "sh", "-c", script)

    exit_code, output = run_to_exit(runtime, spec)

    assert exit_code == 0, output
    assert output.splitlines() == ["0", "0:0", "1000:1000", "1000:1000", "0:0", "0:0", "hosts-writable"]


def test_it_lets_the_image_user_write_its_own_files(runtime, owned_image, new_id):
    script = (
        "id -u; echo more >> /home/app/notes.txt && echo appended; "
        "touch /etc/passwd 2>/dev/null || echo denied"
    )
    spec = spec_for(new_id(), owned_image, "sh", "-c", script, user="app")

    exit_code, output = run_to_exit(runtime, spec)

    assert exit_code == 0, output
    assert output.splitlines() == ["1000", "appended", "denied"]


def test_it_stores_the_upper_dir_with_the_containers_host_ids(runtime, owned_image, new_id):
    script = "touch /root/by-root; chmod 4755 /root/by-root; echo x >> /home/app/notes.txt; mkdir /data"
    spec = spec_for(new_id(), owned_image, "sh", "-c", script)

    exit_code, output = run_to_exit(runtime, spec)

    upper = runtime.upper_dir(spec.container_id)
    assert exit_code == 0, output
    assert not [path for path in upper.rglob("*") if path.lstat().st_uid == 0 and not path.is_char_device()]
    base = runtime.id_mapping(spec.container_id).host_base  # type: ignore[union-attr]
    by_root = (upper / "root/by-root").stat()
    assert (by_root.st_uid, by_root.st_mode & stat.S_ISUID) == (base, stat.S_ISUID)  # setuid, but not root's
    assert (upper / "home/app/notes.txt").stat().st_uid == base + APP_UID  # copied up with its owner
    assert (upper / "data").stat().st_uid == base


def test_it_commits_the_changes_with_the_ids_seen_inside(runtime, owned_image, new_id, tmp_path):
    script = (
        "touch /root/by-root; echo x >> /home/app/notes.txt; touch /tmp/by-app; chown 1000:50 /tmp/by-app"
    )
    spec = spec_for(new_id(), owned_image, "sh", "-c", script)
    assert run_to_exit(runtime, spec)[0] == 0
    mapping = runtime.id_mapping(spec.container_id)
    assert mapping is not None
    store = LayerStore(tmp_path / "store", durable=False)

    committed = store.diff_upper(
        runtime.upper_dir(spec.container_id), compression="gzip", id_shift=(mapping.host_base, mapping.size)
    )

    with tarfile.open(fileobj=io.BytesIO(store.read_blob(committed.blob_digest)), mode="r:gz") as layer:
        owners = {member.name.rstrip("/"): (member.uid, member.gid) for member in layer.getmembers()}
    assert owners["root/by-root"] == (0, 0)
    assert owners["home/app/notes.txt"] == (APP_UID, APP_UID)
    assert owners["tmp/by-app"] == (APP_UID, 50)
    assert all(uid < 65536 and gid < 65536 for uid, gid in owners.values())


def test_it_gives_changes_kept_from_before_user_namespaces_the_containers_ids(runtime, owned_image, new_id):
    container_id = new_id()
    script = "touch /root/old; chmod 4755 /root/old; touch /tmp/app-old; chown 1000:1000 /tmp/app-old"
    before = spec_for(container_id, owned_image, "sh", "-c", script, user_namespace=False)
    assert run_to_exit(runtime, before)[0] == 0  # written root-mapped, as every container before
    runtime.delete(container_id, keep_upper=True)

    after = spec_for(
        container_id,
        owned_image,
        "sh",
        "-c",
        "stat -c '%u:%g %a' /root/old /tmp/app-old; echo more >> /root/old && echo appended",
    )
    exit_code, output = run_to_exit(runtime, after)

    assert exit_code == 0, output
    assert output.splitlines() == ["0:0 4755", "1000:1000 644", "appended"]
    base = runtime.id_mapping(container_id).host_base  # type: ignore[union-attr]
    assert (runtime.upper_dir(container_id) / "root/old").stat().st_uid == base


def test_it_refuses_a_user_outside_the_containers_ids(runtime, owned_image, new_id):
    spec = spec_for(new_id(), owned_image, "true", user="70000:70000")

    with pytest.raises(InvalidContainerSpec, match="outside the container's ids"):
        runtime.run(spec)

    assert runtime.list_ids() == []


# --------------------------------------------------------------------------- ranges


def test_it_gives_every_container_its_own_range(runtime, owned_image, new_id):
    specs = [spec_for(new_id(), owned_image, *SLEEPER) for _ in range(3)]
    pids = [run_and_wait_ready(runtime, spec) for spec in specs]

    bases = [status_ids(pid)[0][0] for pid in pids]
    mappings = [runtime.id_mapping(spec.container_id) for spec in specs]
    assert bases == [mapping.host_base for mapping in mappings]  # type: ignore[union-attr]
    spans = sorted((m.host_base, m.host_base + m.size) for m in mappings)  # type: ignore[union-attr]
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))


def test_it_keeps_the_range_across_a_restart_and_an_agent_restart(runtime, state_dir, owned_image, new_id):
    spec = spec_for(new_id(), owned_image, "sh", "-c", "echo kept >> /root/log; cat /root/log")
    assert run_to_exit(runtime, spec) == (0, "kept\n")
    first = runtime.id_mapping(spec.container_id)
    other = spec_for(new_id(), owned_image, *SLEEPER)

    runtime.delete(spec.container_id, keep_upper=True)  # a restart keeps the changes...
    run_and_wait_ready(runtime, other)  # ...while another container is created meanwhile
    restarted_agent = OciRuntime("runc", state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)

    assert restarted_agent.id_mapping(spec.container_id) == first
    assert restarted_agent.id_mapping(other.container_id) != first
    assert run_to_exit(restarted_agent, spec) == (0, "kept\nkept\n")


def test_it_releases_the_range_with_the_container(runtime, owned_image, new_id):
    spec = spec_for(new_id(), owned_image, "true")
    run_to_exit(runtime, spec)
    assert runtime.id_mapping(spec.container_id) is not None

    runtime.delete(spec.container_id)

    assert runtime.id_mapping(spec.container_id) is None
    assert runtime.id_ranges.allocations() == {}


def test_it_lists_a_range_left_without_its_container_so_that_it_is_released(runtime, new_id):
    orphan = new_id()
    runtime.id_ranges.allocate(orphan)  # an agent killed right after recording it

    assert orphan in runtime.list_ids()
    runtime.delete(orphan)

    assert runtime.id_ranges.allocations() == {}


def test_it_never_hands_out_a_range_twice_nor_beyond_the_pool(tmp_path):
    allocator = IdRangeAllocator(tmp_path / "ranges", pool_start=200_000, pool_size=3 * 65536)

    first, second, third = (allocator.allocate(f"bh-{n}") for n in range(3))
    with pytest.raises(Exception, match="all 3 id ranges"):
        allocator.allocate("bh-3")
    allocator.release("bh-1")

    assert [first.host_base, second.host_base, third.host_base] == [200_000, 265_536, 331_072]
    assert allocator.allocate("bh-0") == first  # what it has
    assert allocator.allocate("bh-4") == second  # the freed one


# --------------------------------------------------------------------------- root-mapped by choice


def test_it_maps_root_to_host_root_only_when_the_spec_says_so(runtime, owned_image, new_id):
    spec = spec_for(new_id(), owned_image, *SLEEPER, user_namespace=False)

    pid = run_and_wait_ready(runtime, spec)

    assert status_ids(pid)[0] == [0, 0, 0, 0]
    assert runtime.id_mapping(spec.container_id) is None


# --------------------------------------------------------------------------- compartments


def test_it_gives_a_container_in_a_host_made_netns_a_sysfs_of_that_netns(
    runtime, owned_image, new_id, netns_name
):
    subprocess.run(
        ["ip", "-n", netns_name, "link", "add", "bht-veth0", "type", "veth", "peer", "name", "bht-veth1"],
        check=True,
    )
    script = (
        "ls /sys/class/net; touch /sys/x 2>/dev/null || echo sys-read-only; id -u; "
        "busybox httpd -p 80 -h /tmp && echo bound-port-80"
    )
    spec = spec_for(new_id(), owned_image, "sh", "-c", script, netns_path=f"/var/run/netns/{netns_name}")

    exit_code, output = run_to_exit(runtime, spec)

    assert exit_code == 0, output
    assert output.split() == ["bht-veth0", "bht-veth1", "lo", "sys-read-only", "0", "bound-port-80"]
    runtime.delete(spec.container_id)
    assert not [point for point in mount_points() if spec.container_id in point]


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_it_never_mounts_on_a_host_dir_an_images_sys_symlink_points_to(
    runtime, owned_image, new_id, netns_name, host_dir, tmp_path, link
):
    # The tenant's image has /sys -> a host directory; the host prepares /sys for a compartment.
    layer = tmp_path / "evil-layer"
    layer.mkdir()
    target = str(host_dir) if link == "absolute" else "../" * 12 + str(host_dir).lstrip("/")
    (layer / "sys").symlink_to(target)
    (host_dir / "canary").write_text("host data\n")
    spec = spec_for(new_id(), [str(layer), *owned_image], "true", netns_path=f"/var/run/netns/{netns_name}")

    with pytest.raises(Exception, match="/sys"):
        runtime.run(spec)

    assert str(host_dir) not in mount_points()
    assert [entry.name for entry in host_dir.iterdir()] == ["canary"]
    assert (host_dir / "canary").read_text() == "host data\n"
    assert runtime.list_ids() == []


# --------------------------------------------------------------------------- older kernels


def test_it_mounts_idmapped_layers_through_staging_mounts_on_kernels_without_layer_fds(owned_image, tmp_path):
    bundle = tmp_path / "bundle"
    for name in ("upper", "work", "rootfs"):
        (bundle / name).mkdir(parents=True)
    mapping = IdMapping(host_base=300_000)

    mount_idmapped_overlay(
        owned_image,
        bundle / "upper",
        bundle / "work",
        bundle / "rootfs",
        mapping,
        staging_dir=bundle / "layers",
        layers_by_fd=False,
    )
    try:
        owners = [(bundle / "rootfs" / path).stat().st_uid for path in ("etc/passwd", "home/app/notes.txt")]
        staged = [point for point in mount_points() if point.startswith(str(bundle / "layers"))]
    finally:
        subprocess.run(["umount", str(bundle / "rootfs")], check=True)

    assert owners == [300_000, 300_000 + APP_UID]
    assert staged == []  # the staging mounts are gone once the overlay holds the layers
    assert not (bundle / "layers").exists()
    # The image's layer itself is untouched.
    assert os.stat(Path(owned_image[0]) / "etc/passwd").st_uid == 0


def test_it_keeps_layer_dirs_shared_and_unchanged(runtime, owned_image, new_id):
    before = {path: path.lstat().st_uid for path in Path(owned_image[0]).rglob("*")}
    specs = [spec_for(new_id(), owned_image, "sh", "-c", "touch /home/app/notes.txt") for _ in range(2)]

    for spec in specs:
        assert run_to_exit(runtime, spec)[0] == 0

    assert {path: path.lstat().st_uid for path in Path(owned_image[0]).rglob("*")} == before
