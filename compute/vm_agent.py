"""The agent's micro-VM side: the same workload rows, run by libvirt/QEMU from the same image layers.

The image's layers are flattened once per chain into a read-only root disk by the layer store; each VM
gets a writable disk whose overlay upper dir is its captured changes; the guest exports them at a clean
stop as a layer stream, which the host takes in like any untrusted layer (same form as a container's).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from compute import agent, network_agent
from compute.choices import Isolation, WorkloadState
from compute.hosts import host_state_dir
from compute.models import Host, Workload
from compute.runtimes.libvirt import (
    ChangesNotExported,
    VmNotFound,
    VmRuntime,
    VmSpec,
    VmVolume,
    WorkloadPayload,
    unpack_exported_changes,
)
from portal.errors import Conflict, tenant_message
from portal.failpoints import failpoint

log = logging.getLogger(__name__)

_runtimes: dict[Any, VmRuntime] = {}
_runtimes_lock = threading.Lock()


def vm_runtime(host: Host) -> VmRuntime:
    """One libvirt connection per agent process and host."""
    with _runtimes_lock:
        runtime = _runtimes.get(host.pk)
        if runtime is None:
            from compute.runtimes.libvirtd import ensure_libvirtd

            ensure_libvirtd()
            runtime = VmRuntime(state_dir=host_state_dir(host) / "vms")
            _runtimes[host.pk] = runtime
        return runtime


def guest() -> Any:
    from compute.guest.build import ensure_guest

    return ensure_guest(Path(settings.BULKHEAD_GUEST_DIR))


def resolve_numeric_user(workload: Workload, lower_dirs: list[str]) -> tuple[int, int]:
    """uid:gid for the guest: numeric as given, names looked up in the image's /etc files."""
    from compute.runtimes.oci import resolve_user

    user = workload.user or (workload.image.config or {}).get("user") or "0:0"
    name, _, group = user.partition(":")
    if name.isdigit() and (not group or group.isdigit()):
        return int(name), int(group or 0)
    for layer_dir in lower_dirs:  # top-most first: the first layer holding /etc/passwd wins
        if (Path(layer_dir) / "etc" / "passwd").is_file():
            resolved = resolve_user(Path(layer_dir), user)
            return resolved.uid, resolved.gid
    raise ValueError(f"user {user!r} is not in the image's /etc/passwd")


def vm_spec(workload: Workload, progress: agent.Progress) -> VmSpec:
    assert workload.host is not None
    lower_dirs = agent.ensure_layers(workload, progress)
    progress(40, "Building the root disk")
    diff_ids = [layer.diff_id for layer in agent.image_layers(workload)]
    root_disk = agent.store().build_disk(diff_ids)
    artifacts = guest()
    uid, gid = resolve_numeric_user(workload, lower_dirs)
    vm_dir = host_state_dir(workload.host) / "vms"
    config = workload.image.config or {}
    from volumes.agent import volume_paths  # volumes builds on compute

    volumes = tuple(
        VmVolume(source=Path(m["source"]), tag=m["tag"], path=m["path"], read_only=m["read_only"])
        for m in volume_paths(workload)
    )
    return VmSpec(
        vm_id=workload.pk,
        vcpus=int(workload.vcpus),
        memory_mib=workload.memory_mib,
        kernel=artifacts.kernel,
        initrd=artifacts.initrd,
        root_disk=root_disk,
        rw_disk=vm_dir / f"{workload.pk}.rw.ext4",
        rw_disk_size_mib=workload.disk_gib * 1024,  # a sparse file: its size is the guest's limit
        console_log=vm_dir / f"{workload.pk}.console.log",
        payload=WorkloadPayload(
            args=tuple(agent.process_args(workload)),
            env=tuple(agent.process_env(workload)),
            cwd=workload.workdir or config.get("workdir") or "/",
            uid=uid,
            gid=gid,
            volumes=tuple((v.tag, v.path, v.read_only) for v in volumes),
        ),
        volumes=volumes,
        hostname=None,
        network=network_agent.vm_network(workload),  # issue 7: a tap on its compartment's bridge
        domain_type=workload.host.domain_type,  # type: ignore[arg-type]
    )


