"""Real helper processes for tests: a Celery worker on the test database, waiting with deadlines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def test_database_url() -> str:
    """DATABASE_URL of the test database pytest-django created (so a subprocess sees the same rows)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}:{s.get('PASSWORD') or ''}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = test_database_url()
    env.update(extra)
    return env


@contextmanager
def process(argv: list[str], log_name: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A project process (`argv` after the Python interpreter) on the test database, logged to var/."""
    log = open(ROOT / "var" / log_name, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=subprocess_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def celery_worker(
    queues: str = "default", name: str = "test", *, pool: str = "solo", **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process consuming `queues` from the real Redis broker.

    pool: "solo" runs tasks in the worker process itself; "prefork" in one pool process, as `make run`
    does (a pool process that dies is replaced and its task redelivered).
    A joined host's worker (env with BULKHEAD_PORTAL_URL and BULKHEAD_HOST_CREDENTIAL) is the host's own
    Django-free app, as `python -m compute.host run` starts it; others are the portal's app."""
    from compute.host.broker import host_id_of_queue, key_prefix

    host_id = host_id_of_queue(queues)
    app = "compute.host.worker" if host_id is not None and is_joined(env) else "portal"
    argv = ["-m", "celery", "-A", app, "worker", "-Q", queues, "-c", "1", "-P", pool]
    argv += ["-n", f"{name}@%h", "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if app != "portal":
        env = {"BULKHEAD_HOST_ID": str(host_id), **env}
    elif host_id is not None:  # a host's worker reads its queue under the host's key prefix, as in production
        env = {"BULKHEAD_BROKER_KEYPREFIX": key_prefix(host_id), **env}
    with process(argv, f"test-worker-{name}.log", **env) as proc:
        yield proc


def is_joined(env: dict[str, str]) -> bool:
    """The environment of a host on its own machine: it talks to the portal over the host API."""
    return bool(env.get("BULKHEAD_PORTAL_URL") and env.get("BULKHEAD_HOST_CREDENTIAL"))


@contextmanager
def celery_beat(name: str = "test", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """The real Celery beat process (the reconciler's clock), its schedule file in var/."""
    schedule = ROOT / "var" / f"test-beat-{name}.schedule"
    argv = ["-m", "celery", "-A", "portal", "beat", "-s", str(schedule), "-l", "INFO"]
    try:
        with process(argv, f"test-beat-{name}.log", **env) as proc:
            yield proc
    finally:
        for leftover in schedule.parent.glob(schedule.name + "*"):
            leftover.unlink(missing_ok=True)


@contextmanager
def host_agent(
    host: Any,
    worker_env: dict[str, str] | None = None,
    *,
    resynced: bool = False,
    pool: str = "solo",
    **env: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """A host's agent as on a real host: a Celery worker on `host.<id>` plus the agent loop process
    (on a joined host, given BULKHEAD_PORTAL_URL and BULKHEAD_HOST_CREDENTIAL: the Django-free ones).

    worker_env: extra environment for the worker only (e.g. a failpoint that kills it mid-task).
    pool: the worker's pool (see celery_worker).
    resynced: enter only once the loop has finished its re-sync at start and answers (a test that
    wants its request handled by the worker, not by that re-sync, waits for it).
    Yields the worker process (a test that kills it at a failpoint waits for it to be gone).
    """
    from compute import host_rpc

    if resynced:  # a previous agent's "answering" mark must not count
        host_rpc.forget_answering(host.pk)
    log = open(ROOT / "var" / f"test-agent-{host.name}.log", "wb")  # noqa: SIM115 - closed below
    # A joined host's loop is the host package's own (no Django); the portal's machine's is manage.py's.
    command = ["-m", "compute.host", "agent"] if is_joined(env) else ["manage.py", "agent"]
    loop = subprocess.Popen(
        [sys.executable, *command, "--host", str(host.pk)],
        cwd=ROOT,
        env=subprocess_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with celery_worker(
            queues=host.queue, name=host.name, pool=pool, **env, **(worker_env or {})
        ) as worker:
            if resynced:
                wait_until(
                    lambda: host_rpc.is_answering(host.pk),
                    timeout=120,
                    what="the agent's re-sync at start",
                )
            yield worker
    finally:
        loop.terminate()
        try:
            loop.wait(timeout=15)
        except subprocess.TimeoutExpired:
            loop.kill()
            loop.wait()
        log.close()


@contextmanager
def serve_registry(store_dir: Path) -> Iterator[str]:
    """daphne serving portal.asgi (and so the registry at /v2/) on the test database and `store_dir`;
    yields host:port once /v2/ answers."""
    with serve_portal(store_dir) as (address, _):
        yield address


@contextmanager
def serve_portal(store_dir: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`serve_registry` with settings from `env`; yields host:port and daphne's process."""
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"]
    with process(argv, f"test-registry-{port}.log", BULKHEAD_STORE_DIR=str(store_dir), **env) as proc:
        address = f"127.0.0.1:{port}"

        def answering() -> bool:
            try:
                return httpx.get(f"http://{address}/v2/", timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        wait_until(answering, timeout=60, what="daphne to serve /v2/")
        yield address, proc
