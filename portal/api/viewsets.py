"""Viewset bases that resolve every object through the permission layer.

GET uses the "view" action; writes use the viewset's `write_action` (or a per-action override).
An object outside the user's view is a 404; one they can see but not change is a 403 (audited).
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import Model, QuerySet
from django.shortcuts import get_object_or_404
from rest_framework import mixins, viewsets
from rest_framework.exceptions import PermissionDenied

from portal.permissions import Action
from tenants.actors import Actor


def tenant_of(obj: Any) -> Any:
    """The tenant an object belongs to (a Tenant is its own), or None for installation objects."""
    from tenants.models import Tenant

    if isinstance(obj, Tenant):
        return obj
    return getattr(obj, "tenant", None)


READ_ACTIONS = {"list", "retrieve", "metadata"}


class PermissionLayerViewSet(viewsets.GenericViewSet):
    model: ClassVar[type[Model]]
    tenant_concerned: Any = None
    write_action: ClassVar[Action] = "operate"
    action_overrides: ClassVar[dict[str, Action]] = {}

    # Set by `write_object`: a write routed through a read-only viewset (an @action or destroy) asks
    # the permission layer for that action instead of "view".
    requested_action: Action | None = None

    def permission_action(self) -> Action:
        if self.requested_action is not None:
            return self.requested_action
        if self.action in self.action_overrides:
            return self.action_overrides[self.action]
        if self.request.method in ("GET", "HEAD", "OPTIONS") or self.action in READ_ACTIONS:
            return "view"
        return self.write_action

    def base_queryset(self) -> QuerySet[Any]:
        return self.model.objects.all()  # type: ignore[attr-defined]

    def get_queryset(self) -> QuerySet[Any]:
        qs = self.base_queryset()
        return qs.for_user(self.request.user, self.permission_action())  # type: ignore[attr-defined]

    def get_object(self) -> Any:
        lookup = self.kwargs[self.lookup_url_kwarg or self.lookup_field]
        action = self.permission_action()
        obj = self.filter_queryset(self.get_queryset()).filter(**{self.lookup_field: lookup}).first()
        if obj is None:
            visible = self.base_queryset().for_user(self.request.user, "view")  # type: ignore[attr-defined]
            found = get_object_or_404(visible, **{self.lookup_field: lookup})
            self.tenant_concerned = tenant_of(found)
            raise PermissionDenied(f"Your role does not allow '{action}' on this {found._meta.verbose_name}.")
        # A later refusal on this object (an operator-only action) concerns its tenant.
        self.tenant_concerned = tenant_of(obj)
        self.check_object_permissions(self.request, obj)
        return obj

    def write_object(self, action: Action = "operate") -> Any:
        """The object of this request, resolved through the permission layer for `action`."""
        self.requested_action = action
        return self.get_object()

    @property
    def actor(self) -> Actor:
        return Actor.from_request(self.request)


class ReadOnlyPermissionLayerViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet
):
    pass
