from django.db import models


class VolumeState(models.TextChoices):
    CREATING = "creating", "Creating"
    READY = "ready", "Ready"
    RESIZING = "resizing", "Resizing"
    RESTORING = "restoring", "Restoring"
    DELETING = "deleting", "Deleting"
    FAILED = "failed", "Failed"


class SnapshotState(models.TextChoices):
    CREATING = "creating", "Creating"
    READY = "ready", "Ready"
    DELETING = "deleting", "Deleting"
    FAILED = "failed", "Failed"
