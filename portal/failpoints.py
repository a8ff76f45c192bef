"""Test instrumentation: ``BULKHEAD_FAILPOINT=<name>`` kills the process at the named point (SIGKILL).

The kill-point tests use it to prove that a process killed at any step (a host agent mid-create, a
worker mid-apply) converges after a restart. Unset, a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    """Kill this process right here when the environment names this point."""
    if os.environ.get("BULKHEAD_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
