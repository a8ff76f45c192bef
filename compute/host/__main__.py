"""A joined host's processes, Django-free:

  python -m compute.host run --env-file var/agent.env   the worker and the agent, supervised (what
                                                          `make agent` ends in, through compute.join)
  python -m compute.host agent [--once]                 the agent loop alone (its settings from the
                                                          environment: agent.env's names)

The worker is `celery -A compute.host.worker worker -Q host.<id>`. Nothing here reads a settings module,
a database URL or the portal's code; the host holds only its own credential (agent.env, 0600).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from compute.host.config import ROOT

log = logging.getLogger("bulkhead.agent")

# What a host's processes never get, whatever the machine's environment holds: they read no row.
NOT_FOR_HOSTS = ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "BULKHEAD_AGENT_DATABASE_URL")


def host_environment(env_file: Path) -> dict[str, str]:
    """The environment of the host's processes: the machine's, with agent.env's settings over it."""
    from compute.host.supervisor import read_env_file

    environ = {**os.environ, **read_env_file(env_file)}
    for name in NOT_FOR_HOSTS:
        environ.pop(name, None)
    return environ


def run(env_file: Path) -> int:
    """The worker on `host.<id>` and the agent loop, restarted if they die, stopped together."""
    from compute.host.celery_settings import host_worker_argv
    from compute.host.supervisor import Stack, ensure_libvirtd_if_available, supervise

    environ = host_environment(env_file)
    host_id = environ.get("BULKHEAD_HOST_ID", "")
    if not host_id:
        raise SystemExit(f"{env_file} names no BULKHEAD_HOST_ID: join the host first (make agent)")
    host_name = environ.get("BULKHEAD_HOST_NAME", host_id)

    def start(stack: Stack) -> str:
        ensure_libvirtd_if_available()
        worker = host_worker_argv("compute.host.worker", host_id, f"agent@{host_name}")
        stack.spawn("worker", worker, env=environ, cwd=ROOT)
        stack.spawn("agent", [sys.executable, "-m", "compute.host", "agent"], env=environ, cwd=ROOT)
        return f"Agent of host {host_name} is running."

    return supervise(start)


def agent(ref: str, *, once: bool) -> int:
    from compute.host import agent_loop
    from compute.host.process import configure_from_environment, configure_logging

    configure_logging()
    configure_from_environment()
    try:
        ctx = agent_loop.joined_host(ref)
    except agent_loop.NotThisHost as error:
        raise SystemExit(str(error)) from None
    agent_loop.run(ctx, once=once)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.host")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a joined host: its worker and its agent, supervised")
    run_parser.add_argument("--env-file", type=Path, default=ROOT / "var" / "agent.env")
    agent_parser = sub.add_parser("agent", help="run the host's agent loop")
    agent_parser.add_argument("--host", default=os.environ.get("BULKHEAD_HOST_ID", ""), help="id or name")
    agent_parser.add_argument("--once", action="store_true", help="re-sync and handle exits once, then exit")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.env_file)
    if not args.host:
        parser.error("--host is required (or BULKHEAD_HOST_ID)")
    return agent(args.host, once=args.once)


if __name__ == "__main__":
    raise SystemExit(main())
