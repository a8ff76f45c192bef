"""The micro-VM runtime against the real libvirtd, QEMU (TCG here) and the project's guest.

Each boot costs seconds of emulated CPU, so the module boots its few VMs together up front and the
tests then look at them: a one-shot workload per root disk format (EROFS, ext4), a long `sleep` to
stop gracefully and to re-adopt, and one whose QEMU gets killed from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None or shutil.which("libvirtd") is None,
    reason="needs root, QEMU and libvirtd",
)

libvirt = pytest.importorskip("libvirt")

from compute.guest.build import GuestArtifacts, ensure_guest  # noqa: E402
from compute.runtimes.libvirt import (  # noqa: E402
    InvalidVmSpec,
    VmEvent,
    VmNetwork,
    VmRuntime,
    VmSpec,
    WorkloadPayload,
    domain_xml,
    extract_workload_output,
    kernel_cmdline,
    unpack_exported_changes,
)
from compute.runtimes.libvirtd import domain_type_for_host, ensure_libvirtd  # noqa: E402
from imaging.store import LayerStore  # noqa: E402

try:
    from tests.compute.guestroot import build_busybox_root, build_root_disk
except ImportError:  # run without the repository root on sys.path
    from guestroot import build_busybox_root, build_root_disk  # type: ignore[no-redef]

BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine: a boot usually takes 3-10 s
TEST_PREFIX = "bht-vm-"

# The workload prints only what a container would print too; `uname -r` comes last.
PARITY_SCRIPT = (
    'echo hello; echo "$GREETING"; id; pwd; env | sort; ls /; cat /etc/image-release; '
    'echo "written by the vm" > /srv/work/new.txt; uname -r; exit 3'
)
PARITY_ENV = ("PATH=/usr/bin:/bin", "GREETING=hi there", "EMPTY=", "MULTI=two\nlines")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Lab:
    """The module's shared world: guest, disks, one runtime, the VMs it booted and the events seen."""

    guest: GuestArtifacts
    work: Path
    runtime: VmRuntime
    erofs_disk: Path
    ext4_disk: Path
    image_root: Path
    store: LayerStore
    events: list[VmEvent] = field(default_factory=list)
    created: list[uuid.UUID] = field(default_factory=list)
    vms: dict[str, uuid.UUID] = field(default_factory=dict)
    specs: dict[str, VmSpec] = field(default_factory=dict)
    events_lock: threading.Lock = field(default_factory=threading.Lock)

    def spec(self, payload: WorkloadPayload, *, root_disk: Path | None = None, **overrides: object) -> VmSpec:
        vm_id = uuid.uuid4()
        spec = VmSpec(
            vm_id=vm_id,
            vcpus=1,
            memory_mib=192,
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            root_disk=root_disk or self.erofs_disk,
            rw_disk=self.work / "disks" / f"{vm_id}.ext4",
            console_log=self.work / "logs" / f"{vm_id}.log",
            payload=payload,
            rw_disk_size_mib=256,
            domain_type=domain_type_for_host(),  # type: ignore[arg-type]
        )
        return replace(spec, **overrides)  # type: ignore[arg-type]

    def boot(self, name: str, spec: VmSpec) -> uuid.UUID:
        self.created.append(spec.vm_id)
        self.runtime.create(spec)
        self.runtime.start(spec.vm_id)
        self.vms[name] = spec.vm_id
        self.specs[name] = spec
        return spec.vm_id

    def exported_upper(self, vm_id: uuid.UUID) -> Path:
        """The VM's exported changes, taken in through a scratch layer store as the agent does."""
        return unpack_exported_changes(
            self.runtime.exported_changes(vm_id), self.store, lease_name=f"test-{vm_id}"
        )

    def events_of(self, vm_id: uuid.UUID) -> list[VmEvent]:
        with self.events_lock:
            return [event for event in self.events if event.vm_id == vm_id]

    def wait_stopped(self, vm_id: uuid.UUID, timeout: float = BOOT_TIMEOUT) -> None:
        wait_until(lambda: self.runtime.state(vm_id).status != "running", timeout, f"VM {vm_id} to stop")

    def wait_console(self, vm_id: uuid.UUID, text: bytes, timeout: float = BOOT_TIMEOUT) -> None:
        wait_until(lambda: text in self.runtime.console_log(vm_id), timeout, f"{text!r} on the console")


