"""The portal's Django project. Its Celery app (`portal.celery`) is loaded by what uses it (the tasks, the
worker's `-A portal`), not by every import of the package: the `bulkhead` CLI (`portal.cli`) starts
without it (Celery's import was ~110 ms of the CLI's ~180 ms start)."""

from typing import Any

__all__ = ["celery_app"]


def __getattr__(name: str) -> Any:
    if name == "celery_app":
        from portal.celery import app

        return app
    raise AttributeError(f"module 'portal' has no attribute {name!r}")
