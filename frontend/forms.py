"""Forms of the UI. They parse and validate input; the views hand the cleaned data to a service."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone

from imaging.models import Image
from portal.client_address import client_address
from portal.models import OperationState
from tenants import audit
from tenants.actors import Actor
from tenants.authentication import count_failure, failures_exceeded, user_failure_key
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
    """Django's login form with the API's throttle on failed attempts, per client address and username."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-in attempts from your address; wait a minute and retry.",
    }

    def _failure_key(self) -> str:
        address = client_address(self.request.META) if self.request else None
        return user_failure_key(address, self.data.get("username") or "")

    def clean(self) -> dict[str, Any]:
        if failures_exceeded(self._failure_key()):
            raise forms.ValidationError(self.error_messages["throttled"], code="throttled")
        try:
            return super().clean()
        except forms.ValidationError:
            self._note_failure()
            raise

    def _note_failure(self) -> None:
        count_failure(self._failure_key())
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


# --- images, workloads and hosts ------------------------------------------------------------------


class ImageImportForm(forms.Form):
    archive = forms.FileField(
        help_text="An OCI image layout as a tar (skopeo oci-archive) or a docker-save archive."
    )
    name = forms.CharField(max_length=200)
    tag = forms.CharField(max_length=128, initial="latest")


class ImagePullForm(forms.Form):
    reference = forms.CharField(
        max_length=500, help_text="host[:port]/repository[:tag|@sha256:…], from an allowlisted registry."
    )
    name = forms.CharField(max_length=200, required=False, help_text="Defaults to the repository.")
    tag = forms.CharField(max_length=128, required=False, help_text="Defaults to the reference's tag.")
    username = forms.CharField(max_length=200, required=False, label="Registry username")
    password = forms.CharField(
        max_length=2000,
        required=False,
        strip=False,
        label="Registry password",
        widget=forms.PasswordInput(attrs={"autocomplete": "off"}, render_value=False),
    )


class ImageTagForm(forms.Form):
    name = forms.CharField(max_length=200)
    tag = forms.CharField(max_length=128)


def split_words(text: str, field_label: str) -> list[str] | None:
    """Shell-like words (quotes respected) as a list, never run by a shell; empty text is None."""
    import shlex

    if not text.strip():
        return None
    try:
        return shlex.split(text)
    except ValueError as error:
        raise forms.ValidationError(f"{field_label}: {error} (check the quotes).") from None


def parse_env_lines(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise forms.ValidationError(f"Line {number}: write KEY=VALUE.")
        env[key] = value
    return env


NETWORK_AUTOMATIC = ""
NETWORK_NONE = "none"


class WorkloadCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63, validators=[dns_label], help_text="Lowercase letters, digits, hyphens."
    )
    image = forms.ModelChoiceField(queryset=Image.objects.none(), empty_label="Choose an image")
    isolation = forms.ChoiceField(choices=[], initial="namespace")
    command = forms.CharField(
        required=False,
        max_length=4000,
        label="Command (entrypoint)",
        help_text='Split like a shell line, e.g. /bin/sh -c "echo hi"; never run by a shell.',
    )
    args = forms.CharField(
        required=False, max_length=4000, label="Arguments (cmd)", help_text="Replaces the image's cmd."
    )
    env = forms.CharField(
        required=False,
        max_length=20000,
        label="Environment",
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "KEY=VALUE, one per line"}),
    )
    secret_env = forms.CharField(
        required=False,
        max_length=20000,
        label="Secret variables",
        help_text="The value comes from the tenant's secret of that name when the workload starts.",
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "DB_PASSWORD=db-password, one per line"}),
    )
    workdir = forms.CharField(required=False, max_length=4096, label="Working directory")
    user = forms.CharField(required=False, max_length=64, help_text="uid[:gid] or a name from the image.")
    vcpus = forms.DecimalField(max_digits=5, decimal_places=2, initial=1, min_value=0.01, label="vCPUs")
    memory_mib = forms.IntegerField(initial=256, min_value=16, label="Memory (MiB)")
    disk_gib = forms.IntegerField(
        initial=1, min_value=1, required=False, label="Disk (GiB)", help_text="Writable space."
    )
    restart_policy = forms.ChoiceField(choices=[], initial="never", label="Restart")
    on_host_lost = forms.ChoiceField(
        choices=[("wait", "Wait for the host"), ("reschedule", "Run it on another host")],
        initial="wait",
        label="If its host is lost",
        required=False,
    )
    network = forms.ChoiceField(
        choices=[],
        required=False,
        label="Network",
        help_text="The compartment it joins; its address and name resolve there.",
    )
    ports = forms.CharField(
        required=False,
        max_length=500,
        label="Published ports",
        help_text="Workload ports to reach from outside, e.g. 80, 443/tcp, 53/udp.",
    )
    volumes = forms.CharField(
        required=False,
        max_length=1000,
        label="Volumes",
        help_text="Volumes to mount, e.g. db-data:/var/lib/db, assets:/srv:ro. It runs on their host.",
    )
    start = forms.BooleanField(required=False, initial=True, label="Start it now")

    def __init__(self, *args: Any, images: Any, networks: Any = (), **kwargs: Any) -> None:
        from compute.choices import Isolation, RestartPolicy

        super().__init__(*args, **kwargs)
        self.fields["image"].queryset = images  # type: ignore[attr-defined]
        self.fields["network"].choices = [  # type: ignore[attr-defined]
            (NETWORK_AUTOMATIC, "Automatic (the tenant's default network where hosts have networks)"),
            (NETWORK_NONE, "None"),
            *((str(compartment.pk), compartment.name) for compartment in networks),
        ]
        self.fields["isolation"].choices = Isolation.choices  # type: ignore[attr-defined]
        self.fields["restart_policy"].choices = RestartPolicy.choices  # type: ignore[attr-defined]

    def clean_command(self) -> list[str] | None:
        return split_words(self.cleaned_data.get("command") or "", "Command")

    def clean_ports(self) -> list[tuple[int, str]]:
        """ "80, 443/tcp, 53/udp" -> [(80, "tcp"), (443, "tcp"), (53, "udp")]."""
        ports: list[tuple[int, str]] = []
        for item in (self.cleaned_data.get("ports") or "").replace(",", " ").split():
            number, _, protocol = item.partition("/")
            protocol = protocol.lower() or "tcp"
            if not number.isdigit() or not 1 <= int(number) <= 65535 or protocol not in ("tcp", "udp"):
                raise forms.ValidationError(f"{item!r} is not a port like 80, 443/tcp or 53/udp.")
            if (int(number), protocol) not in ports:
                ports.append((int(number), protocol))
        if ports and self.cleaned_data.get("network") == NETWORK_NONE:
            raise forms.ValidationError("A workload without a network cannot publish ports.")
        return ports

    def clean_volumes(self) -> list[dict[str, Any]]:
        """ "db:/var/lib/db, assets:/srv:ro" -> [{"volume": "db", "path": "/var/lib/db", ...}]."""
        mounts = []
        for item in (self.cleaned_data.get("volumes") or "").replace(",", " ").split():
            name, _, rest = item.partition(":")
            path, _, mode = rest.partition(":")
            if not name or not path or mode not in ("", "ro", "rw"):
                raise forms.ValidationError(f"{item!r} is not like db-data:/var/lib/db or assets:/srv:ro.")
            mounts.append({"volume": name, "path": path, "read_only": mode == "ro"})
        return mounts

    def clean_args(self) -> list[str] | None:
        return split_words(self.cleaned_data.get("args") or "", "Arguments")

    def clean_env(self) -> dict[str, str]:
        return parse_env_lines(self.cleaned_data.get("env") or "")

    def clean_secret_env(self) -> dict[str, str]:
        return {k: v.strip() for k, v in parse_env_lines(self.cleaned_data.get("secret_env") or "").items()}


