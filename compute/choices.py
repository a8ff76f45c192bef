from django.db import models


class HostState(models.TextChoices):
    READY = "ready", "Ready"
    DRAINING = "draining", "Draining"
    LOST = "lost", "Lost"
    MAINTENANCE = "maintenance", "Maintenance"
    # Retired by an operator: credentials revoked, never placed on, kept for the audit trail.
    REMOVED = "removed", "Removed"


class Isolation(models.TextChoices):
    NAMESPACE = "namespace", "Namespace container"
    MICROVM = "microvm", "Micro-VM"


class RestartPolicy(models.TextChoices):
    NEVER = "never", "Never"
    ON_FAILURE = "on-failure", "On failure"
    ALWAYS = "always", "Always"


class HostLostPolicy(models.TextChoices):
    """What happens to a workload when its host is lost (silent past the heartbeat deadline)."""

    WAIT = "wait", "Wait for the host"
    RESCHEDULE = "reschedule", "Run it on another host"


class WorkloadState(models.TextChoices):
    PENDING = "pending", "Pending"
    CREATING = "creating", "Creating"
    RUNNING = "running", "Running"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"
    UNKNOWN = "unknown", "Unknown"
    DELETING = "deleting", "Deleting"
