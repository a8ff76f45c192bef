"""`manage.py agent --host ID`: the host agent's loop (heartbeat, exit watcher, re-sync at start, and
answers to the portal's questions about this host's workloads: logs, stats, changes).

The Celery worker consuming `host.<id>` does the requested work; this loop notices what happens on
the host by itself: exits (recorded within a second), and the host's liveness (heartbeat).
`manage.py agent --join URL --token SECRET --name NAME` joins a new host headless first.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from compute import agent, host_client, host_rpc, hosts, sampling, vm_agent
from compute.host.link import HostApiError
from compute.models import Host

log = logging.getLogger("bulkhead.agent")

HEARTBEAT_SECONDS = 10.0
# How often the host's networks are re-applied: repairs what was changed from outside, and says so.
NETWORK_REPAIR_SECONDS = float(os.environ.get("BULKHEAD_NETWORK_REPAIR_SECONDS", 30))
EXIT_POLL_SECONDS = 0.5


class Command(BaseCommand):
    help = "Run the host agent loop for one host."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", help="host id (uuid) or name")
        parser.add_argument("--once", action="store_true", help="re-sync and handle exits once, then exit")
        parser.add_argument(
            "--stop-workloads-on-exit",
            action="store_true",
            help="stop the host's workloads and remove its networks when the agent stops, and start them "
            "again at the next start (make run's host `local`: Ctrl-C leaves nothing running)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ref = options["host"]
        if not ref:
            raise CommandError("--host is required")
        host = Host.objects.filter(name=ref).first() or Host.objects.filter(pk=ref).first()
        if host is None:
            raise CommandError(f"no host {ref!r}")
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        started = timezone.now()
        portal = agent.portal_link(host)
        portal.heartbeat()
        report_facts(host)
        # Before the workloads' re-sync (which fails what its host's dead worker was running): volume
        # and backup operations whose worker died are queued again instead (issue 17).
        resume_volume_operations(host)
        report = agent.resync(host, since=started)
        log.info("agent for %s re-synced: %s", host.name, report)
        if options["once"]:
            agent.handle_exits(host)
            return
        # Volumes (issue 17): make run's host makes its embedded pool now; others report a pool that
        # is there (an operator's, or one a volume operation made) and otherwise make it when needed.
        report_volume_pool(host, make=bool(options["stop_workloads_on_exit"]))
        if options["stop_workloads_on_exit"]:
            resumed = agent.resume_after_shutdown(host)
            if resumed:
                log.info("agent for %s started %d workloads again", host.name, len(resumed))
        last_beat = last_repair = last_sample = time.monotonic()
        while not stopping:
            try:
                agent.handle_exits(host)
                vm_agent.handle_exits(host)
                if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                    portal.heartbeat()
                    resume_volume_operations(host)
                    last_beat = time.monotonic()
                if time.monotonic() - last_sample >= settings.BULKHEAD_SAMPLE_SECONDS:
                    sampling.sample_host(host)
                    report_volume_pool(host, make=False)
                    last_sample = time.monotonic()
                if time.monotonic() - last_repair >= NETWORK_REPAIR_SECONDS:
                    repair_network(host)
                    last_repair = time.monotonic()
            except Exception:
                log.exception("agent loop error")
            wait_answering(host)
        if options["stop_workloads_on_exit"]:
            stopped = agent.shut_down_host(host)
            log.info("agent for %s stopped %d workloads and removed its networks", host.name, len(stopped))
            from volumes.agent import release_pool

            try:
                release_pool(host)  # nothing of make run stays mounted
            except Exception:
                log.exception("could not unmount the volume pool of %s", host.name)


def report_volume_pool(host: Host, *, make: bool) -> None:
    """Pool capacity and use into the host's facts, and the volumes' used bytes."""
    from volumes import agent as volume_agent

    try:
        if make or volume_agent.pool_ready(host):
            volume_agent.report_pool(host)
    except Exception:
        log.exception("volume pool of %s", host.name)


def resume_volume_operations(host: Host) -> None:
    """Volume and backup operations of this host whose worker died (their lock is free): queued again,
    or failed past their resume limit; the work is idempotent."""
    from volumes import agent as volume_agent

    try:
        resumed = volume_agent.resume_interrupted(host)
    except Exception:
        log.exception("could not resume the volume operations of %s", host.name)
        return
    if resumed:
        log.info("agent for %s handed back interrupted volume operations: %s", host.name, resumed)


def report_facts(host: Host) -> None:
    """A host on its own machine tells the portal what it is and can do (runtimes, KVM, disk) once at
    start; the portal keeps capacity within what was approved. The portal's own machine registers its
    facts itself when `make run` starts."""
    if host_client.remote_settings() is None:
        return
    portal = agent.portal_link(host)
    try:
        facts = {name: value for name, value in hosts.gather_facts(host).items() if name in REPORTED_FACTS}
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


def wait_answering(host: Host) -> None:
    """The loop's pause: answer the portal's questions about this host's workloads meanwhile."""
    started = time.monotonic()
    try:
        host_rpc.serve(host, EXIT_POLL_SECONDS)
    except Exception:  # the broker is away: keep the loop's pace, exits are still recorded
        log.exception("could not answer host requests")
    rest = EXIT_POLL_SECONDS - (time.monotonic() - started)
    if rest > 0:
        time.sleep(rest)


def repair_network(host: Host) -> list[str]:
    """Re-apply the host's compartments; what had to be repaired goes to the audit log and the event bus,
    and, per compartment, to the NetworkRepair rows the desired-state reconciler reports as drift."""
    from compute import network_agent, network_services

    host.refresh_from_db()
    if not network_services.network_enabled(host):
        return []
    report = network_agent.apply_host(host)
    if report.repaired:
        # Recorded by the portal (audit, drift per compartment, event) through the host API.
        agent.portal_link(host).report_network_repairs(
            list(report.repaired),
            {key: list(value) for key, value in report.repaired_by_compartment.items()},
        )
    return list(report.repaired)
