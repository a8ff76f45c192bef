"""Named kill points in host code, for the kill-point tests (the host side of `portal.failpoints`).

The same switches as `portal.failpoints` (which host code cannot import: the portal package loads
Celery and Django): ``BULKHEAD_FAILPOINT=<name>`` SIGKILLs the process at that point,
``BULKHEAD_FAILPOINT_ONCE=<file>`` lets only the first process to get there die, and
``BULKHEAD_PAUSEPOINT=<name>:<seconds>`` waits there. Unset, a point is two dictionary lookups.
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
