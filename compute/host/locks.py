"""One process at a time works on a workload on its host (a task, or the agent's re-sync and exits)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from compute.host.context import HostContext


@contextmanager
def workload_lock(ctx: HostContext, workload_id: Any, *, blocking: bool = True) -> Iterator[bool]:
    """The workload's lock on this host, by workload id (a task knows it before it claims its operation).

    An flock: the kernel drops it when its process dies, so a free lock on a workload whose operation
    says "running" means the process running it is gone. Yields False if not blocking and busy.
    """
    directory = ctx.state_dir / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{workload_id}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
