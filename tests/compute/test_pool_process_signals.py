"""Issue 16: under `make run` a Celery pool process of the local host died of SIGTERM (`WorkerLostError:
Worker exited prematurely: signal 15`) a moment after it made a container in a compartment.

The cause: pyroute2 opened sockets in a namespace from a forked copy of the pool process and ended that
copy with SIGTERM once it had answered. A copy still running Python then ran the pool's inherited SIGTERM
handler (billiard's raises SystemExit), skipped its exit, unwound the copied task and told the Celery
master that the pool process had died; the master SIGTERMed the real one in the middle of its task.
These tests run a real prefork worker, as `make run` does, on the helpers the host agent uses.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from compute.network.netns import delete_netns
from tests.processes import process


def test_a_pool_process_working_in_a_namespace_is_not_killed_by_its_own_helpers(tmp_path: Path) -> None:
    from tests.compute.pool_process_app import work_in_namespace

    netns = f"bhtsig{uuid.uuid4().hex[:8]}"
    argv = ["-m", "celery", "-A", "tests.compute.pool_process_app", "worker", "-P", "prefork", "-c", "1"]
    argv += ["-n", f"{netns}@%h", "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    try:
        with process(argv, f"test-worker-{netns}.log"):
            result = work_in_namespace.apply_async(args=[netns, 3, str(tmp_path)])
            pool_pid = result.get(timeout=120)
            assert sorted(p.name for p in tmp_path.iterdir()) == [], "a copy of the pool process ran its task"
            assert Path(f"/proc/{pool_pid}").exists(), "the pool process that ran the task is gone"
    finally:
        delete_netns(netns)