def _remove_leftovers_of_killed_runs(min_age_seconds: float = 1800) -> None:
    """Domains and temp dirs of an earlier run of this module that was killed before its teardown.

    Only dirs older than a run could ever take, so that a concurrent run of this module is left alone.
    """
    cutoff = time.time() - min_age_seconds
    stale_dirs = [
        path
        for path in Path(tempfile.gettempdir()).glob(f"{TEST_PREFIX}*")
        if path.is_dir() and path.stat().st_mtime < cutoff
    ]
    if not stale_dirs:
        return
    connection = libvirt.open("qemu:///system")
    try:
        for domain in connection.listAllDomains():
            xml = domain.XMLDesc(0)
            if domain.name().startswith("bh-") and any(f"{stale}/" in xml for stale in stale_dirs):
                with contextlib.suppress(libvirt.libvirtError):
                    if domain.isActive():
                        domain.destroy()
                    domain.undefine()
    finally:
        connection.close()
    for stale in stale_dirs:
        for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
            target = mount.split()[1]
            if target.startswith(f"{stale}/"):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(stale, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ensure_libvirtd()
    _remove_leftovers_of_killed_runs()
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix=TEST_PREFIX))
    runtime: VmRuntime | None = None
    lab: Lab | None = None
    try:
        # QEMU runs as an unprivileged user: it must be able to reach the disks under here.
        work.chmod(0o755)
        (work / "disks").mkdir()
        (work / "logs").mkdir()
        image_root = build_busybox_root(work / "image")
        runtime = VmRuntime(state_dir=work / "state")
        lab = Lab(
            guest=guest,
            work=work,
            runtime=runtime,
            erofs_disk=build_root_disk(image_root, work / "root.erofs", "erofs"),
            ext4_disk=build_root_disk(image_root, work / "root.ext4", "ext4"),
            image_root=image_root,
            store=LayerStore(work / "store", durable=False),
        )
        events, events_lock = lab.events, lab.events_lock

        def record(event: VmEvent) -> None:
            with events_lock:
                events.append(event)

        runtime.register_event_callback(record)
        # Boot everything at once: the tests below only look at these VMs.
        parity = WorkloadPayload(
            args=("sh", "-c", PARITY_SCRIPT), env=PARITY_ENV, cwd="/srv/work", uid=1000, gid=1000
        )
        lab.boot("erofs", lab.spec(parity))
        changes = WorkloadPayload(
            args=(
                "sh",
                "-c",
                "rm /srv/data/doomed.txt && echo new > /root/made.txt && hostname && "
                "ip -4 -o addr show dev eth0 | tr -s ' ' | cut -d ' ' -f 2,4",
            ),
            env=("PATH=/bin",),
        )
        lab.boot(
            "ext4",
            lab.spec(
                changes,
                root_disk=lab.ext4_disk,
                hostname="bht-guest",
                network=VmNetwork(
                    mac="52:54:00:bb:00:01",
                    bridge=_ensure_test_bridge(),
                    ipv4_cidr="10.213.7.5/24",
                    gateway="10.213.7.1",
                ),
            ),
        )
        sleeper = WorkloadPayload(args=("sleep", "600"), env=("PATH=/bin",))
        lab.boot("sleeper", lab.spec(sleeper))
        lab.boot("victim", lab.spec(sleeper))
        lab.boot("interactive", lab.spec(WorkloadPayload(args=("sh",), env=("PATH=/bin",), tty=True)))
        yield lab
    finally:
        if runtime is not None:
            for vm_id in {*(lab.created if lab else []), *runtime.list_ids()}:
                with contextlib.suppress(Exception):
                    runtime.delete(vm_id)
            runtime.close()
        _remove_test_bridge()
        shutil.rmtree(work, ignore_errors=True)


