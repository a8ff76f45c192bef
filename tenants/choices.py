from django.db import models

from portal.permissions import Role

__all__ = ["AuditOutcome", "Role"]


class AuditOutcome(models.TextChoices):
    OK = "ok", "OK"
    DENIED = "denied", "Denied"
    FAILED = "failed", "Failed"
