"""One JSON error shape for the whole API: {"error": {"code", "message", "fields"?}}; denials audited."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.errors import ServiceError


def _message(detail: Any) -> str:
    if isinstance(detail, list) and detail:
        return _message(detail[0])
    if isinstance(detail, dict):
        for key, value in detail.items():
            return f"{key}: {_message(value)}"
    return str(detail)


def error_response(status_code: int, code: str, message: str, fields: Any = None) -> Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return Response(body, status=status_code)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    request = context.get("request")
    if isinstance(exc, ServiceError):
        if exc.status_code == 403 and request is not None and not exc.audited:
            _audit_denied(request, context, str(exc), exc.audit_action)
        fields = {exc.field: [exc.message]} if exc.field else None
        return error_response(exc.status_code, exc.code, exc.message, fields)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.PermissionDenied) and request is not None:
        _audit_denied(request, context, str(exc.detail))
    if isinstance(exc, exceptions.ValidationError):
        detail_fields: Any = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return error_response(status.HTTP_400_BAD_REQUEST, "invalid", _message(exc.detail), detail_fields)
    code = getattr(exc, "default_code", "error")
    detail = getattr(exc, "detail", str(exc))
    error = error_response(response.status_code, str(code), _message(detail))
    for header in ("WWW-Authenticate", "Retry-After"):
        if header in response:
            error[header] = response[header]
    return error


def _audit_denied(request: Any, context: dict[str, Any], reason: str, action: str = "") -> None:
    from tenants import audit
    from tenants.actors import Actor

    view = context.get("view")
    name = type(view).__name__ if view is not None else "api"
    actor = Actor.from_request(request)
    audit.record_denied(
        actor,
        action or f"api.{request.method.lower()}",
        tenant=_tenant_concerned(view, actor),
        view=name,
        path=request.path,
        reason=reason,
    )


def _tenant_concerned(view: Any, actor: Any) -> Any:
    """The tenant a refusal concerns, so that its admins see it: the object's, else the token's scope."""
    tenant = getattr(view, "tenant_concerned", None)
    if tenant is None and actor.token is not None and actor.token.tenant_id is not None:
        tenant = actor.token.tenant
    return tenant
