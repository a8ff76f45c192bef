"""Test instrumentation at named points of slow work.

``BULKHEAD_FAILPOINT=<name>`` kills the process there (SIGKILL): the kill-point tests prove that a
process killed at any step (a host agent mid-create, a worker mid-apply) converges after a restart.
``BULKHEAD_PAUSEPOINT=<name>:<seconds>`` waits there instead, so that a test can break something else
(the broker) while the step is in flight. Unset, a point is two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    """Kill this process right here when the environment names this point; pause where it says so."""
    if os.environ.get("BULKHEAD_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, seconds = os.environ.get("BULKHEAD_PAUSEPOINT", "").partition(":")
    if point == name:
        time.sleep(float(seconds or 5))
