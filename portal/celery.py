"""The portal's Celery app (its worker, beat, and `make run`'s local host worker). A joined host runs its own
Django-free app, `compute.host.worker`, with the same settings (`compute.host.celery_settings`)."""

import os

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from compute.host.celery_settings import freeze_startup_objects

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("bulkhead")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
worker_process_init.connect(freeze_startup_objects, weak=False)
worker_ready.connect(freeze_startup_objects, weak=False)
