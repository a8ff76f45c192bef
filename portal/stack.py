"""`make run`: start the embedded stack (Redis, libvirtd, worker, beat, agent, ASGI server) and supervise it
(`compute.host.supervisor`, which a joined host's `python -m compute.host run` uses too).

Ctrl-C stops everything this process started. Running it again is safe: migrations and the bootstrap are
idempotent and a Redis already answering on REDIS_URL is reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import django

from compute.host.celery_settings import worker_argv
from compute.host.supervisor import Stack, ensure_libvirtd_if_available, supervise

BASE_DIR = Path(__file__).resolve().parent.parent


def _redis_answers(url: str) -> bool:
    """Whether the Redis at `url` answers to its credentials; SystemExit if one answers without them."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as error:
        # A Redis that answers but refuses our password (or has none) is not ours to share.
        address = _redis_address(url)
        raise SystemExit(f"a Redis on {address} refuses this portal's password: {error}") from None
    except redis.exceptions.RedisError:
        return False


def _redis_address(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"


def _wait_for(predicate: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def ensure_redis(stack: Stack, data_dir: Path, url: str) -> None:
    """Reuse the Redis at `url` if it answers to its password, else start one on loopback with it."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if _redis_answers(url):
        return
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"Redis at {host}:{port} does not answer")
    if not parsed.password:
        raise SystemExit("REDIS_URL has no password; the embedded Redis always requires one")
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The password goes in a 0600 file, not on the command line where `ps` would show it.
    config = redis_dir / "redis.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                "protected-mode yes",
                f"dir {redis_dir}",
                "maxmemory-policy noeviction",
                "appendonly yes",
                'save ""',
                f"requirepass {parsed.password}",
                "",
            ]
        )
    )
    stack.spawn("redis", ["redis-server", str(config)], stdout=subprocess.DEVNULL)
    _wait_for(lambda: _redis_answers(url), "Redis")


def host_worker(host_id: str, node_name: str) -> tuple[list[str], dict[str, str]]:
    """`make run`'s local host worker: the portal's app (its in-process link needs the portal's code) on
    the host's one queue, every key under the host's prefix (settings turn remote control and events off)."""
    from compute.host.broker import key_prefix
    from compute.host.celery_settings import host_worker_argv

    command = host_worker_argv("portal", host_id, node_name)
    return command, {**os.environ, "BULKHEAD_BROKER_KEYPREFIX": key_prefix(host_id)}


def run(bind: str, port: int) -> int:
    """`make run`: Redis, libvirtd, migrations, bootstrap, worker, beat, the local agent, the web server."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    # The settings (here and in every child) see where the web server listens: no debug pages beyond loopback.
    os.environ["BULKHEAD_BIND"] = bind
    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    def start(stack: Stack) -> str:
        ensure_redis(stack, settings.DATA_DIR, settings.REDIS_URL)
        ensure_libvirtd_if_available()
        call_command("migrate", interactive=False, verbosity=0)
        from portal.bootstrap import bootstrap

        login = bootstrap()
        from compute.broker_access import sync_broker_users

        sync_broker_users()  # the hosts' broker users, from the credential rows
        python = sys.executable
        stack.spawn("worker", worker_argv("portal", ["default"], f"portal@{settings.BULKHEAD_HOST_NAME}"))
        if login.agent_host:
            # This machine's host: its queue under its own prefix, like any host's (the portal's
            # connection reads every key; a joined host's broker user only its own).
            command, env = host_worker(login.agent_host, f"host@{settings.BULKHEAD_HOST_NAME}")
            stack.spawn("host-worker", command, env=env)
        beat_schedule = str(settings.DATA_DIR / "celerybeat-schedule")
        stack.spawn(
            "beat", [python, "-m", "celery", "-A", "portal", "beat", "-l", "WARNING", "-s", beat_schedule]
        )
        if login.agent_command:
            # This machine's workloads stop with the portal and start again with it.
            stack.spawn("agent", [python, *login.agent_command, "--stop-workloads-on-exit"])
        stack.spawn("web", [python, "-m", "daphne", "-b", bind, "-p", str(port), "portal.asgi:application"])
        return f"\nBulkhead is running: http://{bind}:{port}/\n{login.message}"

    return supervise(start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the embedded stack")
    run_parser.add_argument("--bind", default=os.environ.get("BULKHEAD_BIND", "127.0.0.1"))
    run_parser.add_argument("--port", type=int, default=int(os.environ.get("BULKHEAD_PORT", "8000")))
    args = parser.parse_args(argv)
    return run(args.bind, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