def ensure_running(workload: Workload, progress: agent.Progress) -> str:
    assert workload.host is not None
    runtime = vm_runtime(workload.host)
    try:
        state = runtime.state(workload.pk)
    except VmNotFound:
        state = None
    if state is not None and state.status == "running":
        _attach_network(runtime, workload)  # issue 7: in case the agent died between start and attach
        agent.transition(
            workload,
            [WorkloadState.PENDING, WorkloadState.CREATING, WorkloadState.UNKNOWN],
            state=WorkloadState.RUNNING,
        )
        return WorkloadState.RUNNING
    if not agent.transition(
        workload,
        [WorkloadState.PENDING, WorkloadState.STOPPED, WorkloadState.FAILED, WorkloadState.UNKNOWN],
        state=WorkloadState.CREATING,
        status_message="",
    ):
        return str(Workload.objects.values_list("state", flat=True).get(pk=workload.pk))
    progress(10, "Preparing the image")
    try:
        # A VM that ran before is defined again over the same writable disk: its changes stay.
        spec = vm_spec(workload, progress)
        progress(60, "Defining the VM", force=True)  # slow steps always show
        failpoint("vm.defining")
        runtime.create(spec)
        progress(70, "Booting the micro-VM", force=True)
        failpoint("vm.booting")
        runtime.start(workload.pk)
        _attach_network(runtime, workload)  # issue 7: the tap into a netns host's compartment bridge
    except Exception as exc:
        agent.transition(
            workload,
            [WorkloadState.CREATING],
            state=WorkloadState.FAILED,
            status_message=tenant_message(exc)[:500],
        )
        raise
    agent.transition(
        workload,
        [WorkloadState.CREATING],
        state=WorkloadState.RUNNING,
        started_at=timezone.now(),
        finished_at=None,
        exit_code=None,
    )
    return WorkloadState.RUNNING


def _attach_network(runtime: VmRuntime, workload: Workload) -> None:
    """Issue 7: move the VM's tap onto its compartment's bridge in a netns host (no-op elsewhere).

    A VM that cannot be attached is stopped (a running VM without its network would look healthy); one
    that already powered off lost its tap with QEMU, which is no error: handle_exits records the exit.
    """
    try:
        network_agent.attach_vm(workload)
    except Exception:
        try:
            running = runtime.state(workload.pk).status == "running"
        except VmNotFound:
            running = False
        if running:
            runtime.stop(workload.pk, grace_seconds=0)
            raise


def stop(workload: Workload, grace_seconds: float) -> None:
    assert workload.host is not None
    agent.transition(
        workload,
        [WorkloadState.RUNNING, WorkloadState.CREATING, WorkloadState.UNKNOWN],
        state=WorkloadState.STOPPING,
    )
    failpoint("vm.stopping")
    try:
        state = vm_runtime(workload.host).stop(workload.pk, grace_seconds=grace_seconds)
        code = state.exit_code
    except VmNotFound:
        code = None
    agent.record_exit(
        workload, code, expected=[WorkloadState.STOPPING, WorkloadState.RUNNING], requested=True
    )


def remove(workload: Workload, grace_seconds: float) -> None:
    assert workload.host is not None
    runtime = vm_runtime(workload.host)
    try:
        if runtime.state(workload.pk).status == "running":
            runtime.stop(workload.pk, grace_seconds=grace_seconds)
    except VmNotFound:
        network_agent.release_vm(workload)
        return
    failpoint("vm.deleting")
    runtime.delete(workload.pk)
    network_agent.release_vm(workload)  # issue 7: no tap left in a netns host's namespace


def stats(workload: Workload) -> dict[str, int]:
    assert workload.host is not None
    try:
        return vm_runtime(workload.host).stats(workload.pk)
    except VmNotFound:
        return {}


def logs(workload: Workload, tail_bytes: int) -> bytes:
    assert workload.host is not None
    try:
        return vm_runtime(workload.host).workload_output(workload.pk)[-tail_bytes:]
    except VmNotFound:
        return b""


def upper_dir(workload: Workload) -> Path:
    """The changes the guest exported at its last clean stop, taken in as an untrusted layer.

    Never the writable disk itself: that filesystem is the guest's (see compute/runtimes/libvirt.py).
    """
    assert workload.host is not None
    from imaging.store import LimitExceeded, UnsafeEntry

    try:
        exported = vm_runtime(workload.host).exported_changes(workload.pk)
        return unpack_exported_changes(exported, agent.store(), lease_name=f"vm-changes-{workload.pk}")
    except VmNotFound:
        raise Conflict("The micro-VM has no changes on its host.") from None
    except ChangesNotExported:
        raise Conflict(
            "The changes of a micro-VM are exported when it stops cleanly: stop it (or let it finish) first."
        ) from None
    except UnsafeEntry as error:
        reason = f"{error.reason} ({error.path})"
        raise Conflict(f"The micro-VM's exported changes were refused: {reason}.") from None
    except LimitExceeded as error:
        raise Conflict(f"The micro-VM's exported changes were refused: {error}.") from None


