"""The UI's current tenant: kept in the session, always re-resolved through the permission layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from tenants.models import Tenant

SESSION_KEY = "current_tenant"


def tenants_for(user: Any) -> list[Tenant]:
    return list(Tenant.objects.for_user(user, "view").order_by("name"))


class CurrentTenantMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.tenant = None  # type: ignore[attr-defined]
        user = getattr(request, "user", None)
        if (
            user is not None
            and user.is_authenticated
            and request.path.startswith("/")
            and not request.path.startswith(("/api/", "/static/"))
        ):
            wanted = request.session.get(SESSION_KEY)
            visible = Tenant.objects.for_user(user, "view")
            tenant = visible.filter(pk=wanted).first() if wanted else None
            if tenant is None:
                tenant = visible.order_by("name").first()
                if tenant is not None:
                    request.session[SESSION_KEY] = str(tenant.pk)
            request.tenant = tenant  # type: ignore[attr-defined]
        return self.get_response(request)
