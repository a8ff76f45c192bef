"""Quota enforcement: check and allocate under a row lock, in the caller's transaction.

Two concurrent creations serialize on the tenant's quota row, so they can never pass a limit together.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.db.models import F

from portal.errors import ServiceError
from tenants.models import Quota, Tenant

Amount = int | Decimal


class QuotaExceeded(ServiceError):
    status_code = 409
    code = "quota_exceeded"

    def __init__(self, resource: str, requested: Amount, used: Amount, limit: Amount) -> None:
        self.resource, self.requested, self.used, self.limit = resource, requested, used, limit
        super().__init__(
            f"Quota exceeded for {resource}: requested {requested}, {used} of {limit} already in use.",
            field=resource,
            audit_action="quota.exceeded",
        )


def _check_names(amounts: dict[str, Amount]) -> None:
    unknown = set(amounts) - set(Quota.RESOURCES)
    if unknown:
        raise ValueError(f"Unknown quota resources: {sorted(unknown)}")


def allocate(tenant: Tenant, **amounts: Amount) -> Quota:
    """Reserve amounts of each resource or raise QuotaExceeded, changing nothing."""
    _check_names(amounts)
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("quota.allocate must run inside the transaction that creates the object")
    quota = Quota.objects.select_for_update().get(tenant=tenant)
    for resource, amount in amounts.items():
        used = getattr(quota, f"used_{resource}")
        limit = getattr(quota, resource)
        if amount > 0 and used + amount > limit:
            raise QuotaExceeded(resource, amount, used, limit)
    Quota.objects.filter(pk=quota.pk).update(
        **{f"used_{r}": F(f"used_{r}") + amount for r, amount in amounts.items()}
    )
    # The row is locked until our commit: what we added is exactly what it holds (no reading it back).
    for resource, amount in amounts.items():
        setattr(quota, f"used_{resource}", getattr(quota, f"used_{resource}") + amount)
    return quota


def release(tenant: Tenant, **amounts: Amount) -> None:
    """Give amounts back (never below zero)."""
    _check_names(amounts)
    with transaction.atomic():
        quota = Quota.objects.select_for_update().get(tenant=tenant)
        for resource, amount in amounts.items():
            field = f"used_{resource}"
            setattr(quota, field, max(getattr(quota, field) - amount, 0))
        quota.save(update_fields=[f"used_{r}" for r in amounts])
