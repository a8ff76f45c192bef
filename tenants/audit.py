"""Writing the audit log. Every state change and every denied attempt passes through `record`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import models

from portal.errors import ServiceError
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


P = ParamSpec("P")
R = TypeVar("R")


def denials_audited(service: Callable[P, R]) -> Callable[P, R]:
    """Record a refused attempt after the service's transaction rolled back, so the entry stays.

    Put it outside @transaction.atomic; the service raises a ServiceError with `audit_action`.
    """

    @functools.wraps(service)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return service(*args, **kwargs)
        except ServiceError as error:
            actor = kwargs.get("actor")
            if error.audit_action and isinstance(actor, Actor) and not error.audited:
                tenants = (tenant_of(value) for value in kwargs.values() if not isinstance(value, Actor))
                tenant = next((t for t in tenants if isinstance(t, Tenant)), None)
                record_denied(
                    actor,
                    error.audit_action,
                    tenant=tenant,
                    reason=error.message,
                )
                error.audited = True
            raise

    return wrapper
