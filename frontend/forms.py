"""Forms of the UI. They parse and validate input; the views hand the cleaned data to a service."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.utils import timezone

from portal.models import OperationState
from tenants import audit
from tenants.actors import Actor
from tenants.choices import AuditOutcome, Role
from tenants.models import Tenant, dns_label


def add_service_error(form: forms.Form, error: Exception, field_map: dict[str, str] | None = None) -> None:
    """Show a refusal (ServiceError, QuotaExceeded) next to the field it names, or above the form."""
    name = getattr(error, "field", None)
    name = (field_map or {}).get(name or "", name)
    form.add_error(name if name in form.fields else None, refusal_message(error))


def refusal_message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


class LoginForm(AuthenticationForm):
    """Django's login form with the API's per-address throttle on failed attempts."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-in attempts from your address; wait a minute and retry.",
    }

    def _failure_key(self) -> str:
        address = self.request.META.get("REMOTE_ADDR", "-") if self.request else "-"
        return f"authfail:{address}"

    def clean(self) -> dict[str, Any]:
        if (cache.get(self._failure_key()) or 0) >= settings.BULKHEAD_AUTH_FAILURES_PER_MINUTE:
            raise forms.ValidationError(self.error_messages["throttled"], code="throttled")
        try:
            return super().clean()
        except forms.ValidationError:
            self._note_failure()
            raise

    def _note_failure(self) -> None:
        key = self._failure_key()
        if not cache.add(key, 1, timeout=60):
            try:
                cache.incr(key)
            except ValueError:
                cache.set(key, 1, timeout=60)
        if self.request is not None:
            username = (self.cleaned_data.get("username") or "")[:150]
            audit.record_denied(Actor.from_request(self.request), "auth.login", username=username)


class SwitchTenantForm(forms.Form):
    tenant = forms.UUIDField()


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. “CI deploys”.")
    tenant = forms.ModelChoiceField(
        queryset=Tenant.objects.none(),
        required=False,
        empty_label="All my tenants",
        label="Tenant scope",
        help_text="A scoped token sees only that tenant.",
    )
    read_only = forms.BooleanField(required=False, label="Read-only", help_text="The token can only read.")
    expires_in_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=3650,
        label="Expires after (days)",
        help_text="Leave empty for a token that does not expire.",
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["tenant"].queryset = Tenant.objects.for_user(user, "view").order_by("name")  # type: ignore[attr-defined]

    def expires_at(self) -> datetime | None:
        days = self.cleaned_data.get("expires_in_days")
        return timezone.now() + timedelta(days=days) if days else None


class AuditFilterForm(forms.Form):
    actor = forms.CharField(
        required=False, max_length=150, widget=forms.TextInput(attrs={"placeholder": "username"})
    )
    action = forms.CharField(
        required=False, max_length=64, widget=forms.TextInput(attrs={"placeholder": "e.g. membership."})
    )
    outcome = forms.ChoiceField(required=False, choices=[("", "Any outcome"), *AuditOutcome.choices])
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="Until", widget=forms.DateInput(attrs={"type": "date"}))
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), required=False, empty_label="All tenants")

    def __init__(self, *args: Any, tenants: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tenants is None:
            del self.fields["tenant"]
        else:
            self.fields["tenant"].queryset = tenants  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until < since:
            self.add_error("until", "The end of the range is before its start.")
        return data

    def filter(self, entries: Any) -> Any:
        """Narrow a queryset of audit entries; the date range is whole days in the current time zone."""
        data = self.cleaned_data
        if data.get("actor"):
            entries = entries.filter(actor_label__istartswith=data["actor"])
        if data.get("action"):
            entries = entries.filter(action__startswith=data["action"])
        if data.get("outcome"):
            entries = entries.filter(outcome=data["outcome"])
        tz = timezone.get_current_timezone()
        if data.get("since"):
            entries = entries.filter(time__gte=datetime.combine(data["since"], time.min, tzinfo=tz))
        if data.get("until"):
            end = datetime.combine(data["until"], time.min, tzinfo=tz) + timedelta(days=1)
            entries = entries.filter(time__lt=end)
        if data.get("tenant"):
            entries = entries.filter(tenant=data["tenant"])
        return entries


class OperationFilterForm(forms.Form):
    state = forms.ChoiceField(required=False, choices=[("", "Any state"), *OperationState.choices])


class TenantCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63, validators=[dns_label], help_text="Lowercase letters, digits, hyphens."
    )
    display_name = forms.CharField(max_length=200, required=False)
    owner = forms.CharField(max_length=150, required=False, label="Owner username", help_text="Optional.")


class UserCreateForm(forms.Form):
    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}), strip=False
    )
    password_again = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        strip=False,
        label="Password (again)",
    )
    is_staff = forms.BooleanField(required=False, label="Operator", help_text="Operators see every tenant.")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        password, again = data.get("password"), data.get("password_again")
        if password and again and password != again:
            self.add_error("password_again", "The two passwords differ.")
        elif password:
            try:
                password_validation.validate_password(password)
            except forms.ValidationError as error:
                self.add_error("password", error)
        return data
