"""Errors services raise; the API and the UI turn them into clear 4xx answers."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    code = "invalid"

    def __init__(
        self, message: str, *, field: str | None = None, audit_action: str = "", **details: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # A denial is audited by whoever turns the error into a response: outside the service's
        # transaction, which the error rolls back.
        self.audit_action = audit_action
        self.audited = False
        self.details = details


class Invalid(ServiceError):
    pass


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class NotPermitted(ServiceError):
    status_code = 403
    code = "permission_denied"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class BrokerUnavailable(Unavailable):
    code = "broker_unavailable"


class Explained(Exception):
    """An error whose text was written for the tenant: it says what is wrong with their request or
    object and names nothing of the host. Anything else that fails an operation is shown to tenants as
    a generic message (``tenant_message``); its text (paths, runtime output) is kept for operators."""


INTERNAL_FAILURE = (
    "The operation failed because of a problem on the platform, not in your request. "
    "An operator can see the details of this operation."
)


def tenant_message(exc: BaseException) -> str:
    """What a tenant may read about `exc`: its own text if it was written for them, else a generic one."""
    if isinstance(exc, ServiceError):
        return exc.message
    if isinstance(exc, Explained):
        return str(exc)
    return INTERNAL_FAILURE


def operator_detail(exc: BaseException) -> str:
    """The full text of `exc` for operators (type and message; the traceback is in the worker's log)."""
    return f"{type(exc).__name__}: {exc}"
