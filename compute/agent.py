"""The host agent's work: make the runtime match the workload rows of this host.

Every step is idempotent and every state change a conditional update, so a task that is delivered
twice, or runs after the agent was killed half-way, converges instead of duplicating anything.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from compute import (
    network_agent,  # issue 7: compartments (also registers its task in the worker)
    network_services,
)
from compute.choices import Isolation, RestartPolicy, WorkloadState
from compute.host.link import PortalLink
from compute.host_client import link_for
from compute.hosts import host_state_dir
from compute.models import Host, Workload
from compute.runtimes.oci import (
    ContainerNotFound,
    ContainerSpec,
    OciRuntime,
    VolumeMountSpec,
    parse_k8s_log,
)
from imaging.store import LayerSpec, LayerStore
from portal import operations
from portal.errors import Explained, tenant_message
from portal.failpoints import failpoint
from tenants.services import secret_values

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@contextmanager
def workload_lock(workload: Workload, *, blocking: bool = True) -> Iterator[bool]:
    """One process at a time works on a workload on its host (a task, or the agent's re-sync).

    An flock: the kernel drops it when its process dies, so a free lock on a workload whose operation
    says "running" means the process running it is gone. Yields False if not blocking and busy.
    """
    assert workload.host is not None
    directory = host_state_dir(workload.host) / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{workload.runtime_id}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _noop_progress(percent: float, message: str = "", **_: Any) -> None:
    return None


def store() -> LayerStore:
    from imaging.services import get_store

    return get_store()


def oci_runtime(host: Host) -> OciRuntime:
    # A cgroup parent per host: two agents on one machine must not see each other's containers as leaks.
    return OciRuntime(
        host.oci_runtime,
        state_dir=host_state_dir(host) / "containers",
        cgroup_parent=f"bulkhead-{host.pk.hex[:12]}",
        userns_pool=(settings.BULKHEAD_USERNS_POOL[0], settings.BULKHEAD_USERNS_POOL[1]),
    )


def portal_link(host: Host) -> PortalLink:
    """The agent's reports go to the portal's host API (in process on the portal's own machine)."""
    return link_for(host)


def transition(workload: Workload, expected: list[str], **changes: Any) -> bool:
    """Conditional update, reported to the portal: applied only from an expected state; a concurrent
    change wins and we move on. The portal's service writes the row and publishes the event."""
    assert workload.host is not None
    return bool(portal_link(workload.host).report_state(workload.pk, list(expected), changes)["applied"])


def _advance(workload: Workload, expected: list[str], *, never_started: bool = False, **changes: Any) -> bool:
    """`transition` for the create path; `workload` is updated in memory too when it applied.
    `never_started`: only if it never ran."""
    assert workload.host is not None
    answer = portal_link(workload.host).report_state(
        workload.pk, list(expected), changes, never_started=never_started
    )
    if answer["applied"]:
        for name, value in changes.items():
            setattr(workload, name, value)
    return bool(answer["applied"])


def count_restart(workload: Workload) -> None:
    """One more restart by policy (the exit was just recorded: stopped or failed)."""
    assert workload.host is not None
    portal_link(workload.host).report_state(
        workload.pk, [WorkloadState.STOPPED, WorkloadState.FAILED], {}, count_restart=True
    )


def report_removed(workload: Workload) -> None:
    """Everything of a workload being deleted is gone from this host: the portal drops the row."""
    assert workload.host is not None
    portal_link(workload.host).report_removed(workload.pk)


def image_layers(workload: Workload) -> list[Any]:
    return [il.layer for il in workload.image.image_layers.select_related("layer").order_by("position")]


# An image's layers never change once it exists (written with the image, content-addressed): a worker
# reads them once per image, not once per start. Bounded; an empty list (not written yet) is not kept.
_LAYERS_CACHE_SIZE = 256
_layers_of_image: dict[Any, list[Any]] = {}


def _cached_image_layers(workload: Workload) -> list[Any]:
    layers = _layers_of_image.get(workload.image_id)
    if layers is None:
        layers = image_layers(workload)
        if layers:
            if len(_layers_of_image) >= _LAYERS_CACHE_SIZE:
                _layers_of_image.pop(next(iter(_layers_of_image)))
            _layers_of_image[workload.image_id] = layers
    return layers


def ensure_layers(workload: Workload, progress: Progress) -> list[str]:
    """Unpacked layer dirs of the workload's image, top-most first (overlayfs lowerdir order)."""
    layers = _cached_image_layers(workload)
    layer_store = store()
    missing = [layer for layer in layers if not layer_store.has_layer(layer.diff_id)]
    if missing:
        fetch_missing_blobs(layer_store, missing, progress)
        progress(20, f"Unpacking {len(missing)} layer(s)")
        layer_store.unpack_layers(
            [
                LayerSpec(blob_digest=layer.digest, media_type=layer.media_type, diff_id=layer.diff_id)
                for layer in missing
            ]
        )
    return [str(p) for p in reversed(layer_store.lower_dirs([layer.diff_id for layer in layers]))]


def fetch_missing_blobs(layer_store: LayerStore, layers: list[Any], progress: Progress) -> int:
    """Blobs this host's store lacks, fetched from the portal with the host's own credential and
    verified by digest while they stream in (a host on another machine has no share of the portal's
    store). Without a portal configured (the portal's own machine) nothing is fetched."""
    portal, credential = settings.BULKHEAD_PORTAL_URL, settings.BULKHEAD_HOST_CREDENTIAL
    wanted = [layer for layer in layers if not layer_store.has_blob(layer.digest)]
    if not wanted or not portal or not credential:
        return 0
    import httpx

    fetched = 0
    with httpx.Client(
        base_url=portal, headers={"Authorization": f"Bearer {credential}"}, timeout=60
    ) as client:
        for number, layer in enumerate(wanted, start=1):
            progress(10, f"Fetching layer {number} of {len(wanted)} from the portal", force=True)
            with client.stream("GET", f"/api/v1/hosts/blobs/{layer.digest}/") as response:
                if response.status_code != 200:
                    raise BlobUnavailable(
                        f"The portal did not hand out the layer {layer.digest} ({response.status_code})."
                    )
                layer_store.ingest_chunks(
                    response.iter_bytes(1024 * 1024), digest=layer.digest, size=layer.size
                )
            fetched += 1
    return fetched


class BlobUnavailable(RuntimeError):
    """The portal refused or failed to hand this host a blob it needs."""


def process_args(workload: Workload) -> list[str]:
    config = workload.image.config or {}
    entrypoint = workload.command if workload.command is not None else (config.get("entrypoint") or [])
    cmd = workload.args if workload.args is not None else (config.get("cmd") or [])
    if workload.command is not None and workload.args is None:
        cmd = []  # Docker's rule: overriding the entrypoint drops the image's cmd
    args = [*entrypoint, *cmd]
    if not args:
        raise ImageHasNoCommand("The image has no entrypoint or cmd and the workload gives none.")
    return args


def process_env(workload: Workload) -> list[str]:
    env: dict[str, str] = {}
    for item in (workload.image.config or {}).get("env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    env.update({str(k): str(v) for k, v in (workload.env or {}).items()})
    # Secret values are unsealed only here, as the process starts: they live in its environment (and
    # the host-private bundle or spec disk that hands it over), nowhere a tenant's reader can see.
    env.update(secret_values(workload.tenant_id, dict(workload.secret_env or {})))
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOSTNAME"] = workload.name
    return [f"{k}={v}" for k, v in env.items()]


class ImageHasNoCommand(Explained, ValueError):
    """Neither the image nor the workload says what to run."""


class PrivilegedNotAllowed(Explained):
    """A privileged workload whose tenant no longer may run privileged containers."""


def container_spec(
    workload: Workload, lower_dirs: list[str], network: network_agent.ContainerNetwork | None = None
) -> ContainerSpec:
    if workload.privileged and not workload.tenant.allow_privileged_containers:
        # An operator withdrew the permission since the create: no root-mapped (re)start.
        raise PrivilegedNotAllowed("privileged containers are no longer allowed in this tenant")
    config = workload.image.config or {}
    return ContainerSpec(
        container_id=workload.runtime_id,
        lower_dirs=lower_dirs,
        args=process_args(workload),
        env=process_env(workload),
        cwd=workload.workdir or config.get("workdir") or "/",
        user=workload.user or config.get("user") or "0:0",
        hostname=workload.name,
        vcpus=float(workload.vcpus),
        memory_mib=workload.memory_mib,
        disk_bytes=workload.disk_gib * 1024**3,
        # issue 7: a workload in a compartment joins the netns its agent attached to the bridge.
        netns_path=network.netns_path if network else None,
        dns_servers=network.dns_servers if network else (),
        ip_address=network.ip_address if network else None,
        user_namespace=not workload.privileged,
        volumes=_volume_mounts(workload),
    )


def _volume_mounts(workload: Workload) -> list[VolumeMountSpec]:
    from volumes.agent import volume_paths  # volumes builds on compute

    return [
        VolumeMountSpec(source=m["source"], path=m["path"], read_only=m["read_only"])
        for m in volume_paths(workload)
    ]


def load(workload_id: Any) -> Workload | None:
    return Workload.objects.select_related("host", "image", "tenant").filter(pk=workload_id).first()


# States a workload is started from (a create, start, restart, or an exit its policy restarts).
RESUMABLE_STATES = [WorkloadState.PENDING, WorkloadState.STOPPED, WorkloadState.FAILED, WorkloadState.UNKNOWN]


def ensure_running(
    workload: Workload, progress: Progress = _noop_progress, *, first_start: bool = False
) -> str:
    """Create (if needed) and start the workload's runtime; returns the resulting state. The caller
    holds the workload's lock.

    `first_start` (a create operation): only a workload that never ran is started. One that ran and
    ended meanwhile (the agent's re-sync resumes pending creations when it starts, and the agent loop
    records exits without the workload's lock) is left as it is: running it again is its restart
    policy's call."""
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        return vm_agent.ensure_running(workload, progress)
    assert workload.host is not None
    runtime = oci_runtime(workload.host)
    state = runtime.state(workload.runtime_id)
    if state.status == "running":
        transition(
            workload,
            [
                WorkloadState.PENDING,
                WorkloadState.CREATING,
                WorkloadState.STOPPED,
                WorkloadState.FAILED,
                WorkloadState.UNKNOWN,
            ],
            state=WorkloadState.RUNNING,
        )
        return WorkloadState.RUNNING
    # `creating` too: every caller holds the workload's lock, so a creation found half-done was cut
    # short (its process died: killed, or lost to a signal) and is taken over, never reported as done.
    claimed = _advance(
        workload,
        [*RESUMABLE_STATES, WorkloadState.CREATING],
        never_started=first_start,
        state=WorkloadState.CREATING,
        status_message="",
    )
    if not claimed:
        # Ran and ended meanwhile (first_start), or is being stopped or deleted: not ours to start.
        return str(Workload.objects.values_list("state", flat=True).get(pk=workload.pk))
    failpoint("create.claimed")
    # Progress is reported only around slow steps: with the image's layers on the host a start takes
    # less than the progress interval, and a report would be one more write and event for nothing.
    unpacked = False

    def unpacking(percent: float, message: str = "", **options: Any) -> None:
        nonlocal unpacked
        unpacked = True
        progress(percent, message, **options)

    try:
        lower_dirs = ensure_layers(workload, unpacking)
        failpoint("create.layers")
        if state.status != "absent":
            # A stopped container (or one a killed agent left half-made) is recreated from scratch,
            # keeping its upper dir: the captured changes survive a restart.
            runtime.delete(workload.runtime_id, keep_upper=True)
        if unpacked:
            progress(60, "Starting the container")
        # issue 7: compartments. A host that realises none needs no look-up of the workload's address.
        network = (
            network_agent.ensure_container_network(workload)
            if network_services.network_enabled(workload.host)
            else None
        )
        runtime.create(container_spec(workload, lower_dirs, network))
        failpoint("create.created")
        runtime.start(workload.runtime_id)
        failpoint("create.started")
    except Exception as exc:
        _advance(
            workload,
            [WorkloadState.CREATING],
            state=WorkloadState.FAILED,
            status_message=tenant_message(exc)[:500],
        )
        raise
    _advance(
        workload,
        [WorkloadState.CREATING],
        state=WorkloadState.RUNNING,
        started_at=timezone.now(),
        finished_at=None,
        exit_code=None,
    )
    return WorkloadState.RUNNING


def stop(workload: Workload, grace_seconds: float = 10) -> None:
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        vm_agent.stop(workload, grace_seconds)
        return
    assert workload.host is not None
    runtime = oci_runtime(workload.host)
    transition(
        workload,
        [WorkloadState.RUNNING, WorkloadState.CREATING, WorkloadState.UNKNOWN],
        state=WorkloadState.STOPPING,
    )
    failpoint("stop.stopping")
    code = runtime.stop(workload.runtime_id, grace_seconds=grace_seconds)
    record_exit(workload, code, expected=[WorkloadState.STOPPING, WorkloadState.RUNNING], requested=True)


def remove(workload: Workload, grace_seconds: float = 10) -> None:
    """Stop and remove everything of the workload on its host (idempotent)."""
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        vm_agent.remove(workload, grace_seconds)
        network_agent.release(workload)  # issue 7: re-apply the host's network without it
        return
    assert workload.host is not None
    runtime = oci_runtime(workload.host)
    if runtime.state(workload.runtime_id).status == "running":
        runtime.stop(workload.runtime_id, grace_seconds=grace_seconds)
        failpoint("delete.stopped")
    runtime.delete(workload.runtime_id)
    network_agent.release(workload)  # issue 7: remove its netns, re-apply the host's network without it
    failpoint("delete.removed")


def record_exit(
    workload: Workload, code: int | None, *, expected: list[str], requested: bool = False
) -> bool:
    """Record an exit: stopped when asked for or clean, failed otherwise."""
    state = WorkloadState.STOPPED if requested or code == 0 else WorkloadState.FAILED
    return transition(
        workload,
        expected,
        state=state,
        exit_code=code,
        finished_at=timezone.now(),
        status_message="" if state == WorkloadState.STOPPED else f"exited with {code}",
    )


def wants_restart(workload: Workload, code: int | None) -> bool:
    if not workload.desired_running:
        return False
    if workload.restart_policy == RestartPolicy.ALWAYS:
        return True
    return workload.restart_policy == RestartPolicy.ON_FAILURE and code != 0


def handle_exits(host: Host) -> list[str]:
    """Record the exit of every container of this host that exited; restart per policy.

    Under the workload's lock: while an operation on it is in flight (a create whose process has just
    exited, a stop), the exit is left to a later round, so the restart its policy wants is not lost."""
    runtime = oci_runtime(host)
    handled = []
    for runtime_id in runtime.exited_ids():
        workload = (
            Workload.objects.select_related("host", "image", "tenant")
            .filter(host=host, runtime_id=runtime_id)
            .first()
        )
        if workload is None or workload.state not in (WorkloadState.RUNNING, WorkloadState.UNKNOWN):
            continue
        with workload_lock(workload, blocking=False) as mine:
            if mine and _record_exit_and_restart(runtime, runtime_id, workload):
                handled.append(runtime_id)
    return handled


def _record_exit_and_restart(runtime: OciRuntime, runtime_id: str, workload: Workload) -> bool:
    state = runtime.state(runtime_id)  # read under the lock: an operation may have started it again
    if state.status != "stopped":
        return False
    code = state.exit_code
    if not record_exit(workload, code, expected=[WorkloadState.RUNNING, WorkloadState.UNKNOWN]):
        return False
    workload.refresh_from_db()
    if wants_restart(workload, code):
        count_restart(workload)
        try:
            ensure_running(workload)
        except Exception:
            log.exception("restart of %s failed", workload.pk)
    return True


def resync(host: Host, *, since: Any = None) -> dict[str, list[str]]:
    """After an agent (re)start: adopt what runs, record what ended, remove what nobody owns, and
    finish what a killed agent left half-done (creations re-run, deletions completed)."""
    runtime = oci_runtime(host)
    present = set(runtime.list_ids())
    report: dict[str, list[str]] = {
        "adopted": [],
        "exited": [],
        "orphans_removed": [],
        "missing": [],
        "resumed": [],
        "deleted": [],
    }
    interrupted = _fail_interrupted_operations(host, since)
    if interrupted:
        report["interrupted_operations"] = interrupted
    workloads = {
        w.runtime_id: w
        for w in Workload.objects.select_related("host", "image", "tenant").filter(
            host=host, isolation=Isolation.NAMESPACE
        )
    }
    for runtime_id in sorted(present - set(workloads)):
        runtime.delete(runtime_id)
        report["orphans_removed"].append(runtime_id)
    for runtime_id, workload in workloads.items():
        with workload_lock(workload, blocking=False) as mine:
            if not mine:
                report.setdefault("busy", []).append(runtime_id)  # a live task is working on it
                continue
            # Read again under the lock: a task may have created (or deleted) it since the list was
            # read, and a stale "pending" would have this re-sync tear down a container just started.
            current = load(workload.pk)
            if current is not None:
                _resync_one(runtime, runtime_id, current, report)
    if Workload.objects.filter(host=host, isolation=Isolation.MICROVM).exists():
        from compute import vm_agent

        vm_agent.resync(host, report)
    return report


def _resync_one(
    runtime: OciRuntime, runtime_id: str, workload: Workload, report: dict[str, list[str]]
) -> None:
    """Re-sync one workload; the caller holds its lock."""
    state = runtime.state(runtime_id)
    if workload.state == WorkloadState.DELETING:
        runtime.delete(runtime_id)
        network_agent.release(workload)
        report_removed(workload)
        report["deleted"].append(runtime_id)
        return
    if workload.state == WorkloadState.STOPPING:
        # A stop cut short (its worker died): the stop is what was asked, so it is finished.
        code = runtime.stop(runtime_id, grace_seconds=5) if state.status == "running" else state.exit_code
        record_exit(workload, code, expected=[WorkloadState.STOPPING], requested=True)
        report["exited"].append(runtime_id)
        return
    if workload.state in (WorkloadState.CREATING, WorkloadState.PENDING) and state.status != "running":
        if workload.state == WorkloadState.PENDING and not workload.desired_running:
            transition(workload, [WorkloadState.PENDING], state=WorkloadState.STOPPED)
            return
        # A creation cut short: whatever it left is removed and the creation runs again.
        if state.status != "absent":
            runtime.delete(runtime_id, keep_upper=True)
        transition(workload, [WorkloadState.CREATING], state=WorkloadState.PENDING)
        workload.refresh_from_db()
        try:
            ensure_running(workload)
        except Exception:
            log.exception("resuming the creation of %s failed", workload.pk)
        report["resumed"].append(runtime_id)
        return
    if state.status == "running":
        if transition(
            workload,
            [WorkloadState.UNKNOWN, WorkloadState.CREATING, WorkloadState.PENDING],
            state=WorkloadState.RUNNING,
        ):
            report["adopted"].append(runtime_id)
    elif state.status == "stopped" and workload.state in (WorkloadState.RUNNING, WorkloadState.UNKNOWN):
        record_exit(workload, state.exit_code, expected=[WorkloadState.RUNNING, WorkloadState.UNKNOWN])
        report["exited"].append(runtime_id)
    elif state.status == "absent" and workload.state in (
        WorkloadState.RUNNING,
        WorkloadState.UNKNOWN,
        WorkloadState.CREATING,
    ):
        transition(
            workload, [workload.state], state=WorkloadState.FAILED, status_message="not found on the host"
        )
        report["missing"].append(runtime_id)


INTERRUPTED = "Interrupted: the host agent stopped during this operation; the agent re-synced the workload."


def _fail_interrupted_operations(host: Host, since: Any) -> list[str]:
    """Operations this host's worker was running when it died: failed, saying so (the work is re-synced)."""
    if since is None:
        return []
    from portal.models import Operation, OperationState

    def fail(op: Operation) -> None:
        # Still running and still claimed before `since`: a task that claimed it again since is alive.
        if Operation.objects.filter(pk=op.pk, state=OperationState.RUNNING, started_at__lt=since).update(
            state=OperationState.FAILED,
            finished_at=timezone.now(),
            error=INTERRUPTED,
        ):
            operations.log_step(op.pk, "failed")
            interrupted.append(str(op.pk))

    interrupted: list[str] = []
    stale = Operation.objects.filter(queue=host.queue, state=OperationState.RUNNING, started_at__lt=since)
    for op in stale:
        workload = Workload.objects.select_related("host").filter(pk=op.target_id).first()
        if workload is None or op.target_type != "workload":
            fail(op)
            continue
        # A workload task holds the lock from before its claim to its finish (tasks.WorkloadTask): a
        # free lock means no live process runs the operation, and it stays free while this one fails it.
        with workload_lock(workload, blocking=False) as free:
            if free:
                fail(op)
    return interrupted


def logs(workload: Workload, tail_bytes: int = 64 * 1024) -> bytes:
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        return vm_agent.logs(workload, tail_bytes)
    assert workload.host is not None
    data = oci_runtime(workload.host).read_log(workload.runtime_id)
    return data[-tail_bytes:]


# What a first look at a workload's output shows, and the most one read returns.
OUTPUT_TAIL_BYTES = 64 * 1024
OUTPUT_CHUNK_BYTES = 256 * 1024


def output_since(workload: Workload, position: int | None) -> tuple[bytes, int]:
    """What the workload printed after ``position`` (None: the last 64 KiB), and the next position.

    Containers: ``position`` is an offset in conmon's log file and only whole lines are returned (a
    partial last line waits for its end); a log shorter than ``position`` was restarted: read from 0.
    Micro-VMs: an offset in the console output.
    """
    if workload.isolation == Isolation.MICROVM:
        output = logs(workload, 4 * 1024 * 1024)
        if position is None:
            position = max(0, len(output) - OUTPUT_TAIL_BYTES)
        elif len(output) < position:
            position = 0
        new = output[position : position + OUTPUT_CHUNK_BYTES]
        return new, position + len(new)
    assert workload.host is not None
    path = oci_runtime(workload.host).log_path(workload.runtime_id)
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


def stats(workload: Workload) -> dict[str, Any]:
    """Current counters of a running workload: cpu_usage_ns, memory_bytes, block_read_bytes,
    block_write_bytes (network counters come per host, see `compute.sampling`)."""
    assert workload.host is not None
    if workload.state != WorkloadState.RUNNING:
        return {}
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        return vm_agent.stats(workload)
    s = oci_runtime(workload.host).stats(workload.runtime_id)
    return {
        "cpu_usage_ns": s.cpu_usage_ns,
        "memory_bytes": s.memory_bytes,
        "block_read_bytes": s.block_read_bytes,
        "block_write_bytes": s.block_write_bytes,
    }


def upper_dir(workload: Workload) -> Path:
    """The workload's captured changes (a micro-VM's: the layer its guest exported at its last clean stop)."""
    assert workload.host is not None
    if workload.isolation == Isolation.MICROVM:
        from compute import vm_agent

        return vm_agent.upper_dir(workload)
    return oci_runtime(workload.host).upper_dir(workload.runtime_id)


# The reason a workload is stopped when its host's portal stack shuts down (`make run`, Ctrl-C). The
# agent's next start runs again exactly the workloads that carry it and still want to run.
HOST_SHUTDOWN_REASON = "stopped because its host shut down"


def shut_down_host(host: Host, grace_seconds: float = 5) -> list[str]:
    """Stop every workload of the host and remove what Bulkhead made on it (runtime state, mounts,
    cgroups, namespaces, bridges, nftables tables). Captured changes are kept for the next start."""
    from compute import network_services, vm_agent
    from compute.network.host_state import remove_host_network

    stopped = []
    live: list[str] = [WorkloadState.RUNNING, WorkloadState.CREATING, WorkloadState.UNKNOWN]
    for workload in Workload.objects.select_related("host").filter(host=host, state__in=live):
        with workload_lock(workload):
            try:
                if workload.isolation == Isolation.MICROVM:
                    vm_agent.stop(workload, grace_seconds)
                else:
                    try:
                        stop(workload, grace_seconds)
                    except ContainerNotFound:  # never created (a create cut short): nothing runs
                        record_exit(workload, None, expected=live, requested=True)
                    oci_runtime(host).delete(workload.runtime_id, keep_upper=True)
                    network_agent.release(workload)
            except Exception:
                log.exception("could not stop %s at host shutdown", workload.pk)
                continue
            transition(workload, [WorkloadState.STOPPED], status_message=HOST_SHUTDOWN_REASON)
            stopped.append(str(workload.pk))
    oci_runtime(host).remove_cgroup_parent()
    if network_services.network_enabled(host):
        state_dir = network_agent.state_dir(host)
        remove_host_network(network_agent.host_netns(host), state_dir=state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    return stopped


def resume_after_shutdown(host: Host) -> list[str]:
    """Start again the workloads `shut_down_host` stopped that are still meant to run."""
    resumed = []
    for workload in Workload.objects.select_related("host", "image", "tenant").filter(
        host=host, state=WorkloadState.STOPPED, status_message=HOST_SHUTDOWN_REASON, desired_running=True
    ):
        with workload_lock(workload):
            try:
                ensure_running(workload)
            except Exception:
                log.exception("could not resume %s after host shutdown", workload.pk)
                continue
        resumed.append(str(workload.pk))
    return resumed


def upper_id_shift(workload: Workload) -> tuple[int, int] | None:
    """(host_base, size) when the container's upper dir holds the host ids of its user namespace."""
    assert workload.host is not None
    if workload.isolation == Isolation.MICROVM:
        return None
    mapping = oci_runtime(workload.host).id_mapping(workload.runtime_id)
    return (mapping.host_base, mapping.size) if mapping else None
