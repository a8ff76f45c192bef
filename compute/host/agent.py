"""The host agent's loop pieces: re-sync from the portal's desired set, exits, shutdown and resume, and
reads of a workload's runtime (logs, output, stats, captured changes) for the portal's questions.

The agent is an executor of specs (like a kubelet): what should run here is `link.workloads()`, what
it saw is reported through the link; it reads and writes no database row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compute.host import network, reports
from compute.host import spec as s
from compute.host.context import HostContext, host_context, noop_progress
from compute.host.drivers import all_drivers, driver_for
from compute.host.drivers.container import oci_runtime
from compute.host.drivers.microvm import MICROVMS
from compute.host.link import HostApiError
from compute.host.locks import workload_lock
from compute.host.spec import WorkloadSpec
from compute.host.volumes import VOLUME_KINDS

__all__ = ["host_context", "workload_lock"]

log = logging.getLogger(__name__)

INTERRUPTED = "Interrupted: the host agent stopped during this operation; the agent re-synced the workload."
# The reason a workload is stopped when its host's portal stack shuts down (`make run`, Ctrl-C). The
# agent's next start runs again exactly the workloads that carry it and still want to run.
HOST_SHUTDOWN_REASON = "stopped because its host shut down"


def resync(ctx: HostContext, running: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """After an agent (re)start: adopt what runs, record what ended, remove what nobody owns, and
    finish what a killed agent left half-done (creations re-run, deletions completed).

    `running`: the operations running on the host's queue as the portal listed them when the agent
    started (`link.running_operations()`, asked first thing: an operation claimed later is alive)."""
    report: dict[str, list[str]] = {
        "adopted": [],
        "exited": [],
        "orphans_removed": [],
        "missing": [],
        "resumed": [],
        "deleted": [],
    }
    interrupted = fail_interrupted_operations(ctx, running)
    if interrupted:
        report["interrupted_operations"] = interrupted
    specs = ctx.specs()
    driver_for(s.NAMESPACE).resync(ctx, specs, report)
    if any(spec.isolation == s.MICROVM for spec in specs):
        driver_for(s.MICROVM).resync(ctx, specs, report)
    return report


def fail_interrupted_operations(ctx: HostContext, listed: dict[str, Any] | None = None) -> list[str]:
    """Operations this host's worker was running when it died: failed, saying so (the work is re-synced).

    The portal lists the operations running on this host's queue as of the agent's start; one whose
    workload's lock is free has no live process (a workload task holds the lock from before its claim
    to its finish), and it stays free while this one reports it interrupted. The portal fails it only
    if it is still running under the claim it had when listed (a task that claimed it again since is
    alive)."""
    if listed is None:
        listed = ctx.link.running_operations()
    as_of = listed["as_of"]
    interrupted: list[str] = []

    def fail(op_id: str) -> None:
        answer = ctx.link.operation(op_id, "interrupted", error=INTERRUPTED, before=as_of)
        if answer and answer.get("failed"):
            interrupted.append(op_id)

    for op in listed["operations"]:
        if op.get("kind") in VOLUME_KINDS:
            continue  # handed back, not failed: `volumes.resume_interrupted` (their own per-operation lock)
        if op.get("target_type") != "workload" or not op.get("target_id"):
            fail(op["id"])
            continue
        with workload_lock(ctx, op["target_id"], blocking=False) as free:
            if free:
                fail(op["id"])
    return interrupted


def handle_exits(ctx: HostContext) -> list[str]:
    """Record the exit of every workload of this host that ended since the last round."""
    return [handled for driver in all_drivers() for handled in driver.handle_exits(ctx)]


def adopt_unknown(ctx: HostContext) -> None:
    """Workloads the portal calls `unknown` (the host was lost a while) that run here are running."""
    MICROVMS.adopt_running(ctx, ctx.specs())


def shut_down_host(ctx: HostContext, grace_seconds: float = 5) -> list[str]:
    """Stop every workload of the host and remove what Bulkhead made on it (runtime state, mounts,
    cgroups, namespaces, bridges, nftables tables). Captured changes are kept for the next start."""
    stopped = []
    live = (s.RUNNING, s.CREATING, s.UNKNOWN)
    for spec in ctx.specs():
        if spec.state not in live:
            continue
        with workload_lock(ctx, spec.id):
            try:
                driver_for(spec.isolation).shut_down(ctx, spec, grace_seconds)
            except Exception:
                log.exception("could not stop %s at host shutdown", spec.id)
                continue
            reports.transition(ctx, spec, [s.STOPPED], status_message=HOST_SHUTDOWN_REASON)
            stopped.append(str(spec.id))
    oci_runtime(ctx).remove_cgroup_parent()
    if ctx.profile.network_enabled:
        network.remove_host(ctx)
    return stopped


def resume_after_shutdown(ctx: HostContext) -> list[str]:
    """Start again the workloads `shut_down_host` stopped that are still meant to run."""
    resumed = []
    for spec in ctx.specs():
        if not (spec.state == s.STOPPED and spec.desired_running):
            continue
        with workload_lock(ctx, spec.id):
            try:
                current = ctx.spec(spec.id)
            except HostApiError:
                continue
            if current.state != s.STOPPED or current.status_message != HOST_SHUTDOWN_REASON:
                continue
            try:
                driver_for(current.isolation).ensure_running(ctx, current, noop_progress)
            except Exception:
                log.exception("could not resume %s after host shutdown", spec.id)
                continue
        resumed.append(str(spec.id))
    return resumed


# --- reads of a workload's runtime: `workload` is anything with `id`, `runtime_id` and `isolation` --


def logs(ctx: HostContext, workload: Any, tail_bytes: int = 64 * 1024) -> bytes:
    return driver_for(str(workload.isolation)).logs(ctx, workload, tail_bytes)


def output_since(ctx: HostContext, workload: Any, position: int | None) -> tuple[bytes, int]:
    """What the workload printed after ``position`` (None: the last 64 KiB), and the next position."""
    return driver_for(str(workload.isolation)).output_since(ctx, workload, position)


def stats(ctx: HostContext, workload: Any) -> dict[str, Any]:
    """Current counters of a running workload: cpu_usage_ns, memory_bytes, block_read_bytes,
    block_write_bytes (network counters come per host, see `compute.sampling`)."""
    if str(workload.state) != s.RUNNING:
        return {}
    return driver_for(str(workload.isolation)).stats(ctx, workload)


def upper_dir(ctx: HostContext, workload: Any) -> Path:
    """The workload's captured changes (a micro-VM's: the layer its guest exported at its last clean stop)."""
    return driver_for(str(workload.isolation)).upper_dir(ctx, workload)


def upper_id_shift(ctx: HostContext, workload: Any) -> tuple[int, int] | None:
    """(host_base, size) when the container's upper dir holds the host ids of its user namespace."""
    return driver_for(str(workload.isolation)).upper_id_shift(ctx, workload)


def changes(ctx: HostContext, workload: Any, diff_ids: list[str]) -> list[dict[str, str]]:
    upper = upper_dir(ctx, workload)
    if not upper.is_dir():
        return []
    return [{"kind": c.kind, "path": c.path} for c in ctx.store().changes(upper, diff_ids)]


def spec_of(ctx: HostContext, workload_id: Any) -> WorkloadSpec | None:
    try:
        return ctx.spec(workload_id)
    except HostApiError as error:
        if error.status == 404:
            return None
        raise
