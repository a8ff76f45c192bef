"""A bare Celery app for tests/compute/test_pool_process_signals.py: its prefork pool processes work in
network namespaces with the host agent's helpers, as the agent's pool processes do under `make run`.

The task slows down any helper process forked from the pool process right after that helper has sent
its answer (a profile hook the fork inherits): on the loaded 2-core build machine the scheduler does the
same at random. No Django: the helpers under test import none.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

from compute.network.netns import delete_netns, ensure_netns, iproute

app = Celery("pool_process_app", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

FORKED_HELPER_PAUSE_S = 0.5


def _pause_forked_helpers_after_they_answer(pool_pid: int) -> Any:
    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and os.getpid() != pool_pid and getattr(arg, "__name__", "") == "sendmsg":
            time.sleep(FORKED_HELPER_PAUSE_S)

    return hook


@app.task(name="pool_process_app.work_in_namespace")
def work_in_namespace(netns: str, rounds: int, marker_dir: str) -> int:
    """Create `netns`, list its links `rounds` times, remove it; return the pid of the pool process.

    Code of this task that runs in any other process (a fork of the pool process that did not end where
    its creator meant it to) leaves a marker file in `marker_dir`."""
    pool_pid = os.getpid()
    sys.setprofile(_pause_forked_helpers_after_they_answer(pool_pid))
    try:
        ensure_netns(netns)
        for _ in range(rounds):
            with iproute(netns) as ipr:
                ipr.get_links()
        delete_netns(netns)
    finally:
        sys.setprofile(None)
        if os.getpid() != pool_pid:
            (Path(marker_dir) / f"copy-{os.getpid()}").write_text(f"a copy of pool process {pool_pid}\n")
    return pool_pid
