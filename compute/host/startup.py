"""What a host's worker makes when its process starts, not in its first task.

A fresh worker's first create paid for its link's HTTP client and first connection, the host's profile
(`GET hosts/self/`) and the user namespace of the id range it hands out (a fork, ~10-25 ms): ~70 ms of a
first start after a (re)start (NOTES.md, session 15). `warm_up` makes them in a thread of its own when
the process that runs tasks starts (the solo pool's worker, each prefork child): it never delays nor
fails the start; a task that comes first waits on the same locks and gets the same objects.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


def warm_up(host_id: str) -> None:
    """The link's client (and its kept-alive connection), the layer store, the profile and the user
    namespace of the next free id range, made now. Advice only: a failure is logged, the first task
    makes what is missing itself."""
    if not host_id:
        return
    try:
        from compute.host.context import host_context
        from compute.host.drivers.container import oci_runtime
        from compute.runtimes.userns import prepare_user_namespace

        ctx = host_context(host_id)
        ctx.store()
        runtime = oci_runtime(ctx)  # reads the profile: the link's client made, its connection opened
        upcoming = runtime.id_ranges.next_free()
        if upcoming is not None:
            prepare_user_namespace(upcoming)  # kept in userns' cache for the first create to take
    except Exception:
        log.warning("warming up the host worker failed (its first task makes what it needs)", exc_info=True)


def warm_up_in_background(host_id: str) -> threading.Thread:
    thread = threading.Thread(target=warm_up, args=(host_id,), name="host-warm-up", daemon=True)
    thread.start()
    return thread


def runs_tasks_in_this_process(consumer: Any) -> bool:
    """Whether the worker's pool runs tasks in the main process (solo, threads): its children (prefork)
    warm up on their own, at `worker_process_init`."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    return not isinstance(getattr(consumer, "pool", None), PreforkPool)
