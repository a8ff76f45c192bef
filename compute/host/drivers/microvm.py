"""Micro-VMs: the same specs, run by libvirt/QEMU from the same image layers.

The image's layers are flattened once per chain into a read-only root disk by the layer store; each VM
gets a writable disk whose overlay upper dir is its captured changes; the guest exports them at a clean
stop as a layer stream, which the host takes in like any untrusted layer (same form as a container's).
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from compute.host import layers, mounts, network, reports
from compute.host import spec as s
from compute.host.context import HostContext, Progress, noop_progress
from compute.host.drivers import CreatedAhead
from compute.host.drivers.container import SpecProblem
from compute.host.link import HostApiError
from compute.host.locks import workload_lock
from compute.host.spec import WorkloadSpec
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

_runtimes: dict[str, VmRuntime] = {}
_runtimes_lock = threading.Lock()

# States a re-sync finishes (a creation, a stop or a deletion cut short).
HALF_DONE = [s.PENDING, s.CREATING, s.STOPPING, s.DELETING]


def vm_runtime(ctx: HostContext) -> VmRuntime:
    """One libvirt connection per agent process and host."""
    with _runtimes_lock:
        runtime = _runtimes.get(ctx.host_id)
        if runtime is None:
            from compute.runtimes.libvirtd import ensure_libvirtd

            ensure_libvirtd()
            runtime = VmRuntime(state_dir=ctx.state_dir / "vms")
            _runtimes[ctx.host_id] = runtime
        return runtime


def guest(ctx: HostContext) -> Any:
    from compute.guest.build import ensure_guest

    return ensure_guest(ctx.local.guest_dir)


def resolve_numeric_user(user: str, lower_dirs: list[str]) -> tuple[int, int]:
    """uid:gid for the guest: numeric as given, names looked up in the image's /etc files."""
    from compute.runtimes.oci import resolve_user

    name, _, group = user.partition(":")
    if name.isdigit() and (not group or group.isdigit()):
        return int(name), int(group or 0)
    for layer_dir in lower_dirs:  # top-most first: the first layer holding /etc/passwd wins
        if (Path(layer_dir) / "etc" / "passwd").is_file():
            resolved = resolve_user(Path(layer_dir), user)
            return resolved.uid, resolved.gid
    raise ValueError(f"user {user!r} is not in the image's /etc/passwd")


def vm_spec(ctx: HostContext, spec: WorkloadSpec, progress: Progress) -> VmSpec:
    process = spec.process
    if process.problem or process.args is None or process.env is None:
        raise SpecProblem(process.problem or "The workload has no command.")
    lower_dirs = layers.ensure_layers(ctx, spec, progress)
    progress(40, "Building the root disk")
    root_disk = ctx.store().build_disk([layer.diff_id for layer in spec.layers])
    artifacts = guest(ctx)
    uid, gid = resolve_numeric_user(process.user, lower_dirs)
    vm_dir = ctx.state_dir / "vms"
    volumes = tuple(
        VmVolume(source=v.source, tag=v.tag, path=v.path, read_only=v.read_only)
        for v in mounts.volume_sources(ctx, spec)
    )
    return VmSpec(
        vm_id=spec.id,
        vcpus=int(spec.limits.vcpus),
        memory_mib=spec.limits.memory_mib,
        kernel=artifacts.kernel,
        initrd=artifacts.initrd,
        root_disk=root_disk,
        rw_disk=vm_dir / f"{spec.id}.rw.ext4",
        rw_disk_size_mib=spec.limits.disk_gib * 1024,  # a sparse file: its size is the guest's limit
        console_log=vm_dir / f"{spec.id}.console.log",
        payload=WorkloadPayload(
            args=tuple(process.args),
            env=tuple(process.env),
            cwd=process.cwd,
            uid=uid,
            gid=gid,
            volumes=tuple((v.tag, v.path, v.read_only) for v in volumes),
        ),
        volumes=volumes,
        hostname=None,
        network=network.vm_network(ctx, spec),  # issue 7: a tap on its compartment's bridge
        domain_type=ctx.profile.domain_type,  # type: ignore[arg-type]
    )