# Unique per run (15 characters at most), so that concurrent runs never share or remove each other's.
TEST_BRIDGE = f"bht-vb{uuid.uuid4().hex[:8]}"


def _ensure_test_bridge() -> str:
    if not Path("/sys/class/net", TEST_BRIDGE).exists():
        subprocess.run(["ip", "link", "add", TEST_BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", TEST_BRIDGE, "up"], check=True)
    return TEST_BRIDGE


def _remove_test_bridge() -> None:
    subprocess.run(["ip", "link", "del", TEST_BRIDGE], check=False, capture_output=True)


# ------------------------------------------------------------------------------------------ pure logic


def test_it_builds_domain_xml_without_user_text() -> None:
    spec = VmSpec(
        vm_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
        vcpus=2,
        memory_mib=256,
        kernel=Path("/k"),
        initrd=Path("/i"),
        root_disk=Path("/r"),
        rw_disk=Path("/w"),
        console_log=Path("/c"),
        payload=WorkloadPayload(args=("sh", "-c", "</domain><INJECTED/> $(halt-now)"), env=("XVAR=<y>",)),
    )
    xml = domain_xml(spec, qemu_uid=1, qemu_gid=2)
    assert "INJECTED" not in xml and "halt-now" not in xml and "XVAR" not in xml
    assert "<name>bh-00000000-0000-4000-8000-000000000001</name>" in xml
    assert '<memballoon model="none" />' in xml
    assert "graphics" not in xml and "video" not in xml
    assert kernel_cmdline(spec).split() == [
        "console=ttyS0",
        "quiet",
        "loglevel=1",
        "panic=-1",
        "no_timer_check",
    ]


def test_it_refuses_values_it_cannot_pass_safely() -> None:
    base = VmSpec(
        vm_id=uuid.uuid4(),
        vcpus=1,
        memory_mib=128,
        kernel=Path("/k"),
        initrd=Path("/i"),
        root_disk=Path("/r"),
        rw_disk=Path("/w"),
        console_log=Path("/c"),
        payload=WorkloadPayload(args=("true",)),
    )
    bad_specs = [
        replace(base, payload=WorkloadPayload(args=())),
        replace(base, payload=WorkloadPayload(args=("a\0b",))),
        replace(base, payload=WorkloadPayload(args=("true",), env=("1X=y",))),
        replace(base, payload=WorkloadPayload(args=("true",), env=("NOEQUALS",))),
        replace(base, payload=WorkloadPayload(args=("true",), cwd="relative")),
        replace(base, hostname="Bad Host"),
        replace(base, network=VmNetwork(mac="52:54:00:00:00:01", bridge="br0", ipv4_cidr="10.0.0.5/24 x=1")),
        replace(base, network=VmNetwork(mac="not-a-mac", bridge="br0", ipv4_cidr="10.0.0.5/24")),
        replace(base, memory_mib=1),
    ]
    for spec in bad_specs:
        with pytest.raises(InvalidVmSpec):
            domain_xml(spec, qemu_uid=0, qemu_gid=0)


def test_it_separates_workload_output_from_the_console_noise() -> None:
    console = (
        b"[    0.1] kernel noise\r\nBULKHEAD-INIT\r\nBULKHEAD-START ab12\r\nline one\r\n"
        b"carriage\r\r\nno newline at end\r\nBULKHEAD-EXIT ab12 7\r\n[    2.0] reboot: Power down\r\n"
    )
    assert extract_workload_output(console, "ab12") == b"line one\ncarriage\r\nno newline at end"


# ------------------------------------------------------------------------------------------ real VMs


def test_it_runs_the_workload_with_args_env_cwd_and_user(lab: Lab) -> None:
    vm_id = lab.vms["erofs"]
    lab.wait_stopped(vm_id)
    state = lab.runtime.state(vm_id)
    assert (state.status, state.exit_code) == ("stopped", 3)
    lines = lab.runtime.workload_output(vm_id).decode().splitlines()
    assert lines[:2] == ["hello", "hi there"]
    assert lines[2].startswith("uid=1000(app) gid=1000(app)") and lines[3] == "/srv/work"
    assert "GREETING=hi there" in lines and "MULTI=two" in lines and "EMPTY=" in lines
    assert "bulkhead test image" in lines


def test_it_reports_the_guest_kernel_not_the_hosts(lab: Lab) -> None:
    vm_id = lab.vms["erofs"]
    lab.wait_stopped(vm_id)
    guest_release = lab.runtime.workload_output(vm_id).decode().splitlines()[-1]
    assert guest_release == lab.guest.kernel_version
    assert guest_release != platform.release()


def test_it_prints_the_same_bytes_as_a_namespace_container(lab: Lab) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    vm_id = lab.vms["erofs"]
    lab.wait_stopped(vm_id)
    container_output = _run_in_runc(lab, ["sh", "-c", PARITY_SCRIPT], PARITY_ENV, "/srv/work", 1000, 1000)
    vm_output = lab.runtime.workload_output(vm_id)
    # Everything but the last line (the kernel release) is byte-identical.
    assert vm_output.rsplit(b"\n", 2)[0] == container_output.rsplit(b"\n", 2)[0]
    assert container_output.splitlines()[-1].decode() == platform.release()


def test_it_exports_written_files_as_a_layer_at_a_clean_stop(lab: Lab) -> None:
    vm_id = lab.vms["erofs"]
    lab.wait_stopped(vm_id)
    upper = lab.exported_upper(vm_id)
    written = upper / "srv/work/new.txt"
    assert written.read_text() == "written by the vm\n"
    assert sorted(path.name for path in upper.iterdir()) == ["srv"]


def test_it_boots_an_ext4_root_and_records_deletions_as_whiteouts(lab: Lab) -> None:
    vm_id = lab.vms["ext4"]
    lab.wait_stopped(vm_id)
    state = lab.runtime.state(vm_id)
    assert (state.status, state.exit_code) == ("stopped", 0), lab.runtime.console_log(vm_id)[-2000:]
    upper = lab.exported_upper(vm_id)
    whiteout = (upper / "srv/data/doomed.txt").lstat()
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0
    assert (upper / "root/made.txt").read_text() == "new\n"
    assert not (upper / "srv/data/old.txt").exists()


def test_it_configures_hostname_and_network_from_the_server_values(lab: Lab) -> None:
    vm_id = lab.vms["ext4"]
    lab.wait_stopped(vm_id)
    assert lab.runtime.workload_output(vm_id).decode().splitlines() == ["bht-guest", "eth0 10.213.7.5/24"]


def test_it_keeps_the_changes_when_a_stopped_vm_is_created_again_with_a_new_spec(lab: Lab) -> None:
    vm_id = lab.vms["ext4"]
    lab.wait_stopped(vm_id)
    again = replace(
        lab.specs["ext4"],
        payload=WorkloadPayload(
            args=("sh", "-c", "cat /root/made.txt; ls /srv/data; exit 5"), env=("PATH=/bin",)
        ),
    )
    lab.runtime.create(again)
    lab.runtime.start(vm_id)
    lab.wait_console(vm_id, b"BULKHEAD-START")
    lab.wait_stopped(vm_id)
    assert lab.runtime.state(vm_id).exit_code == 5
    assert lab.runtime.workload_output(vm_id) == b"new\nold.txt\n"


def test_it_readopts_a_running_vm_from_a_new_runtime(lab: Lab) -> None:
    vm_id = lab.vms["sleeper"]
    lab.wait_console(vm_id, b"BULKHEAD-START")
    adopter = VmRuntime(state_dir=lab.runtime.state_dir)
    try:
        assert vm_id in adopter.list_ids()
        state = adopter.state(vm_id)
        assert state.status == "running" and state.qemu_pid == lab.runtime.qemu_pid(vm_id)
        assert adopter.console_log_path(vm_id) == lab.runtime.console_log_path(vm_id)
    finally:
        adopter.close()


def test_it_stops_a_sleeping_vm_within_the_grace_period(lab: Lab) -> None:
    vm_id = lab.vms["sleeper"]
    lab.wait_console(vm_id, b"BULKHEAD-START")
    started = time.monotonic()
    state = lab.runtime.stop(vm_id, grace_seconds=30)
    assert time.monotonic() - started < 30
    # The ACPI power button reached the init, which passed TERM on to `sleep` (128 + 15).
    assert (state.status, state.exit_code, state.reason) == ("stopped", 143, "shutdown")


def test_it_reports_a_qemu_killed_from_outside(lab: Lab) -> None:
    vm_id = lab.vms["victim"]
    lab.wait_console(vm_id, b"BULKHEAD-START")
    pid = lab.runtime.qemu_pid(vm_id)
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(event.unexpected_stop for event in lab.events_of(vm_id)), 10, "the stopped event")
    assert time.monotonic() - killed_at < 10
    assert lab.runtime.state(vm_id).status == "failed"


def test_it_opens_an_interactive_console_stream(lab: Lab) -> None:
    vm_id = lab.vms["interactive"]
    lab.wait_console(vm_id, b"BULKHEAD-START")
    stream = lab.runtime.open_console(vm_id, nonblocking=True)
    try:
        command = b"echo console-$((6 * 7)); exit 7\n"
        deadline = time.monotonic() + BOOT_TIMEOUT
        while command and time.monotonic() < deadline:
            sent = stream.send(command)
            command = command[sent:] if sent > 0 else command
        received = b""
        while b"console-42" not in received and time.monotonic() < deadline:
            chunk = stream.recv(4096)
            if isinstance(chunk, bytes) and chunk:
                received += chunk
            elif chunk == b"" and lab.runtime.state(vm_id).status != "running":
                break  # the guest closed the console
            else:
                time.sleep(0.02)  # -2: nothing to read yet
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            stream.finish()
    assert b"console-42" in received
    lab.wait_stopped(vm_id)
    assert lab.runtime.state(vm_id).exit_code == 7


def test_it_deletes_domain_disk_and_qemu_process(lab: Lab) -> None:
    vm_id = lab.vms["victim"]
    rw_disk = lab.work / "disks" / f"{vm_id}.ext4"
    assert rw_disk.exists()
    lab.runtime.delete(vm_id)
    lab.runtime.delete(vm_id)  # idempotent
    assert vm_id not in lab.runtime.list_ids()
    assert not rw_disk.exists() and not (lab.runtime.state_dir / str(vm_id)).exists()
    names = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert f"bh-{vm_id}" not in names
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert f"bh-{vm_id}" not in processes


# ------------------------------------------------------------------------------------------ helpers


def _run_in_runc(lab: Lab, args: list[str], env: tuple[str, ...], cwd: str, uid: int, gid: int) -> bytes:
    """Run the workload in a plain runc container over the same image root; return its stdout+stderr."""
    bundle = lab.work / "runc-bundle"
    bundle.mkdir(exist_ok=True)
    rootfs = bundle / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    # cp -a keeps owners (the image's /srv/work belongs to the app user).
    subprocess.run(["cp", "-a", str(lab.image_root), str(rootfs)], check=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"].update(terminal=False, args=args, env=list(env), cwd=cwd, user={"uid": uid, "gid": gid})
    config["root"] = {"path": "rootfs", "readonly": False}
    config["hostname"] = "bht"
    config_path.write_text(json.dumps(config))
    container = f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run(
            ["runc", "run", "--bundle", str(bundle), container],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    finally:
        subprocess.run(["runc", "delete", "--force", container], capture_output=True, check=False)
    assert result.returncode == 3, result.stdout
    return result.stdout
