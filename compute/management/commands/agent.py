"""`manage.py agent --host ID`: the host agent's loop (`compute.host.agent_loop`) in a Django process.

Kept for the portal's own machine (`make run`'s host `local`), whose tasks and reports go through the
in-process link (the portal's services, no HTTP) and which may name its host by row. A joined host runs
`python -m compute.host agent` (no Django) under `python -m compute.host run`.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from compute.host import agent_loop
from compute.host.config import local
from compute.host.context import HostContext, host_context


def find_host(ref: str) -> HostContext:
    """The host this agent runs: a joined host by its credential, the portal's machine by name or id."""
    if local().remote:
        try:
            return agent_loop.joined_host(ref)
        except agent_loop.NotThisHost as error:
            raise CommandError(str(error)) from None
    from compute.models import Host

    as_id = _uuid_or_none(ref)
    host = Host.objects.filter(name=ref).first() or (
        Host.objects.filter(pk=as_id).first() if as_id is not None else None
    )
    if host is None:
        raise CommandError(f"no host {ref!r}")
    return host_context(host.pk)


def _uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


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
        if not options["host"]:
            raise CommandError("--host is required")
        agent_loop.run(
            find_host(options["host"]),
            once=options["once"],
            stop_workloads_on_exit=options["stop_workloads_on_exit"],
        )