def resync(host: Host, report: dict[str, list[str]]) -> None:
    """After an agent (re)start: finish what a killed agent or worker left half-done on this host's
    micro-VMs. A creation cut short runs again (the create is what was asked), a deletion completes,
    a stop is recorded; a workload whose lock a live task holds is left to it."""
    half_done = [
        WorkloadState.PENDING,
        WorkloadState.CREATING,
        WorkloadState.STOPPING,
        WorkloadState.DELETING,
    ]
    for workload in Workload.objects.select_related("host", "image", "tenant").filter(
        host=host, isolation=Isolation.MICROVM, state__in=half_done
    ):
        with agent.workload_lock(workload, blocking=False) as mine:
            if not mine:
                report.setdefault("busy", []).append(str(workload.pk))
                continue
            current = agent.load(workload.pk)
            if current is not None and current.state in half_done:
                try:
                    _resync_one(current, report)
                except Exception:
                    log.exception("re-sync of micro-VM %s failed", current.pk)
                    agent.transition(
                        current,
                        [WorkloadState.CREATING, WorkloadState.PENDING],
                        state=WorkloadState.FAILED,
                        status_message="its creation was interrupted and could not be finished",
                    )


def _resync_one(workload: Workload, report: dict[str, list[str]]) -> None:
    assert workload.host is not None
    runtime = vm_runtime(workload.host)
    if workload.state == WorkloadState.DELETING:
        remove(workload, grace_seconds=5)
        from compute.services import forget_workload

        forget_workload(workload.pk)
        report["deleted"].append(str(workload.pk))
        return
    try:
        status: str = runtime.state(workload.pk).status
    except VmNotFound:
        status = "absent"
    if workload.state == WorkloadState.STOPPING:
        if status == "running":
            stop(workload, grace_seconds=5)
        else:
            agent.record_exit(workload, None, expected=[WorkloadState.STOPPING], requested=True)
        report["exited"].append(str(workload.pk))
        return
    if workload.state == WorkloadState.PENDING and not workload.desired_running:
        agent.transition(workload, [WorkloadState.PENDING], state=WorkloadState.STOPPED)
        return
    if status != "running":
        # A creation cut short (while defining or booting): it runs again from the start.
        Workload.objects.filter(pk=workload.pk, state=WorkloadState.CREATING).update(
            state=WorkloadState.PENDING
        )
        workload.refresh_from_db()
    ensure_running(workload, agent._noop_progress)  # a running domain is adopted as it is
    report["resumed"].append(str(workload.pk))


def handle_exits(host: Host) -> list[str]:
    """Record the end of every running micro-VM of this host that powered off or died."""
    handled: list[str] = []
    running = Workload.objects.select_related("host", "image", "tenant").filter(
        host=host, isolation=Isolation.MICROVM, state__in=[WorkloadState.RUNNING, WorkloadState.UNKNOWN]
    )
    if not running:
        return handled
    runtime = vm_runtime(host)
    for workload in running:
        try:
            state = runtime.state(workload.pk)
        except VmNotFound:
            agent.transition(
                workload, [workload.state], state=WorkloadState.FAILED, status_message="not found on the host"
            )
            continue
        if state.status == "running":
            if workload.state == WorkloadState.UNKNOWN:
                agent.transition(workload, [WorkloadState.UNKNOWN], state=WorkloadState.RUNNING)
            continue
        code = state.exit_code
        if state.status == "failed":
            agent.transition(
                workload,
                [WorkloadState.RUNNING, WorkloadState.UNKNOWN],
                state=WorkloadState.FAILED,
                exit_code=code,
                finished_at=timezone.now(),
                status_message=f"the VM stopped unexpectedly ({state.reason})",
            )
        else:
            agent.record_exit(workload, code, expected=[WorkloadState.RUNNING, WorkloadState.UNKNOWN])
        handled.append(str(workload.pk))
        workload.refresh_from_db()
        if agent.wants_restart(workload, code):
            from django.db.models import F

            Workload.objects.filter(pk=workload.pk).update(restart_count=F("restart_count") + 1)
            try:
                ensure_running(workload, agent._noop_progress)
            except Exception:
                log.exception("restart of %s failed", workload.pk)
    return handled
