"""Test instrumentation at named points of slow work.

``BULKHEAD_FAILPOINT=<name>`` kills the process there (SIGKILL): the kill-point tests prove that a
process killed at any step (a host agent mid-create, a worker mid-apply) converges after a restart.
With ``BULKHEAD_FAILPOINT_ONCE=<file>`` only the first process to reach the point dies (the one that
creates that file): a Celery pool process killed there is replaced, and its task redelivered to the
next one must get past the point.
``BULKHEAD_PAUSEPOINT=<name>:<seconds>`` waits there instead, so that a test can break something else
(the broker) while the step is in flight. Unset, a point is two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    """Kill this process right here when the environment names this point; pause where it says so."""
    if os.environ.get("BULKHEAD_FAILPOINT") == name and _first_to_fail():
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, seconds = os.environ.get("BULKHEAD_PAUSEPOINT", "").partition(":")
    if point == name:
        time.sleep(float(seconds or 5))


def _first_to_fail() -> bool:
    once = os.environ.get("BULKHEAD_FAILPOINT_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True
