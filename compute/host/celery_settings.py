"""The Celery settings every worker of Bulkhead runs with, the portal's and each host's: one place, no Django.

`portal/settings.py` turns `SHARED` into its `CELERY_*` settings; a host's own worker
(`compute.host.worker`) takes `SHARED` plus `HOST_WORKER`. Celery's own (lower-case) names.
"""

from __future__ import annotations

import os
from typing import Any


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def shared() -> dict[str, Any]:
    """JSON only, late acks, a lost worker puts the message back, time limits on every task."""
    return {
        "result_backend": None,
        # Operations keep their results in their rows; the (disabled) backend is stateless and may be
        # shared by threads. Without this Celery looks it up again in every thread, and Django's ASGI
        # handler runs each request in a new one: about 10 ms of CPU per request that starts an operation.
        "result_backend_thread_safe": True,
        "task_ignore_result": True,
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": _env_int("BULKHEAD_TASK_SOFT_TIME_LIMIT", 900),
        "task_time_limit": _env_int("BULKHEAD_TASK_TIME_LIMIT", 960),
        "task_default_queue": "default",
        "broker_transport_options": {"visibility_timeout": 3600},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


# A host's worker: remote control and events would need channels and queues outside its key prefix (its
# broker user may touch nothing else) and nothing in the portal uses them: off (compute/broker_access.py).
HOST_WORKER: dict[str, Any] = {
    "worker_enable_remote_control": False,
    "worker_send_task_events": False,
    "task_send_sent_event": False,
}


def host_worker(broker_url: str, key_prefix: str) -> dict[str, Any]:
    """A host worker's settings: the shared ones, every broker key under the host's own prefix."""
    settings = {**shared(), **HOST_WORKER, "broker_url": broker_url}
    transport = {**settings["broker_transport_options"], "global_keyprefix": key_prefix}
    settings["broker_transport_options"] = transport
    return settings


def django_names(settings: dict[str, Any]) -> dict[str, Any]:
    """`task_acks_late` -> `CELERY_TASK_ACKS_LATE` (what `config_from_object(namespace="CELERY")` reads)."""
    return {f"CELERY_{name.upper()}": value for name, value in settings.items()}


def freeze_startup_objects(**_: object) -> None:
    """A worker's modules live as long as it does: keep them out of the cyclic collector's scans (in the
    main process, and in each prefork child as it starts). Connected by both apps to worker_ready and
    worker_process_init."""
    import gc

    gc.freeze()


def worker_argv(app: str, queues: list[str], node_name: str) -> list[str]:
    """The command of a worker of Celery app `app` (`portal`, or a host's `compute.host.worker`)."""
    import sys

    return [
        sys.executable, "-m", "celery", "-A", app, "worker", "-l", "WARNING",
        "-Q", ",".join(queues), "--concurrency", "2", "-n", node_name,
    ]  # fmt: skip


def host_worker_argv(app: str, host_id: str, node_name: str) -> list[str]:
    """A host's worker: its one queue, and none of gossip/mingle/heartbeat, which broadcast on channels
    outside the host's key prefix."""
    from compute.host.broker import host_queue

    return [
        *worker_argv(app, [host_queue(host_id)], node_name),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
