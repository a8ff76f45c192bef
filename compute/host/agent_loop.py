"""The host agent's loop (heartbeat, exit watcher, re-sync at start, and answers to the portal's questions
about this host's workloads: logs, stats, changes, console), as `python -m compute.host agent` runs it on a
joined host and `manage.py agent` on the portal's own machine.

The Celery worker consuming `host.<id>` does the requested work; this loop notices what happens on the host
by itself: exits (recorded within a second), the host's liveness (heartbeat), its volume pool, its networks.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from http import HTTPStatus

from compute.host import agent, network, rpc, sampling
from compute.host import volumes as host_volumes
from compute.host.context import HostContext, host_context
from compute.host.drivers import container
from compute.host.link import HostApiError, link_to_portal
from compute.host.mounts import host_place
from compute.host.spec import HostProfile
from compute.host.supervisor import stop_signals

log = logging.getLogger("bulkhead.agent")

HEARTBEAT_SECONDS = 10.0
# How often the host's networks are re-applied: repairs what was changed from outside, and says so.
NETWORK_REPAIR_SECONDS = float(os.environ.get("BULKHEAD_NETWORK_REPAIR_SECONDS", 30))
EXIT_POLL_SECONDS = 0.5


class NotThisHost(RuntimeError):
    """The host named on the command line is not the one the credential belongs to."""


def joined_host(ref: str, *, patience: float = 60.0) -> HostContext:
    """A host on its own machine asks the portal who its credential is (it reads no row); the name or id
    it was started with must be that host's. A portal that does not answer yet (the host booted first,
    or the portal is restarting) is asked again for `patience` seconds before giving up (the
    supervisor then starts the agent again)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            answer = link_to_portal(ref).host_self()
            break
        except HostApiError as error:
            if error.status == HTTPStatus.UNAUTHORIZED and _is_host_id(ref):
                credential_refused(host_context(ref))
            if error.status != 0 or time.monotonic() >= deadline:
                raise
            log.warning("the portal does not answer yet: %s", error.message)
            time.sleep(1.0)
    profile = HostProfile.parse(answer)
    if ref not in (str(profile.id), profile.name):
        raise NotThisHost(f"this host's credential belongs to {profile.name}, not {ref!r}")
    return host_context(profile.id)


def run(ctx: HostContext, *, once: bool = False, stop_workloads_on_exit: bool = False) -> None:
    """The loop, until SIGTERM or SIGINT (`once`: re-sync and handle exits once)."""
    # First thing: what runs on this host's queue now. An operation claimed after this is alive;
    # one claimed before whose worker holds no lock died with the previous agent (re-sync below).
    running_at_start = ctx.link.running_operations()
    name = ctx.profile.name
    stop = stop_signals()
    placed = rpc.PlacedWorkloads(ctx.link)
    answerer = answerer_for(ctx, placed)
    try:
        answerer.say_starting()  # a question about a workload created meanwhile waits for the loop
    except Exception:  # the broker is away: questions get a 503 until the loop answers, as before
        log.exception("could not say that the agent is starting")
    ctx.link.heartbeat()
    report_facts(ctx)
    # Before the workloads' re-sync (which fails what its host's dead worker was running): volume
    # and backup operations whose worker died are queued again instead (issue 17).
    resume_volume_operations(ctx)
    report = agent.resync(ctx, running_at_start)
    log.info("agent for %s re-synced: %s", name, report)
    if once:
        agent.handle_exits(ctx)
        return
    # Volumes (issue 17): make run's host makes its embedded pool now; others report a pool that
    # is there (an operator's, or one a volume operation made) and otherwise make it when needed.
    report_volume_pool(ctx, make=stop_workloads_on_exit)
    if stop_workloads_on_exit:
        resumed = agent.resume_after_shutdown(ctx)
        if resumed:
            log.info("agent for %s started %d workloads again", name, len(resumed))
    last_beat = last_repair = last_sample = time.monotonic()
    while not stop.received:
        try:
            agent.handle_exits(ctx)
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                ctx.link.heartbeat()
                agent.adopt_unknown(ctx)
                resume_volume_operations(ctx)
                last_beat = time.monotonic()
            if time.monotonic() - last_sample >= ctx.local.sample_seconds:
                sample_host(ctx, placed)
                report_volume_pool(ctx, make=False)
                last_sample = time.monotonic()
            if time.monotonic() - last_repair >= NETWORK_REPAIR_SECONDS:
                repair_network(ctx)
                last_repair = time.monotonic()
        except Exception as error:
            log.exception("agent loop error")
            # Whichever request met it first (the profile, the heartbeat): later ones may be throttled.
            if isinstance(error, HostApiError) and error.status == HTTPStatus.UNAUTHORIZED:
                credential_refused(ctx)
                # Asked again at the heartbeat's pace, not twice a second: failed authentications
                # are throttled per source address, which other hosts may share.
                deadline = time.monotonic() + HEARTBEAT_SECONDS
                while not stop.received and time.monotonic() < deadline:
                    time.sleep(EXIT_POLL_SECONDS)
        wait_answering(answerer)
    if stop_workloads_on_exit:
        stopped = agent.shut_down_host(ctx)
        log.info("agent for %s stopped %d workloads and removed its networks", name, len(stopped))
        try:
            host_volumes.release_pool(host_place(ctx))  # nothing of make run stays mounted
        except Exception:
            log.exception("could not unmount the volume pool of %s", name)


