"""Namespace containers: the spec's image layers as an overlay, run by conmon + runc (or crun).

Every step is idempotent and every state change a conditional report, so a task delivered twice, or
run after the agent was killed half-way, converges instead of duplicating anything.
"""

from __future__ import annotations

import logging
from concurrent.futures import wait
from datetime import datetime
from pathlib import Path
from typing import Any

from compute.host import layers, mounts, network, reports
from compute.host import spec as s
from compute.host.context import HostContext, Progress, noop_progress
from compute.host.drivers import CreatedAhead
from compute.host.link import HostApiError
from compute.host.locks import workload_lock
from compute.host.spec import WorkloadSpec
from compute.runtimes import oci
from compute.runtimes.oci import ContainerNotFound, ContainerSpec, OciRuntime, VolumeMountSpec, parse_k8s_log
from portal.errors import Explained, tenant_message
from portal.failpoints import failpoint

log = logging.getLogger(__name__)

# What a first look at a workload's output shows, and the most one read returns.
OUTPUT_TAIL_BYTES = 64 * 1024
OUTPUT_CHUNK_BYTES = 256 * 1024


class SpecProblem(Explained):
    """The portal said why this workload cannot start (no command, a secret gone, a withdrawn right)."""


def oci_runtime(ctx: HostContext) -> OciRuntime:
    # A cgroup parent per host: two agents on one machine must not see each other's containers as leaks.
    return OciRuntime(
        ctx.profile.oci_runtime,
        state_dir=containers_dir(ctx),
        cgroup_parent=f"bulkhead-{uuid_hex(ctx.host_id)[:12]}",
        userns_pool=ctx.local.userns_pool,
    )


def containers_dir(ctx: HostContext) -> Path:
    return ctx.state_dir / "containers"


def drop_spare_disks(ctx: HostContext) -> list[int]:
    """Every disk formatted ahead for this host's next creates (asks nothing of the portal: the host
    may no longer be let in)."""
    return oci.drop_spare_disks(containers_dir(ctx))


def disk_bytes(spec: WorkloadSpec) -> int:
    return spec.limits.disk_gib * 1024**3


def uuid_hex(text: str) -> str:
    return text.replace("-", "")


def container_spec(
    ctx: HostContext,
    spec: WorkloadSpec,
    lower_dirs: list[str],
    net: network.ContainerNetwork | None = None,
) -> ContainerSpec:
    process = spec.process
    if process.problem or process.args is None or process.env is None:
        raise SpecProblem(process.problem or "The workload has no command.")
    return ContainerSpec(
        container_id=spec.runtime_id,
        lower_dirs=lower_dirs,
        args=process.args,
        env=process.env,
        cwd=process.cwd,
        user=process.user,
        hostname=spec.name,
        vcpus=spec.limits.vcpus,
        memory_mib=spec.limits.memory_mib,
        disk_bytes=disk_bytes(spec),
        # issue 7: a workload in a compartment joins the netns its agent attached to the bridge.
        netns_path=net.netns_path if net else None,
        dns_servers=net.dns_servers if net else (),
        ip_address=net.ip_address if net else None,
        # The portal says privileged only while the tenant still may run privileged containers.
        user_namespace=not spec.privileged,
        volumes=[
            VolumeMountSpec(source=str(v.source), path=v.path, read_only=v.read_only)
            for v in mounts.volume_sources(ctx, spec)
        ],
    )


def _create_while_attaching(
    ctx: HostContext,
    spec: WorkloadSpec,
    runtime: OciRuntime,
    lower_dirs: list[str],
    ahead: network.ContainerNetwork,
) -> network.ContainerNetwork:
    """Create the container (bundle, conmon, `runc create`: its process does not run before `start`) in
    its namespace while the host's network is realised and the namespace attached on another thread:
    the two took turns, and a second create waited for the first's network under the host's lock.
    Returns once both are done, with the network the container was made for; a network that failed
    leaves no container behind."""
    attaching = ctx.aside(f"attach-{spec.runtime_id}", lambda: network.ensure_container_network(ctx, spec))
    try:
        runtime.create(container_spec(ctx, spec, lower_dirs, ahead))
    except BaseException:
        wait([attaching])  # the host's network is not left half-applied behind a failed create
        raise
    try:
        net = attaching.result()
    except BaseException:
        runtime.delete(spec.runtime_id, keep_upper=True)
        raise
    if net is None:
        raise RuntimeError("the workload's network was not attached")  # it has one: ahead says so
    if net != ahead:  # the portal's gateway changed meanwhile: the config must say what is attached
        runtime.delete(spec.runtime_id, keep_upper=True)
        runtime.create(container_spec(ctx, spec, lower_dirs, net))
    return net


