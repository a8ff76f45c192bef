"""The namespace-container driver against the real runc, conmon, overlayfs and cgroups of this host."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute.runtimes.oci import (
    DOCKER_DEFAULT_CAPABILITIES,
    ContainerSpec,
    InvalidContainerSpec,
    OciRuntime,
    ResolvedUser,
    build_oci_config,
    cgroup_mode,
    parse_k8s_log,
    resolve_user,
)
from compute.runtimes.probe import probe_oci_runtimes, working_oci_runtimes

try:
    from tests.compute.rootfs import build_busybox_rootfs, build_layer_on_top
except ImportError:  # run without the repository root on sys.path
    from rootfs import build_busybox_rootfs, build_layer_on_top  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_CGROUP_PARENT = "bht-test"
# Docker's default bounding set as /proc/<pid>/status prints it.
DOCKER_CAPABILITY_MASK = "00000000a80425fb"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc") is None or shutil.which("conmon") is None,
    reason="needs root, runc and conmon",
)


# --------------------------------------------------------------------------- fixtures and helpers


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def image_layers() -> Iterator[list[str]]:
    """Two image layers, top-most first: a layer adding /etc/motd over a busybox base."""
    directory = Path(tempfile.mkdtemp(prefix="bht-image-"))
    base = build_busybox_rootfs(directory / "base")
    (base / "etc/motd").write_text("from the base layer\n")
    top = build_layer_on_top(directory / "top", {"etc/motd": "from the top layer\n", "etc/top-only": "top\n"})
    yield [str(top), str(base)]
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def remove_test_cgroup_parent() -> Iterator[None]:
    """Remove the test cgroup parent runc creates in each hierarchy once the module is done."""
    yield
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for candidate in (hierarchy / TEST_CGROUP_PARENT, Path("/sys/fs/cgroup") / TEST_CGROUP_PARENT):
            if candidate.is_dir():
                # A parent still holding a leaked container stays: the per-test teardown reports it.
                with contextlib.suppress(OSError):
                    candidate.rmdir()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state dir (conmon's attach socket path must stay under 108 bytes).

    Searchable by others like a real host's state dir: a container's root is an unprivileged host uid
    that must reach its rootfs below it (mkdtemp makes it 0700).
    """
    directory = Path(tempfile.mkdtemp(prefix="bht-state-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def runtime(state_dir: Path) -> Iterator[OciRuntime]:
    """An OciRuntime over a fresh state dir; deletes every container it finds afterwards."""
    oci_runtime = OciRuntime("runc", state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)
    yield oci_runtime
    for container_id in oci_runtime.list_ids():
        oci_runtime.delete(container_id)


@pytest.fixture
def new_id() -> Callable[[], str]:
    """Generate test container ids with the recognizable bht- prefix."""
    return lambda: f"bht-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A network namespace the test creates; removed afterwards whatever happens."""
    name = f"bht-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def spec_for(container_id: str, layers: list[str], *args: str, **fields: object) -> ContainerSpec:
    """A ContainerSpec with test-sized limits."""
    defaults: dict[str, object] = {"memory_mib": 64, "vcpus": 0.5, "pids_limit": 64}
    defaults.update(fields)
    return ContainerSpec(container_id=container_id, lower_dirs=layers, args=list(args), **defaults)  # type: ignore[arg-type]


def run_to_exit(runtime: OciRuntime, spec: ContainerSpec, timeout: float = 5) -> tuple[int | None, str]:
    """Run a container to its end; return its exit code and its output."""
    runtime.run(spec)
    exit_code = runtime.wait_exit(spec.container_id, timeout)
    return exit_code, runtime.read_log(spec.container_id).decode()


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return {line.split(" ")[4] for line in mountinfo}


# --------------------------------------------------------------------------- running and output


def test_it_runs_echo_and_keeps_stdout_and_stderr_in_the_log(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "echo hello from bulkhead; echo oops >&2")

    exit_code, output = run_to_exit(runtime, spec)

    assert exit_code == 0
    assert output == "hello from bulkhead\noops\n"
    assert runtime.read_log(spec.container_id, streams=["stderr"]) == b"oops\n"
    assert runtime.log_path(spec.container_id).is_file()


def test_it_records_the_exit_code_within_two_seconds(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "exit 7")

    runtime.run(spec)
    started = time.monotonic()
    exit_code = runtime.wait_exit(spec.container_id, timeout=2)

    assert exit_code == 7
    assert time.monotonic() - started < 2
    state = runtime.state(spec.container_id)
    assert (state.status, state.exit_code) == ("stopped", 7)
    assert state.started_at is not None and state.finished_at is not None
    assert state.finished_at >= state.started_at
    assert spec.container_id in runtime.exited_ids()


def test_it_reports_creating_before_start_and_running_after(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sleep", "30")

    runtime.create(spec)
    runtime.create(spec)  # idempotent
    assert runtime.state(spec.container_id).status == "creating"
    pid = runtime.start(spec.container_id)

    state = runtime.state(spec.container_id)
    assert (state.status, state.pid) == ("running", pid)
    assert runtime.start(spec.container_id) == pid  # idempotent while running
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")


def test_it_applies_env_cwd_and_a_user_name(runtime, image_layers, new_id):
    spec = spec_for(
        new_id(),
        image_layers,
        "sh",
        "-c",
        "id -u; id -g; id -G; pwd; env",
        env=["GREETING=hello world", "EMPTY="],
        cwd="/tmp",
        user="app",
    )

    exit_code, output = run_to_exit(runtime, spec)

    lines = output.splitlines()
    assert exit_code == 0
    assert lines[:4] == ["1000", "1000", "1000 50", "/tmp"]
    assert "GREETING=hello world" in lines and "EMPTY=" in lines
    assert "HOME=/home/app" in lines
    assert any(line.startswith("PATH=/usr/local/sbin") for line in lines)


def test_it_applies_a_numeric_user_and_group(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "id -u; id -g", user="4321:1234")

    exit_code, output = run_to_exit(runtime, spec)

    assert (exit_code, output) == (0, "4321\n1234\n")


def test_it_shows_the_top_layer_over_the_base_layer(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "cat", "/etc/motd", "/etc/top-only")

    assert run_to_exit(runtime, spec) == (0, "from the top layer\ntop\n")


def test_it_captures_what_the_container_wrote_in_the_upper_dir(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "echo data > /root/new.txt; rm /etc/motd")

    exit_code, _ = run_to_exit(runtime, spec)

    upper = runtime.upper_dir(spec.container_id)
    assert exit_code == 0
    assert (upper / "root/new.txt").read_text() == "data\n"
    whiteout = (upper / "etc/motd").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0  # overlayfs whiteout
    assert (Path(image_layers[0]) / "etc/motd").exists()  # the image layer is untouched


def test_it_applies_dockers_security_defaults(runtime, image_layers, new_id):
    script = (
        "grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "echo timer_list=$(wc -c < /proc/timer_list); "
        "(echo 1 > /proc/sys/kernel/panic) 2>/dev/null && echo sysctl-writable || echo sysctl-readonly; "
        "unshare -n true 2>/dev/null && echo unshare-allowed || echo unshare-refused; "
        "hostname"
    )
    spec = spec_for(new_id(), image_layers, "sh", "-c", script, hostname="web-1")

    exit_code, output = run_to_exit(runtime, spec)

    fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    assert exit_code == 0
    assert fields["CapBnd"].strip() == DOCKER_CAPABILITY_MASK
    assert fields["CapEff"].strip() == DOCKER_CAPABILITY_MASK
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # a filter is installed
    assert "timer_list=0" in output  # masked: the host's file has several KiB
    assert "sysctl-readonly" in output
    assert "unshare-refused" in output
    assert output.rstrip().endswith("web-1")


# --------------------------------------------------------------------------- limits and stats


def test_it_puts_memory_cpu_and_pids_limits_in_the_cgroup(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sleep", "30", memory_mib=48, vcpus=1.5, pids_limit=33)

    runtime.run(spec)

    memory_dir = runtime.cgroup_path(spec.container_id, "memory")
    limit_file = "memory.max" if cgroup_mode() == "v2" else "memory.limit_in_bytes"
    assert int((memory_dir / limit_file).read_text()) == 48 * 1024 * 1024
    if cgroup_mode() != "v2":
        cpu_dir = runtime.cgroup_path(spec.container_id, "cpu")
        assert int((cpu_dir / "cpu.cfs_quota_us").read_text()) == 150_000
        assert int((cpu_dir / "cpu.cfs_period_us").read_text()) == 100_000
        pids_dir = runtime.cgroup_path(spec.container_id, "pids")
        assert (pids_dir / "pids.max").read_text().strip() == "33"
    # Right after start the runtime's init threads may still be leaving for the exec.
    wait_until(lambda: runtime.stats(spec.container_id).pids == 1, 5, "only sleep left in the cgroup")
    stats = runtime.stats(spec.container_id)
    assert stats.memory_limit_bytes == 48 * 1024 * 1024
    assert stats.memory_bytes > 0 and stats.cpu_usage_ns > 0


def test_it_reports_an_out_of_memory_kill(runtime, image_layers, new_id):
    hog = "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived"
    spec = spec_for(new_id(), image_layers, "sh", "-c", hog, memory_mib=16)

    exit_code, output = run_to_exit(runtime, spec, timeout=20)

    assert exit_code == 128 + signal.SIGKILL
    assert "survived" not in output
    assert runtime.state(spec.container_id).oom_killed


# --------------------------------------------------------------------------- stopping


def test_it_kills_a_process_ignoring_sigterm_after_the_grace_period(runtime, image_layers, new_id):
    spec = spec_for(
        new_id(), image_layers, "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    )
    runtime.run(spec)
    wait_until(lambda: runtime.read_log(spec.container_id) == b"ready\n", 5, "the trap to be set")

    started = time.monotonic()
    exit_code = runtime.stop(spec.container_id, grace_seconds=1)
    elapsed = time.monotonic() - started

    assert exit_code == 128 + signal.SIGKILL
    assert 1 <= elapsed < 10  # killed after the 1 s grace, not waited out (upper bound: a loaded machine)
    assert runtime.state(spec.container_id).status == "stopped"


def test_it_stops_a_well_behaved_process_quickly(runtime, image_layers, new_id):
    spec = spec_for(
        new_id(), image_layers, "sh", "-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    )
    runtime.run(spec)
    wait_until(lambda: runtime.read_log(spec.container_id) == b"ready\n", 5, "the trap to be set")

    started = time.monotonic()
    exit_code = runtime.stop(spec.container_id, grace_seconds=10)

    assert exit_code == 0
    assert time.monotonic() - started < 1


# --------------------------------------------------------------------------- deleting


def test_it_leaves_no_mount_cgroup_or_bundle_after_delete(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sleep", "30")
    runtime.run(spec)
    bundle = runtime.bundle_dir(spec.container_id)
    cgroup_dirs = [runtime.cgroup_path(spec.container_id, controller) for controller in ("memory", "cpu")]
    assert str(runtime.rootfs_dir(spec.container_id)) in mount_points()

    runtime.delete(spec.container_id)

    assert not any(point.startswith(str(bundle)) for point in mount_points())
    assert not any(directory.exists() for directory in cgroup_dirs)
    assert not bundle.exists()
    assert not runtime.exit_file(spec.container_id).exists()
    assert spec.container_id not in runtime.list_ids()
    assert runtime.state(spec.container_id).status == "absent"
    runtime.delete(spec.container_id)  # and again: nothing to do, no error


@pytest.mark.parametrize(
    "stage", ["bundle_dir_only", "rootfs_mounted", "created_not_started", "stopped", "cgroup_only"]
)
def test_it_deletes_idempotently_after_a_partial_create(runtime, image_layers, new_id, stage):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "exit 0")
    bundle = runtime.bundle_dir(spec.container_id)
    if stage == "bundle_dir_only":
        bundle.mkdir()
    elif stage == "rootfs_mounted":
        runtime._prepare_bundle(spec)  # what a killed agent leaves after the mount, before conmon
    elif stage == "created_not_started":
        runtime.create(spec)
    elif stage == "cgroup_only":
        runtime.cgroup_path(spec.container_id, "memory").mkdir(parents=True)  # a leaked cgroup
    else:
        run_to_exit(runtime, spec)
    assert spec.container_id in runtime.list_ids()

    runtime.delete(spec.container_id)
    runtime.delete(spec.container_id)

    assert not bundle.exists()
    assert not any(point.startswith(str(bundle)) for point in mount_points())
    assert not runtime.cgroup_path(spec.container_id, "memory").exists()
    assert spec.container_id not in runtime.list_ids()


def test_it_cleans_up_when_the_runtime_refuses_to_create(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "true", netns_path="/proc/self/ns/bht-missing")

    with pytest.raises(Exception, match="bht-missing"):
        runtime.create(spec)

    assert runtime.list_ids() == []
    assert not runtime.bundle_dir(spec.container_id).exists()


# --------------------------------------------------------------------------- agent restarts


AGENT_SCRIPT = """
import sys
from pathlib import Path
from compute.runtimes.oci import ContainerSpec, OciRuntime
runtime = OciRuntime("runc", state_dir=Path(sys.argv[1]), cgroup_parent=sys.argv[2])
spec = ContainerSpec(container_id=sys.argv[3], lower_dirs=sys.argv[4].split(","), memory_mib=64,
                     args=["sh", "-c", "trap 'exit 3' TERM; echo ready; while :; do sleep 0.05; done"])
print(runtime.run(spec))
"""


def test_it_keeps_a_container_across_an_agent_restart_and_records_its_exit(
    runtime, state_dir, image_layers, new_id
):
    container_id = new_id()
    # The "agent" is a separate Python process that starts the container and exits.
    agent = subprocess.run(
        [
            sys.executable,
            "-c",
            AGENT_SCRIPT,
            str(state_dir),
            TEST_CGROUP_PARENT,
            container_id,
            ",".join(image_layers),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    pid = int(agent.stdout.strip())
    restarted = OciRuntime("runc", state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)
    wait_until(lambda: restarted.read_log(container_id) == b"ready\n", 5, "the container to be ready")

    assert restarted.list_ids() == [container_id]
    assert restarted.state(container_id).status == "running"
    assert restarted.state(container_id).pid == pid

    # The container exits while no agent watches it; conmon still records the code.
    os.kill(pid, signal.SIGTERM)
    killed_at = time.time()
    another_restart = OciRuntime("runc", state_dir=state_dir, cgroup_parent=TEST_CGROUP_PARENT)
    assert another_restart.wait_exit(container_id, timeout=2) == 3
    state = another_restart.state(container_id)
    assert state.status == "stopped" and state.exit_code == 3
    assert state.finished_at is not None and state.finished_at.timestamp() - killed_at < 2


# --------------------------------------------------------------------------- networks


def test_it_gives_a_container_without_netns_path_only_loopback(runtime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "ls /sys/class/net")

    assert run_to_exit(runtime, spec) == (0, "lo\n")


def test_it_joins_a_prepared_network_namespace(runtime, image_layers, new_id, netns_name):
    subprocess.run(
        ["ip", "-n", netns_name, "link", "add", "bht-veth0", "type", "veth", "peer", "name", "bht-veth1"],
        check=True,
    )
    spec = spec_for(
        new_id(), image_layers, "sh", "-c", "ls /sys/class/net", netns_path=f"/var/run/netns/{netns_name}"
    )

    exit_code, output = run_to_exit(runtime, spec)

    assert exit_code == 0
    assert sorted(output.split()) == ["bht-veth0", "bht-veth1", "lo"]


# --------------------------------------------------------------------------- probing


def test_it_probes_runc_as_working_and_says_why_crun_is_not(state_dir):
    probes = {
        probe.name: probe
        for probe in probe_oci_runtimes(state_dir / "probe", cgroup_parent=TEST_CGROUP_PARENT)
    }

    assert probes["runc"].works and probes["runc"].reason == "ok"
    assert working_oci_runtimes(state_dir / "probe2", ("runc",), cgroup_parent=TEST_CGROUP_PARENT) == ["runc"]
    if cgroup_mode() == "hybrid" and shutil.which("crun"):
        assert not probes["crun"].works
        assert "hybrid" in probes["crun"].reason
    assert not list((state_dir / "probe" / "runtimes").glob("bh-probe-*"))


def test_it_knows_how_cgroups_are_mounted():
    assert cgroup_mode() in ("v1", "v2", "hybrid")


# --------------------------------------------------------------------------- pure logic


def test_it_rejects_ids_that_could_escape_the_state_dir(runtime, image_layers):
    for bad_id in ("../etc", "Bh-UPPER", "a/b", "", "x" * 64, "_exits"):
        with pytest.raises(InvalidContainerSpec):
            runtime.create(spec_for(bad_id, image_layers, "true"))


def test_it_rejects_lower_dirs_that_would_confuse_overlayfs(runtime, image_layers, new_id):
    with pytest.raises(InvalidContainerSpec):
        runtime.create(spec_for(new_id(), [image_layers[0] + ",upperdir=/"], "true"))


def test_it_resolves_user_names_and_groups_from_the_image(image_layers):
    base = Path(image_layers[1])

    assert resolve_user(base, "app").additional_gids == (1000, 50)
    assert (resolve_user(base, "app:staff").uid, resolve_user(base, "app:staff").gid) == (1000, 50)
    assert (resolve_user(base, "0").uid, resolve_user(base, "0").gid) == (0, 0)
    with pytest.raises(InvalidContainerSpec):
        resolve_user(base, "ghost")


def test_it_never_reads_host_files_through_an_image_symlink(tmp_path):
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc/passwd").symlink_to("/etc/passwd")  # absolute: must stay inside the image
    (image / "etc/group").symlink_to("../../../../../../etc/group")

    with pytest.raises(InvalidContainerSpec):
        resolve_user(image, "root")


def test_it_does_not_open_a_fifo_posing_as_passwd(tmp_path):
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    os.mkfifo(image / "etc/passwd")  # reading it would block forever

    assert resolve_user(image, "0").uid == 0
    with pytest.raises(InvalidContainerSpec):
        resolve_user(image, "app")


def test_it_builds_the_oci_config_from_the_spec():
    spec = ContainerSpec(
        container_id="bht-config",
        lower_dirs=["/x"],
        args=["app"],
        vcpus=0.25,
        memory_mib=100,
        pids_limit=10,
        netns_path="/var/run/netns/bht-x",
    )
    config = build_oci_config(
        spec,
        user=ResolvedUser(uid=5, gid=6),
        bundle=Path("/b"),
        cgroups_path="/bulkhead/bht-config",
        cgroup_mode="hybrid",
    )

    resources = config["linux"]["resources"]
    assert resources["memory"]["limit"] == 100 * 1024 * 1024
    assert resources["cpu"] == {"quota": 25_000, "period": 100_000}
    assert resources["pids"] == {"limit": 10}
    assert {"type": "network", "path": "/var/run/netns/bht-x"} in config["linux"]["namespaces"]
    assert config["process"]["capabilities"]["bounding"] == list(DOCKER_DEFAULT_CAPABILITIES)
    assert config["process"]["noNewPrivileges"] is True
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert config["linux"]["cgroupsPath"] == "/bulkhead/bht-config"
    assert "/proc/kcore" in config["linux"]["maskedPaths"]


def test_it_turns_the_k8s_file_log_back_into_output():
    raw = (
        b"2026-01-01T00:00:00.1+00:00 stdout P hel\n"
        b"2026-01-01T00:00:00.2+00:00 stdout F lo\n"
        b"2026-01-01T00:00:00.3+00:00 stderr F err\n"
    )

    assert parse_k8s_log(raw) == b"hello\nerr\n"
    assert parse_k8s_log(raw, ["stderr"]) == b"err\n"
