from typing import Any

from django.http import HttpRequest

from frontend.middleware import tenants_for
from portal.permissions import role_allows
from tenants.models import Membership


def current_tenant(request: HttpRequest) -> dict[str, Any]:
    """The header's tenant switcher and what the navigation may offer in the current tenant."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    tenant = getattr(request, "tenant", None)
    role = None
    if tenant is not None:
        role = Membership.objects.filter(tenant=tenant, user=user).values_list("role", flat=True).first()
    return {
        "current_tenant": tenant,
        "current_role": role,
        "my_tenants": tenants_for(user),
        "is_operator": user.is_staff,
        "can_manage": tenant is not None and (user.is_staff or role_allows(role, "manage")),
        "can_audit": user.is_staff or (tenant is not None and role_allows(role, "audit")),
    }
