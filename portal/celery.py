"""The Celery app shared by the portal's worker and every host agent (same codebase)."""

import gc
import os

from celery import Celery
from celery.signals import worker_process_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("bulkhead")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
@worker_ready.connect
def _freeze_startup_objects(**_: object) -> None:
    """The worker's modules live as long as it does: keep them out of the cyclic collector's scans
    (in the main process, and in each prefork child as it starts)."""
    gc.freeze()