def credential_refused(ctx: HostContext) -> None:
    """The portal no longer lets this host in: no create will come with this credential, so what the
    host keeps only for the next creates goes (the disks formatted ahead; a removed host has no
    workloads, and a host with a new credential makes them again on its next create)."""
    dropped = container.drop_spare_disks(ctx)
    if dropped:
        log.warning("the portal refuses this host's credential: dropped %d spare disks", len(dropped))


def _is_host_id(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def report_volume_pool(ctx: HostContext, *, make: bool) -> None:
    """Pool capacity and use into the host's facts, and the volumes' used bytes (through the host API)."""
    place = host_place(ctx)
    try:
        if make or host_volumes.pool_ready(place):
            host_volumes.report_pool(ctx.link, place)
    except Exception:
        log.exception("volume pool of %s", ctx.host_id)


def resume_volume_operations(ctx: HostContext) -> None:
    """Volume and backup operations of this host whose worker died (their lock is free): queued again,
    or failed past their resume limit; the work is idempotent."""
    try:
        resumed = host_volumes.resume_interrupted(ctx.link, ctx.local.operation_locks_dir)
    except Exception:
        log.exception("could not resume the volume operations of %s", ctx.host_id)
        return
    if resumed:
        log.info("agent for %s handed back interrupted volume operations: %s", ctx.host_id, resumed)


def report_facts(ctx: HostContext) -> None:
    """A host on its own machine tells the portal what it is and can do (runtimes, KVM, disk) once at
    start; the portal keeps capacity within what was approved. The portal's own machine registers its
    facts itself when `make run` starts."""
    if not ctx.local.remote:
        return
    from compute.host.facts import gather_facts

    portal = ctx.link
    try:
        facts = gather_facts(ctx.local.data_dir, ctx.local.guest_dir)
        facts = {name: value for name, value in facts.items() if name in REPORTED_FACTS}
        try:
            portal.report_facts(facts)
        except HostApiError as error:
            if error.status != 403:
                raise
            # More capacity than approved (a disk grown since the join): the portal keeps the approved
            # values; the host's capabilities are still worth recording.
            log.warning("the portal refused the host's capacity: %s", error.message)
            portal.report_facts(
                {k: v for k, v in facts.items() if k not in ("cpus", "memory_mib", "disk_gib")}
            )
    except Exception:  # the host keeps working with what the portal knew
        log.exception("could not report the host's facts")


REPORTED_FACTS = {
    "cpus",
    "memory_mib",
    "disk_gib",
    "disk_free_bytes",
    "kernel",
    "cgroup_mode",
    "hostname",
    "oci_runtimes",
    "oci_runtime_probes",
    "libvirt",
    "kvm",
    "guest_kernel",
}


def answerer_for(ctx: HostContext, placed: rpc.PlacedWorkloads) -> rpc.Answerer:
    """Answers the portal's questions on the host's own broker connection (on a joined host, its own ACL
    user), about the workloads the portal placed on it, from the request alone."""
    import redis

    from compute.host.console import ConsoleRelays
    from compute.host.queries import SpecQueries

    client = redis.Redis.from_url(ctx.local.broker_url, socket_timeout=EXIT_POLL_SECONDS + 10)
    queries = SpecQueries(ctx)
    consoles = ConsoleRelays(client, ctx.host_id, queries.open_console)
    return rpc.Answerer(client, ctx.host_id, rpc.handlers_for(queries, consoles), placed.holds)


def sample_host(ctx: HostContext, placed: rpc.PlacedWorkloads) -> int:
    """One sampling round (`compute.host.sampling`) of the running workloads the portal placed here."""
    from compute.host.queries import SpecQueries

    return sampling.sample_host(
        ctx.link,
        placed.running(),
        SpecQueries(ctx).stats,
        host_netns=ctx.profile.netns,
        network_enabled=ctx.profile.network_enabled,
    )


def wait_answering(answerer: rpc.Answerer) -> None:
    """The loop's pause: answer the portal's questions about this host's workloads meanwhile."""
    started = time.monotonic()
    try:
        answerer.serve(EXIT_POLL_SECONDS)
    except Exception:  # the broker is away: keep the loop's pace, exits are still recorded
        log.exception("could not answer host requests")
    rest = EXIT_POLL_SECONDS - (time.monotonic() - started)
    if rest > 0:
        time.sleep(rest)


def repair_network(ctx: HostContext) -> list[str]:
    """Re-apply the host's compartments; what had to be repaired goes to the audit log and the event bus,
    and, per compartment, to the NetworkRepair rows the desired-state reconciler reports as drift."""
    ctx.forget_profile()
    if not ctx.profile.network_enabled:
        return []
    report, _served = network.apply_host(ctx)
    if report.repaired:
        # Recorded by the portal (audit, drift per compartment, event) through the host API.
        ctx.link.report_network_repairs(
            list(report.repaired),
            {key: list(value) for key, value in report.repaired_by_compartment.items()},
        )
    return list(report.repaired)