def _vm_id(spec: Any) -> uuid.UUID:
    value = spec.id if hasattr(spec, "id") else spec.pk
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


class MicroVmDriver:
    isolation = s.MICROVM

    def __init__(self) -> None:
        # Ends already looked at (vm id -> libvirt's state and reason): not asked about again.
        self._examined: dict[uuid.UUID, tuple[str, str]] = {}

    def ensure_running(
        self,
        ctx: HostContext,
        spec: WorkloadSpec,
        progress: Progress,
        *,
        first_start: bool = False,
        creating_reported: bool = False,
        ahead: CreatedAhead | None = None,
    ) -> str:
        runtime = vm_runtime(ctx)
        try:
            state = runtime.state(spec.id)
        except VmNotFound:
            state = None
        if state is not None and state.status == "running":
            self._attach_network(ctx, runtime, spec)  # in case the agent died between start and attach
            reports.transition(ctx, spec, [s.PENDING, s.CREATING, s.UNKNOWN], state=s.RUNNING)
            return s.RUNNING
        # `creating` too: the caller holds the workload's lock, so a creation found half-done was cut short.
        # (A VM that ran and ended is started again: a claim's report, `never_started`, did not apply.)
        if not creating_reported:
            claimed, seen = reports.report_creating(ctx, spec, first_start=False)
            if not claimed:
                return seen.state
        progress(10, "Preparing the image")
        try:
            # A VM that ran before is defined again over the same writable disk: its changes stay.
            definition = vm_spec(ctx, spec, progress)
            progress(60, "Defining the VM", force=True)  # slow steps always show
            failpoint("vm.defining")
            runtime.create(definition)
            progress(70, "Booting the micro-VM", force=True)
            failpoint("vm.booting")
            runtime.start(spec.id)
            self._attach_network(ctx, runtime, spec)
        except Exception as exc:
            reports.transition(
                ctx, spec, [s.CREATING], state=s.FAILED, status_message=tenant_message(exc)[:500]
            )
            raise
        reports.transition(
            ctx, spec, [s.CREATING], state=s.RUNNING, started_at=reports.NOW, finished_at=None, exit_code=None
        )
        return s.RUNNING

    def create_ahead(self, ctx: HostContext, sent: WorkloadSpec) -> CreatedAhead | None:
        """Nothing: a VM's root disk and definition are made after the claim (its boot, not its
        definition, is where a micro-VM's start goes)."""
        return None

    def discard_ahead(self, ctx: HostContext, ahead: CreatedAhead) -> None:
        return None

    def _attach_network(self, ctx: HostContext, runtime: VmRuntime, spec: WorkloadSpec) -> None:
        """Issue 7: move the VM's tap onto its compartment's bridge in a netns host (no-op elsewhere).

        A VM that cannot be attached is stopped (a running VM without its network would look healthy);
        one that already powered off lost its tap with QEMU, which is no error: the exit is recorded.
        """
        try:
            network.attach_vm(ctx, spec)
        except Exception:
            try:
                running = runtime.state(spec.id).status == "running"
            except VmNotFound:
                running = False
            if running:
                runtime.stop(spec.id, grace_seconds=0)
                raise

    def stop(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        reports.transition(ctx, spec, [s.RUNNING, s.CREATING, s.UNKNOWN], state=s.STOPPING)
        failpoint("vm.stopping")
        try:
            code = vm_runtime(ctx).stop(spec.id, grace_seconds=grace_seconds).exit_code
        except VmNotFound:
            code = None
        reports.record_exit(ctx, spec, code, expected=[s.STOPPING, s.RUNNING], requested=True)

    def remove(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        runtime = vm_runtime(ctx)
        try:
            if runtime.state(spec.id).status == "running":
                runtime.stop(spec.id, grace_seconds=grace_seconds)
        except VmNotFound:
            network.release_vm(ctx, spec)
            network.release(ctx, spec)
            return
        failpoint("vm.deleting")
        runtime.delete(spec.id)
        network.release_vm(ctx, spec)  # issue 7: no tap left in a netns host's namespace
        network.release(ctx, spec)  # and the host's network re-applied without it

    def shut_down(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        self.stop(ctx, spec, grace_seconds)

    def handle_exits(self, ctx: HostContext) -> list[str]:
        """Record the end of every running micro-VM of this host that powered off or died."""
        if not _libvirt_in_use(ctx):
            return []
        runtime = vm_runtime(ctx)
        ended: dict[uuid.UUID, tuple[str, str]] = {}
        for vm_id in runtime.list_ids():
            try:
                state = runtime.state(vm_id)
            except VmNotFound:
                continue
            if state.status == "running":
                self._examined.pop(vm_id, None)
                continue
            marker = (state.domain_state, state.reason)
            if self._examined.get(vm_id) != marker:
                ended[vm_id] = marker
        if not ended:
            return []
        by_id = {spec.id: spec for spec in ctx.specs() if spec.isolation == s.MICROVM}
        recorded = reports.record_ended(
            ctx, ended, by_id, self._examined, lambda spec: self._record_exit_and_restart(ctx, runtime, spec)
        )
        return [str(vm_id) for vm_id in recorded]

    def adopt_running(self, ctx: HostContext, specs: list[WorkloadSpec]) -> None:
        """A running micro-VM the portal calls `unknown` (its host was lost a while) is running."""
        unknown = [spec for spec in specs if spec.isolation == s.MICROVM and spec.state == s.UNKNOWN]
        if not unknown:
            return
        runtime = vm_runtime(ctx)
        for spec in unknown:
            try:
                if runtime.state(spec.id).status == "running":
                    reports.transition(ctx, spec, [s.UNKNOWN], state=s.RUNNING)
            except VmNotFound:
                continue

    def _record_exit_and_restart(self, ctx: HostContext, runtime: VmRuntime, spec: WorkloadSpec) -> bool:
        try:
            state = runtime.state(spec.id)
        except VmNotFound:
            reports.transition(
                ctx, spec, [s.RUNNING, s.UNKNOWN], state=s.FAILED, status_message="not found on the host"
            )
            return False
        if state.status == "running":
            return False
        code = state.exit_code
        if state.status == "failed":
            recorded, seen = reports.report(
                ctx,
                spec,
                [s.RUNNING, s.UNKNOWN],
                {
                    "state": s.FAILED,
                    "exit_code": code,
                    "finished_at": reports.NOW,
                    "status_message": f"the VM stopped unexpectedly ({state.reason})",
                },
            )
        else:
            recorded, seen = reports.record_exit(ctx, spec, code, expected=[s.RUNNING, s.UNKNOWN])
        if not recorded:
            return False
        reports.restart_if_wanted(ctx, seen, code, self.ensure_running)
        return True

    def resync(self, ctx: HostContext, specs: list[WorkloadSpec], report: dict[str, list[str]]) -> None:
        """Finish what a killed agent or worker left half-done on this host's micro-VMs. A creation cut
        short runs again (the create is what was asked), a deletion completes, a stop is recorded; a
        workload whose lock a live task holds is left to it."""
        for listed in specs:
            if listed.isolation != s.MICROVM or listed.state not in HALF_DONE:
                continue
            with workload_lock(ctx, listed.id, blocking=False) as free:
                if not free:
                    report.setdefault("busy", []).append(str(listed.id))
                    continue
                try:
                    current = ctx.spec(listed.id)
                except HostApiError:
                    continue
                if current.state not in HALF_DONE:
                    continue
                try:
                    self._resync_one(ctx, current, report)
                except Exception:
                    log.exception("re-sync of micro-VM %s failed", current.id)
                    reports.transition(
                        ctx,
                        current,
                        [s.CREATING, s.PENDING],
                        state=s.FAILED,
                        status_message="its creation was interrupted and could not be finished",
                    )

    def _resync_one(self, ctx: HostContext, spec: WorkloadSpec, report: dict[str, list[str]]) -> None:
        runtime = vm_runtime(ctx)
        if spec.state == s.DELETING:
            self.remove(ctx, spec, grace_seconds=5)
            reports.report_removed(ctx, spec)
            report["deleted"].append(str(spec.id))
            return
        try:
            status: str = runtime.state(spec.id).status
        except VmNotFound:
            status = "absent"
        if spec.state == s.STOPPING:
            if status == "running":
                self.stop(ctx, spec, grace_seconds=5)
            else:
                reports.record_exit(ctx, spec, None, expected=[s.STOPPING], requested=True)
            report["exited"].append(str(spec.id))
            return
        if spec.state == s.PENDING and not spec.desired_running:
            reports.transition(ctx, spec, [s.PENDING], state=s.STOPPED)
            return
        if status != "running":
            # A creation cut short (while defining or booting): it runs again from the start.
            _applied, spec = reports.report(ctx, spec, [s.CREATING], {"state": s.PENDING})
        self.ensure_running(ctx, spec, noop_progress)  # a running domain is adopted as it is
        report["resumed"].append(str(spec.id))

    # --- reads (for the portal's questions: `spec` is anything with the workload's `id`) -------------

    def logs(self, ctx: HostContext, spec: Any, tail_bytes: int) -> bytes:
        try:
            return vm_runtime(ctx).workload_output(_vm_id(spec))[-tail_bytes:]
        except VmNotFound:
            return b""

    def output_since(self, ctx: HostContext, spec: Any, position: int | None) -> tuple[bytes, int]:
        """``position`` is an offset in the console output."""
        from compute.host.drivers.container import OUTPUT_CHUNK_BYTES, OUTPUT_TAIL_BYTES

        output = self.logs(ctx, spec, 4 * 1024 * 1024)
        if position is None:
            position = max(0, len(output) - OUTPUT_TAIL_BYTES)
        elif len(output) < position:
            position = 0
        new = output[position : position + OUTPUT_CHUNK_BYTES]
        return new, position + len(new)

    def stats(self, ctx: HostContext, spec: Any) -> dict[str, Any]:
        try:
            return dict(vm_runtime(ctx).stats(_vm_id(spec)))
        except VmNotFound:
            return {}

    def upper_dir(self, ctx: HostContext, spec: Any) -> Path:
        """The changes the guest exported at its last clean stop, taken in as an untrusted layer.

        Never the writable disk itself: that filesystem is the guest's (see compute/runtimes/libvirt.py).
        """
        from imaging.store import LimitExceeded, UnsafeEntry

        vm_id = _vm_id(spec)
        try:
            exported = vm_runtime(ctx).exported_changes(vm_id)
            return unpack_exported_changes(exported, ctx.store(), lease_name=f"vm-changes-{vm_id}")
        except VmNotFound:
            raise Conflict("The micro-VM has no changes on its host.") from None
        except ChangesNotExported:
            raise Conflict(
                "The changes of a micro-VM are exported when it stops cleanly: "
                "stop it (or let it finish) first."
            ) from None
        except UnsafeEntry as error:
            reason = f"{error.reason} ({error.path})"
            raise Conflict(f"The micro-VM's exported changes were refused: {reason}.") from None
        except LimitExceeded as error:
            raise Conflict(f"The micro-VM's exported changes were refused: {error}.") from None

    def upper_id_shift(self, ctx: HostContext, spec: Any) -> tuple[int, int] | None:
        return None


def _libvirt_in_use(ctx: HostContext) -> bool:
    """Does this host run micro-VMs at all? (An agent that never ran one need not start libvirtd.)"""
    if ctx.host_id in _runtimes:
        return True
    vms = ctx.state_dir / "vms"
    return vms.is_dir() and any(vms.iterdir())


MICROVMS = MicroVmDriver()