class ContainerDriver:
    isolation = s.NAMESPACE

    def __init__(self) -> None:
        # Exits already looked at (runtime id -> the container's finish time): not asked about again.
        self._examined: dict[str, datetime | None] = {}

    def create_ahead(self, ctx: HostContext, sent: WorkloadSpec) -> CreatedAhead | None:
        """Create the container (bundle, conmon, `runc create`: its process does not run before `start`)
        from the spec the create's message carried, before the claim is answered: the claim's round trip
        then costs nothing. In a compartment, its namespace is attached meanwhile, from the network the
        portal committed with the workload. Only where none of it is on the host yet (no kept changes
        either), its layers are unpacked here and it mounts no volume; None (nothing done) otherwise.
        The caller holds the workload's lock and, unless `ensure_running` starts it, removes it
        (`discard_ahead`)."""
        if sent.volumes or sent.process.problem:
            return None
        runtime = oci_runtime(ctx)
        if not runtime.is_absent(sent.runtime_id):
            return None
        lower_dirs = layers.present_lower_dirs(ctx, sent)
        if lower_dirs is None:
            return None
        try:
            unattached = container_spec(ctx, sent, lower_dirs)
        except SpecProblem:
            return None  # the claim's spec says so again, and the failure is reported then
        if sent.network is None:
            runtime.create(unattached)
            return CreatedAhead(sent, s.NAMESPACE, unattached)
        network_ahead = network.container_network_ahead(ctx, sent)
        if network_ahead is None:
            return None
        try:
            net = _create_while_attaching(ctx, sent, runtime, lower_dirs, network_ahead)
        except BaseException:
            network.release(ctx, sent)  # its namespace, made ahead
            raise
        return CreatedAhead(sent, s.NAMESPACE, container_spec(ctx, sent, lower_dirs, net), net)

    def discard_ahead(self, ctx: HostContext, ahead: CreatedAhead) -> None:
        """Remove a container created ahead that is not to be started (it never ran: nothing to keep),
        and its attachment to its compartment."""
        oci_runtime(ctx).delete(ahead.sent.runtime_id)
        if ahead.sent.network is not None:
            network.release(ctx, ahead.sent)

    @staticmethod
    def _agrees(ctx: HostContext, spec: WorkloadSpec, ahead: CreatedAhead) -> bool:
        """Whether the claim's spec would create exactly the container made ahead, on the same network."""
        if ahead.sent.runtime_id != spec.runtime_id or ahead.sent.network != spec.network or spec.volumes:
            return False
        lower_dirs = layers.present_lower_dirs(ctx, spec)
        if lower_dirs is None:
            return False
        try:
            return container_spec(ctx, spec, lower_dirs, ahead.network) == ahead.made
        except SpecProblem:
            return False

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
        """`first_start` (a create operation): only a workload that never ran is started. One that ran
        and ended meanwhile is left as it is: running it again is its restart policy's call.
        `creating_reported`: the operation's claim carried the `creating` report and it applied.
        `ahead`: a container `create_ahead` made (under the caller's lock) from the message's spec."""
        runtime = oci_runtime(ctx)
        if ahead is not None:
            ahead.handled = True
            if creating_reported and self._agrees(ctx, spec, ahead):
                return self._start_created(ctx, spec, runtime)
            # The portal's spec is not the message's (changed meanwhile), or it is not to start now.
            self.discard_ahead(ctx, ahead)
        state = runtime.state(spec.runtime_id)
        if state.status == "running":
            reports.transition(
                ctx, spec, [s.PENDING, s.CREATING, s.STOPPED, s.FAILED, s.UNKNOWN], state=s.RUNNING
            )
            return s.RUNNING
        # `creating` too: every caller holds the workload's lock, so a creation found half-done was cut
        # short (its process died: killed, or lost to a signal) and is taken over, never reported done.
        if not creating_reported:
            claimed, seen = reports.report_creating(ctx, spec, first_start=first_start)
            if not claimed:
                # Ran and ended meanwhile (first_start), or is being stopped or deleted: not ours to start.
                return seen.state
        failpoint("create.claimed")
        # Progress only around slow steps: with the layers on the host a start takes less than the
        # progress interval, and a report would be one more write and event for nothing.
        unpacked = False

        def unpacking(percent: float, message: str = "", **options: Any) -> None:
            nonlocal unpacked
            unpacked = True
            progress(percent, message, **options)

        try:
            lower_dirs = layers.ensure_layers(ctx, spec, unpacking)
            failpoint("create.layers")
            if state.status != "absent":
                # A stopped container (or one a killed agent left half-made) is recreated from scratch,
                # keeping its upper dir: the captured changes survive a restart.
                runtime.delete(spec.runtime_id, keep_upper=True)
            if unpacked:
                progress(60, "Starting the container")
            network_ahead = network.container_network_ahead(ctx, spec)
            if network_ahead is None:
                net = network.ensure_container_network(ctx, spec)
                runtime.create(container_spec(ctx, spec, lower_dirs, net))
            else:
                _create_while_attaching(ctx, spec, runtime, lower_dirs, network_ahead)
        except Exception as exc:
            reports.transition(
                ctx, spec, [s.CREATING], state=s.FAILED, status_message=tenant_message(exc)[:500]
            )
            raise
        return self._start_created(ctx, spec, runtime)

    def _start_created(self, ctx: HostContext, spec: WorkloadSpec, runtime: OciRuntime) -> str:
        """Start the created container of a workload reported `creating`; report it running."""
        try:
            failpoint("create.created")
            runtime.start(spec.runtime_id)
            failpoint("create.started")
        except Exception as exc:
            reports.transition(
                ctx, spec, [s.CREATING], state=s.FAILED, status_message=tenant_message(exc)[:500]
            )
            raise
        reports.transition(
            ctx,
            spec,
            [s.CREATING],
            state=s.RUNNING,
            started_at=reports.NOW,
            finished_at=None,
            exit_code=None,
        )
        try:  # once it runs (and is reported): what the next create will need, made off its path
            runtime.prepare_next_create(disk_bytes(spec), user_namespace=not spec.privileged)
        except Exception:
            log.warning("preparing the next create failed (it will make its own)", exc_info=True)
        return s.RUNNING

    def stop(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        reports.transition(ctx, spec, [s.RUNNING, s.CREATING, s.UNKNOWN], state=s.STOPPING)
        failpoint("stop.stopping")
        code = oci_runtime(ctx).stop(spec.runtime_id, grace_seconds=grace_seconds)
        reports.record_exit(ctx, spec, code, expected=[s.STOPPING, s.RUNNING], requested=True)

    def remove(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        runtime = oci_runtime(ctx)
        if runtime.state(spec.runtime_id).status == "running":
            runtime.stop(spec.runtime_id, grace_seconds=grace_seconds)
            failpoint("delete.stopped")
        runtime.delete(spec.runtime_id)
        network.release(ctx, spec)  # issue 7: remove its netns, re-apply the host's network without it
        failpoint("delete.removed")

    def shut_down(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        try:
            self.stop(ctx, spec, grace_seconds)
        except ContainerNotFound:  # never created (a create cut short): nothing runs
            reports.record_exit(ctx, spec, None, expected=[s.RUNNING, s.CREATING, s.UNKNOWN], requested=True)
        oci_runtime(ctx).delete(spec.runtime_id, keep_upper=True)
        network.release(ctx, spec)

    def handle_exits(self, ctx: HostContext) -> list[str]:
        """Record the exit of every container of this host that exited; restart per policy.

        Under the workload's lock: while an operation on it is in flight (a create whose process has
        just exited, a stop), the exit is left to a later round, so the restart its policy wants is not
        lost. An exit looked at once (recorded, or not this host's to record) is not asked about again."""
        runtime = oci_runtime(ctx)
        exited = runtime.exited_ids()
        for gone in set(self._examined) - set(exited):
            del self._examined[gone]  # started again (or removed): its next exit is new
        fresh = {}
        for runtime_id in exited:
            finished = runtime.state(runtime_id).finished_at
            if runtime_id in self._examined and self._examined[runtime_id] == finished:
                continue
            fresh[runtime_id] = finished
        if not fresh:
            return []
        by_runtime_id = {spec.runtime_id: spec for spec in ctx.specs() if spec.isolation == s.NAMESPACE}
        return reports.record_ended(
            ctx,
            fresh,
            by_runtime_id,
            self._examined,
            lambda spec: self._record_exit_and_restart(ctx, runtime, spec),
        )

    def _record_exit_and_restart(self, ctx: HostContext, runtime: OciRuntime, spec: WorkloadSpec) -> bool:
        state = runtime.state(spec.runtime_id)  # read under the lock: an operation may have started it
        if state.status != "stopped":
            return False
        code = state.exit_code
        recorded, seen = reports.record_exit(ctx, spec, code, expected=[s.RUNNING, s.UNKNOWN])
        if not recorded:
            return False
        reports.restart_if_wanted(ctx, seen, code, self.ensure_running)
        return True

    def resync(self, ctx: HostContext, specs: list[WorkloadSpec], report: dict[str, list[str]]) -> None:
        runtime = oci_runtime(ctx)
        present = set(runtime.list_ids())
        mine = {spec.runtime_id: spec for spec in specs if spec.isolation == s.NAMESPACE}
        for runtime_id in sorted(present - set(mine)):
            runtime.delete(runtime_id)
            report["orphans_removed"].append(runtime_id)
        # Disks formatted ahead for sizes that no container placed here has (asked before a restart,
        # or by containers gone since): nobody may ask for them again.
        sizes = {disk_bytes(spec) for spec in mine.values()}
        for size in runtime.drop_spare_disks(keep_sizes=sizes):
            report.setdefault("spare_disks_dropped", []).append(str(size))
        for runtime_id, listed in mine.items():
            with workload_lock(ctx, listed.id, blocking=False) as free:
                if not free:
                    report.setdefault("busy", []).append(runtime_id)  # a live task is working on it
                    continue
                # Asked again under the lock: a task may have created (or deleted) it since the list
                # was read, and a stale "pending" would have this re-sync tear down a container.
                try:
                    current = ctx.spec(listed.id)
                except HostApiError:
                    continue  # gone meanwhile
                self._resync_one(ctx, runtime, current, report)

    def _resync_one(
        self, ctx: HostContext, runtime: OciRuntime, spec: WorkloadSpec, report: dict[str, list[str]]
    ) -> None:
        runtime_id = spec.runtime_id
        state = runtime.state(runtime_id)
        if spec.state == s.DELETING:
            runtime.delete(runtime_id)
            network.release(ctx, spec)
            reports.report_removed(ctx, spec)
            report["deleted"].append(runtime_id)
            return
        if spec.state == s.STOPPING:
            # A stop cut short (its worker died): the stop is what was asked, so it is finished.
            code = runtime.stop(runtime_id, grace_seconds=5) if state.status == "running" else state.exit_code
            reports.record_exit(ctx, spec, code, expected=[s.STOPPING], requested=True)
            report["exited"].append(runtime_id)
            return
        if spec.state in (s.CREATING, s.PENDING) and state.status != "running":
            if spec.state == s.PENDING and not spec.desired_running:
                reports.transition(ctx, spec, [s.PENDING], state=s.STOPPED)
                return
            # A creation cut short: whatever it left is removed and the creation runs again.
            if state.status != "absent":
                runtime.delete(runtime_id, keep_upper=True)
            _applied, seen = reports.report(ctx, spec, [s.CREATING], {"state": s.PENDING})
            try:
                self.ensure_running(ctx, seen, noop_progress)
            except Exception:
                log.exception("resuming the creation of %s failed", spec.id)
            report["resumed"].append(runtime_id)
            return
        if state.status == "running":
            if reports.transition(ctx, spec, [s.UNKNOWN, s.CREATING, s.PENDING], state=s.RUNNING):
                report["adopted"].append(runtime_id)
        elif state.status == "stopped" and spec.state in (s.RUNNING, s.UNKNOWN):
            reports.record_exit(ctx, spec, state.exit_code, expected=[s.RUNNING, s.UNKNOWN])
            report["exited"].append(runtime_id)
        elif state.status == "absent" and spec.state in (s.RUNNING, s.UNKNOWN, s.CREATING):
            reports.transition(
                ctx, spec, [spec.state], state=s.FAILED, status_message="not found on the host"
            )
            report["missing"].append(runtime_id)

    # --- reads (for the portal's questions: `spec` is anything with `runtime_id`) -------------------

    def logs(self, ctx: HostContext, spec: Any, tail_bytes: int) -> bytes:
        return oci_runtime(ctx).read_log(spec.runtime_id)[-tail_bytes:]

    def output_since(self, ctx: HostContext, spec: Any, position: int | None) -> tuple[bytes, int]:
        """``position`` is an offset in conmon's log file and only whole lines are returned (a partial
        last line waits for its end); a log shorter than ``position`` was restarted: read from 0."""
        path = oci_runtime(ctx).log_path(spec.runtime_id)
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                if position is None or size < position:  # first look, or a new (re)started log
                    position = max(0, size - OUTPUT_TAIL_BYTES) if position is None else 0
                    if position:
                        f.seek(position)
                        f.readline()  # start at a whole line
                        position = f.tell()
                f.seek(position)
                raw = f.read(OUTPUT_CHUNK_BYTES)
        except FileNotFoundError:
            return b"", position or 0
        complete, newline, _ = raw.rpartition(b"\n")
        if not newline:
            return b"", position
        return parse_k8s_log(complete + b"\n"), position + len(complete) + 1

    def stats(self, ctx: HostContext, spec: Any) -> dict[str, Any]:
        stats = oci_runtime(ctx).stats(spec.runtime_id)
        return {
            "cpu_usage_ns": stats.cpu_usage_ns,
            "memory_bytes": stats.memory_bytes,
            "block_read_bytes": stats.block_read_bytes,
            "block_write_bytes": stats.block_write_bytes,
        }

    def upper_dir(self, ctx: HostContext, spec: Any) -> Path:
        return oci_runtime(ctx).upper_dir(spec.runtime_id)

    def upper_id_shift(self, ctx: HostContext, spec: Any) -> tuple[int, int] | None:
        mapping = oci_runtime(ctx).id_mapping(spec.runtime_id)
        return (mapping.host_base, mapping.size) if mapping else None


CONTAINERS = ContainerDriver()
