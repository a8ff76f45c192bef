"""Image tasks: thin, load the operation and call a service (which reports progress)."""

from __future__ import annotations

from typing import Any

from imaging import services
from portal.celery import app
from portal.tasks import OperationTask


@app.task(base=OperationTask, bind=True, name="imaging.import_image")
def import_image(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Import an uploaded archive or an operator's layout directory."""
    return services.run_import(op_id, self.progress)


@app.task(base=OperationTask, bind=True, name="imaging.pull_image")
def pull_image(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Pull an image from an allowlisted registry."""
    return services.run_pull(op_id, self.progress)


@app.task(base=OperationTask, bind=True, name="imaging.push_image")
def push_image(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Unpack and register an image pushed to the built-in registry."""
    return services.run_push(op_id, self.progress)


@app.task(base=OperationTask, bind=True, name="imaging.gc_store")
def gc_store(self: OperationTask, op_id: str) -> dict[str, Any]:
    """Garbage-collect the layer store."""
    return services.run_gc(op_id, self.progress)
