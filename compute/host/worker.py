"""A joined host's Celery worker: `python -m celery -A compute.host.worker worker -Q host.<id>`.

Django-free: its settings are `compute.host.celery_settings` (the very ones the portal's worker runs
with) and the host's own configuration (its broker user and credential, its key prefix); its tasks are
the host's (`compute.host.tasks`, `compute.host.volume_tasks`), which report through the host API. The
tasks are `shared_task`s: under `make run` the portal's worker registers the same ones for its local host.
The process that runs tasks makes its link's client and the next user namespace as it starts
(`compute.host.startup`), not in its first task.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from compute.host import celery_settings, startup
from compute.host.broker import key_prefix
from compute.host.process import configure_from_environment

HOST_TASK_MODULES = ("compute.host.tasks", "compute.host.volume_tasks")

local = configure_from_environment(require_portal=False)
host_id = os.environ.get("BULKHEAD_HOST_ID", "")

app = Celery("bulkhead-host")
app.conf.update(celery_settings.host_worker(local.broker_url, key_prefix(host_id) if host_id else ""))
app.conf.imports = HOST_TASK_MODULES

worker_process_init.connect(celery_settings.freeze_startup_objects, weak=False)
worker_ready.connect(celery_settings.freeze_startup_objects, weak=False)


def warm_up_child(**_: Any) -> None:
    startup.warm_up_in_background(host_id)


def warm_up_main(sender: Any = None, **_: Any) -> None:
    if startup.runs_tasks_in_this_process(sender):
        startup.warm_up_in_background(host_id)


worker_process_init.connect(warm_up_child, weak=False)
worker_ready.connect(warm_up_main, weak=False)
