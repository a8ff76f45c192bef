"""The Celery app shared by the portal's worker and every host agent (same codebase)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("bulkhead")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
