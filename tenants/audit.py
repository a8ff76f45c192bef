"""Writing the audit log. Every state change and every denied attempt passes through `record`."""

from __future__ import annotations

from typing import Any

from django.db import models

from tenants.actors import Actor
from tenants.choices import AuditOutcome
from tenants.models import AuditEntry, Tenant


def tenant_of(target: Any) -> Tenant | None:
    if isinstance(target, Tenant):
        return target
    return getattr(target, "tenant", None)


def record(
    actor: Actor,
    action: str,
    target: models.Model | None = None,
    *,
    tenant: Tenant | None = None,
    outcome: str = AuditOutcome.OK,
    object_type: str = "",
    object_id: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry. The tenant defaults to the target's, so tenant admins see it."""
    if target is not None:
        object_type = object_type or target._meta.model_name or ""
        object_id = object_id or str(target.pk)
        tenant = tenant or tenant_of(target)
    return AuditEntry.objects.create(
        actor=actor.user,
        actor_token=actor.token,
        actor_label=actor.label,
        tenant=tenant,
        action=action,
        object_type=object_type,
        object_id=object_id,
        outcome=outcome,
        request_id=actor.request_id,
        source_address=actor.source_address,
        details=details or {},
    )


def record_denied(actor: Actor, action: str, *, tenant: Tenant | None = None, **details: Any) -> AuditEntry:
    return record(actor, action, tenant=tenant, outcome=AuditOutcome.DENIED, details=details)
