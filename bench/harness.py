"""What the API benchmarks share: free ports, percentiles, process memory, and the product started as
`make run` starts it (`python -m portal.stack run`: Redis check, libvirtd, migrations, bootstrap, worker,
beat, agent, daphne) on a data directory of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Until something answers HTTP at `url` (any status)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Product:
    """A running `make run` stack: its URL, data directory, the log of its children and the process."""

    url: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes]
    started_at: float  # time.monotonic() when `make run` was spawned


@contextmanager
def make_run(extra_env: dict[str, str] | None = None) -> Iterator[Product]:
    """`python -m portal.stack run` (what `make run` runs) on a fresh data directory, DATABASE_URL and
    REDIS_URL from the environment (scripts/with-test-services.sh); stopped with SIGTERM afterwards
    (the agent runs with --stop-workloads-on-exit, as under `make run`).

    The calling process is set up for Django on the same data directory and database, so it may read
    rows and files the product writes."""
    data_dir = Path(tempfile.mkdtemp(prefix="bht-bench-run-", dir=ROOT / "var"))
    data_dir.chmod(0o755)  # QEMU (libvirt-qemu) reads the disks under it
    port = free_port()
    env = {
        **os.environ,
        "BULKHEAD_DATA_DIR": str(data_dir),
        "BULKHEAD_GUEST_DIR": str(ROOT / "var" / "guest"),
        "BULKHEAD_ADMIN_PASSWORD": "bench-admin-password-1",
        "BULKHEAD_DEBUG": "false",
        "BULKHEAD_LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    os.environ.update({k: env[k] for k in ("BULKHEAD_DATA_DIR", "BULKHEAD_GUEST_DIR")})
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    log = data_dir / "make-run.log"
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "portal.stack", "run", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/v1/", timeout=120)
        yield Product(url=url, data_dir=data_dir, log=log, process=process, started_at=started)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def admin_token(name: str = "bench") -> tuple[Any, str]:
    """The bootstrap operator and a new API token of theirs (Django must be set up)."""
    from django.contrib.auth import get_user_model

    from tenants import services
    from tenants.actors import Actor

    admin = get_user_model().objects.get(username="admin")
    _token, secret = services.create_token(actor=Actor(user=admin), name=name)
    return admin, secret
