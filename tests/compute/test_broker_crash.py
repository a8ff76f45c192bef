"""The broker (Redis) dies in the middle of a workload's creation, at its slow step, and comes back:
the creation finishes and the workload and its operation agree (issue 19)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from portal.models import Operation
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def redis_cli(*args: str) -> str:
    url = urlsplit(settings.REDIS_URL)
    environment = {**os.environ, "REDISCLI_AUTH": url.password or ""}
    completed = subprocess.run(
        ["redis-cli", "-h", url.hostname or "127.0.0.1", "-p", str(url.port), *args],
        env=environment, capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return completed.stdout


def kill_and_restart_redis() -> None:
    """SIGKILL the test's Redis (a crash: no save, no goodbye), then start it again as it was."""
    info = dict(line.split(":", 1) for line in redis_cli("info", "server").splitlines() if ":" in line)
    pid, config = int(info["process_id"].strip()), info["config_file"].strip()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, what="Redis to die")
    time.sleep(1)  # the worker notices it lost the broker
    subprocess.run(["redis-server", config], check=True, timeout=10)
    wait_until(lambda: "PONG" in redis_cli("ping"), timeout=20, what="Redis to answer again")


@pytest.mark.parametrize(
    # A container is made ahead of its claim (`create.ahead`: made and claimed, not started yet).
    ("isolation", "slow_step"),
    [("namespace", "create.ahead"), ("microvm", "vm.booting")],
)
def test_a_creation_in_flight_when_the_broker_dies_finishes_and_says_so(
    world: World, busybox: Any, store_dir: Path, isolation: str, slow_step: str
) -> None:
    host = make_host("bht-broker-crash")
    pause = {"BULKHEAD_PAUSEPOINT": f"{slow_step}:4"}
    try:
        # Entered once the agent loop has re-synced at its start: that re-sync is not what this tests.
        with host_agent(host, pause, resynced=True, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world,
                "mia",
                name="survivor",
                image=str(busybox.pk),
                isolation=isolation,
                memory_mib=128,
                command=["/bin/sleep", "300"],
            )
            assert response.status_code == 202, response.json()
            op_id = response.json()["id"]
            wait_until(
                lambda: Operation.objects.filter(pk=op_id, state="running").exists(),
                timeout=90,
                what="the worker to be inside the creation",
            )
            kill_and_restart_redis()
            op = finished(op_id, timeout=120)
            assert op.state == "succeeded", op.error
            assert workload_in("survivor", {"running"}, timeout=30).state == "running"
            # And it goes away cleanly: nothing of the crash lingers.
            from tests.conftest import client_for

            deleted = client_for(world, "mia").delete(f"/api/v1/workloads/{op.target_id}/")
            assert finished(deleted.json()["id"], timeout=120).state == "succeeded"
    finally:
        cleanup_host(host)
