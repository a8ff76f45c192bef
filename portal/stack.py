"""`make run`: start the embedded stack (Redis, libvirtd, worker, beat, agent, ASGI server) and supervise it.

Ctrl-C stops everything this process started. Running it again is safe: migrations and the bootstrap are
idempotent and a Redis already answering on REDIS_URL is reused.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import django

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


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if `make run` itself dies (even by SIGKILL), so that no
    worker, agent or Redis outlives the stack that owns it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _popen(args: list[str], kwargs: dict[str, object]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches `make run` once and it stops the children in order.
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)  # type: ignore[call-overload]


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        # How each child was started, to start it again the same way when it dies.
        self._commands: dict[str, tuple[list[str], dict[str, object]]] = {}
        self._restarts: dict[str, list[float]] = {}

    def spawn(self, name: str, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches us once and we stop the children in order.
        proc = _popen(args, kwargs)
        self.children.append((name, proc))
        self._commands[name] = (args, kwargs)
        return proc

    def restart_dead_children(self, now: float | None = None) -> list[str]:
        """Start again, in place, each child that exited; one line per restart saying so.

        A child that keeps dying (RESTART_LIMIT exits within RESTART_WINDOW_SECONDS) is not restarted:
        CrashLoop, so that `make run` stops with the reason rather than spinning.
        """
        now = time.monotonic() if now is None else now
        said = []
        for index, (name, proc) in enumerate(self.children):
            if proc.poll() is None:
                continue
            recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
            if len(recent) >= RESTART_LIMIT:
                raise CrashLoop(
                    f"{name} exited with {proc.returncode} {len(recent) + 1} times within "
                    f"{RESTART_WINDOW_SECONDS:.0f} s; not restarting it"
                )
            self._restarts[name] = [*recent, now]
            args, kwargs = self._commands[name]
            replacement = _popen(args, kwargs)
            self.children[index] = (name, replacement)
            said.append(f"{name} exited with {proc.returncode}; restarted it (pid {replacement.pid})")
        return said

    def stop(self) -> None:
        """Stop the children one by one, the last started first: the web server goes before the agent,
        and the agent (which stops the host's workloads) while Redis and the worker still answer."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECONDS.get(name, 15))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


class CrashLoop(RuntimeError):
    """A child died again and again: restarting it would only spin."""


RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0

# The agent stops every workload of the host (each with a short grace period) before it exits.
STOP_TIMEOUT_SECONDS = {"agent": 180}


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


def worker_command(queues: list[str], node_name: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "portal", "worker", "-l", "WARNING",
        "-Q", ",".join(queues), "--concurrency", "2", "-n", node_name,
    ]  # fmt: skip


def host_worker(host_id: str, node_name: str) -> tuple[list[str], dict[str, str]]:
    """A host's worker: its one queue, every key under the host's prefix (settings turn remote control
    and events off), and none of gossip/mingle/heartbeat, which broadcast on the portal's channels."""
    from compute.host.broker import host_queue, key_prefix

    command = [
        *worker_command([host_queue(host_id)], node_name),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return command, {**os.environ, "BULKHEAD_BROKER_KEYPREFIX": key_prefix(host_id)}


def ensure_libvirtd_if_available() -> None:
    try:
        from compute.runtimes.libvirtd import ensure_libvirtd
    except ImportError:
        return
    ensure_libvirtd()


def supervise(start: Callable[[Stack], str]) -> int:
    """Start processes with `start`, print its message, restart a child that dies (and say so), and stop
    them all on Ctrl-C or when a child keeps dying."""
    stack = Stack()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(start(stack), flush=True)
        print("Press Ctrl-C to stop.\n", flush=True)
        while not stopping:
            try:
                for line in stack.restart_dead_children():
                    print(line, file=sys.stderr, flush=True)
            except CrashLoop as crash:
                print(f"{crash}; stopping", file=sys.stderr, flush=True)
                stopping = True
            time.sleep(0.5)
    finally:
        print("Stopping…", flush=True)
        stack.stop()
    return 0


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
        stack.spawn("worker", worker_command(["default"], f"portal@{settings.BULKHEAD_HOST_NAME}"))
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


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def run_agent(env_file: Path) -> int:
    """A joined host: its Celery worker on `host.<id>` and the agent loop, supervised like `run`."""
    os.environ.update(read_env_file(env_file))
    host_id = os.environ["BULKHEAD_HOST_ID"]
    host_name = os.environ.get("BULKHEAD_HOST_NAME", host_id)

    def start(stack: Stack) -> str:
        ensure_libvirtd_if_available()
        command, env = host_worker(host_id, f"agent@{host_name}")
        stack.spawn("worker", command, env=env)
        stack.spawn("agent", [sys.executable, "manage.py", "agent", "--host", host_id])
        return f"Agent of host {host_name} is running."

    return supervise(start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the embedded stack")
    run_parser.add_argument("--bind", default=os.environ.get("BULKHEAD_BIND", "127.0.0.1"))
    run_parser.add_argument("--port", type=int, default=int(os.environ.get("BULKHEAD_PORT", "8000")))
    agent_parser = sub.add_parser("agent", help="run a joined host's agent")
    agent_parser.add_argument("--env-file", default=str(BASE_DIR / "var" / "agent.env"))
    args = parser.parse_args(argv)
    if args.command == "agent":
        return run_agent(Path(args.env_file))
    return run(args.bind, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
