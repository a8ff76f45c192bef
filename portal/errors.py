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