class WorkloadCommitForm(forms.Form):
    name = forms.CharField(max_length=200, label="Image name")
    tag = forms.CharField(max_length=128, initial="latest")


class HostStateForm(forms.Form):
    state = forms.ChoiceField(
        choices=[("ready", "Ready"), ("draining", "Draining"), ("maintenance", "Maintenance")]
    )


class JoinTokenForm(forms.Form):
    host_name = forms.CharField(max_length=63, validators=[dns_label], help_text="Its name in Bulkhead.")
    labels = forms.CharField(
        required=False,
        max_length=4000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "zone=a, one KEY=VALUE per line"}),
    )
    cpu_overcommit = forms.DecimalField(
        required=False, max_digits=5, decimal_places=2, min_value=0.1, help_text="Default 4."
    )
    memory_overcommit = forms.DecimalField(
        required=False, max_digits=5, decimal_places=2, min_value=0.1, help_text="Default 1."
    )
    oci_runtime_override = forms.ChoiceField(
        required=False, label="OCI runtime", choices=[("", "Detect"), ("runc", "runc"), ("crun", "crun")]
    )
    domain_type_override = forms.ChoiceField(
        required=False,
        label="Micro-VM acceleration",
        choices=[("", "Detect"), ("kvm", "KVM"), ("qemu", "TCG (emulated)")],
    )

    def clean_labels(self) -> dict[str, str]:
        labels = parse_env_lines(self.cleaned_data.get("labels") or "")
        for key, value in labels.items():
            if len(key) > 63 or len(value) > 200:
                raise forms.ValidationError(f"The label {key[:63]!r} is too long.")
        return labels

    def profile(self) -> dict[str, Any]:
        """The host profile as the API's join_tokens action stores it (strings, labels a dict)."""
        data = self.cleaned_data
        profile: dict[str, Any] = {}
        if data.get("labels"):
            profile["labels"] = data["labels"]
        for key in ("cpu_overcommit", "memory_overcommit"):
            if data.get(key) is not None:
                profile[key] = str(data[key])
        for key in ("oci_runtime_override", "domain_type_override"):
            if data.get(key):
                profile[key] = data[key]
        return profile


class PasswordChangeForm(forms.Form):
    old_password = forms.CharField(label="Current password", widget=forms.PasswordInput(render_value=False))
    new_password = forms.CharField(
        label="New password", min_length=10, widget=forms.PasswordInput(render_value=False)
    )
    new_password_again = forms.CharField(label="New password, again", widget=forms.PasswordInput())

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("new_password") and data.get("new_password") != data.get("new_password_again"):
            self.add_error("new_password_again", "The two new passwords differ.")
        return data
