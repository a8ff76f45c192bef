"""The htmx UI: small function views. Every query goes through the permission layer (`for_user`),
every change through a service with `Actor.from_request(request)`; an htmx request gets the partial.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.core.paginator import Page, Paginator
from django.db.models import Count, Prefetch, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from frontend import forms as f
from frontend import plots
from frontend.middleware import SESSION_KEY
from portal.errors import ServiceError
from portal.models import Operation
from portal.permissions import Action, acts_as_operator
from tenants import audit, services
from tenants.actors import Actor
from tenants.api.views import start_selfcheck
from tenants.choices import Role
from tenants.models import ApiToken, AuditEntry, Membership, Quota, Tenant
from tenants.quota import QuotaExceeded
from tenants.tokens import TOKEN_PREFIX

PAGE_SIZE = 50

View = Callable[..., HttpResponse]

# What services refuse with: shown to the user as a form error or a message, never a 500.
REFUSALS = (ServiceError, QuotaExceeded)


# --- plumbing -------------------------------------------------------------------------------------


def wants_partial(request: HttpRequest) -> bool:
    """The one htmx predicate. A history restore (cache miss after Back) needs the whole page."""
    htmx = request.htmx  # type: ignore[attr-defined]
    return bool(htmx) and not htmx.history_restore_request


def page_or_partial(
    request: HttpRequest, page: str, partial: str, context: dict[str, Any], status: int = 200
):
    return render(request, partial if wants_partial(request) else page, context, status=status)


def operator_required(view: View) -> View:
    """Operator pages do not exist for anybody else: a 404, like any object one may not see."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            raise Http404("No such page.")
        return view(request, *args, **kwargs)

    return login_required(wrapper)


def paginate(request: HttpRequest, rows: QuerySet[Any]) -> Page:
    return Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))


def done(request: HttpRequest, url_name: str, render_partial: Callable[[HttpRequest], HttpResponse]):
    """After a successful change: htmx swaps in the fresh partial, a plain form post redirects."""
    if wants_partial(request):
        return render_partial(request)
    return redirect(url_name)


# --- objects for the current user -----------------------------------------------------------------


def current_tenant(request: HttpRequest) -> Tenant | None:
    """The tenant the UI acts in (the middleware resolved it through the permission layer)."""
    return getattr(request, "tenant", None)


def may(request: HttpRequest, action: Action) -> bool:
    tenant = current_tenant(request)
    return tenant is not None and Tenant.objects.for_user(request.user, action).filter(pk=tenant.pk).exists()


def op_card(request: HttpRequest, op: Operation | None = None, error: str = "") -> HttpResponse:
    return render(request, "frontend/partials/operation_card.html", {"op": op, "error": error})


def get_current_tenant_for_user(request: HttpRequest, action: Action = "view") -> Tenant:
    tenant = getattr(request, "tenant", None)
    if tenant is None:
        raise Http404("No tenant selected.")
    return get_object_or_404(Tenant.objects.for_user(request.user, action), pk=tenant.pk)


def get_membership_for_user(request: HttpRequest, pk: int) -> Membership:
    tenant = get_current_tenant_for_user(request, "manage")
    memberships = Membership.objects.for_user(request.user, "manage").select_related("user", "tenant")
    return get_object_or_404(memberships, pk=pk, tenant=tenant)


def get_token_for_user(request: HttpRequest, pk: uuid.UUID) -> ApiToken:
    # The UI manages one's own tokens only (operators revoke other people's through the API).
    return get_object_or_404(ApiToken.objects.for_user(request.user).filter(user=request.user), pk=pk)


# --- sign in and out ------------------------------------------------------------------------------


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    authentication_form = f.LoginForm
    redirect_authenticated_user = True

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        response = super().form_valid(form)
        audit.record(Actor.from_request(self.request), "auth.login")
        return response


login_view = LoginView.as_view()
logout_view = auth_views.LogoutView.as_view()


# --- dashboard ------------------------------------------------------------------------------------

RESOURCE_LABELS = {
    "vcpus": "vCPUs",
    "memory_mib": "Memory",
    "disk_gib": "Disk",
    "workloads": "Workloads",
    "compartments": "Networks",
    "image_bytes": "Image storage",
    "published_ports": "Published ports",
    "volume_bytes": "Volumes",
}


def _amount(resource: str, value: Any) -> str:
    if resource == "memory_mib":
        return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"
    if resource in ("image_bytes", "volume_bytes"):
        return filesizeformat(value)
    if resource == "disk_gib":
        return f"{value} GiB"
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    return str(value)


def usage_rows(quota: Quota) -> list[dict[str, Any]]:
    rows = []
    for row in quota.usage():
        resource = row["resource"]
        level = "danger" if row["percent"] >= 90 else "warn" if row["percent"] >= 75 else "ok"
        rows.append(
            {
                **row,
                "label": RESOURCE_LABELS.get(resource, resource),
                "used_display": _amount(resource, row["used"]),
                "limit_display": _amount(resource, row["limit"]),
                "level": level,
            }
        )
    return rows


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    tenant = getattr(request, "tenant", None)
    context: dict[str, Any] = {"tenant": tenant}
    if tenant is not None:
        quota = Quota.objects.for_user(user).filter(tenant=tenant).first()
        context["usage"] = usage_rows(quota) if quota is not None else []
        from compute.usage import measured_usage

        context["measured"] = measured_usage(tenant)
        context["history_url"] = reverse("api:tenant-history", args=[tenant.pk])
        context["plots"] = plots.TENANT_PLOTS
        context["members_count"] = Membership.objects.for_user(user).filter(tenant=tenant).count()
        context["operations"] = (
            Operation.objects.for_user(user).filter(tenant=tenant).select_related("tenant")[:8]
        )
    if user.is_staff:
        context["tenants"] = (
            Tenant.objects.for_user(user).annotate(member_count=Count("memberships")).order_by("name")[:20]
        )
        context["tenant_total"] = Tenant.objects.for_user(user).count()
        context["all_operations"] = Operation.objects.for_user(user).select_related("tenant")[:10]
    return render(request, "frontend/dashboard.html", context)


@operator_required
@require_POST
def selfcheck_start(request: HttpRequest) -> HttpResponse:
    try:
        op = start_selfcheck(Actor.from_request(request))
    except REFUSALS as error:
        if wants_partial(request):
            return render(
                request, "frontend/partials/operation_card.html", {"error": f.refusal_message(error)}
            )
        messages.error(request, f.refusal_message(error))
        return redirect("dashboard")
    if wants_partial(request):
        return render(request, "frontend/partials/operation_card.html", {"op": op})
    messages.success(request, "Self-check started; follow it under Recent operations.")
    return redirect("dashboard")


# --- tenant switcher ------------------------------------------------------------------------------


@login_required
@require_POST
def switch_tenant(request: HttpRequest) -> HttpResponse:
    form = f.SwitchTenantForm(request.POST)
    if not form.is_valid():
        raise Http404("No such tenant.")
    tenant = get_object_or_404(Tenant.objects.for_user(request.user, "view"), pk=form.cleaned_data["tenant"])
    request.session[SESSION_KEY] = str(tenant.pk)
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("dashboard")
    return redirect(target)


# --- members --------------------------------------------------------------------------------------


def render_members(
    request: HttpRequest, add_form: f.MemberAddForm | None = None, status: int = 200
) -> HttpResponse:
    tenant = getattr(request, "tenant", None)
    user = request.user
    memberships = Membership.objects.none()
    can_manage = False
    if tenant is not None:
        memberships = Membership.objects.for_user(user).filter(tenant=tenant).select_related("user")
        can_manage = Tenant.objects.for_user(user, "manage").filter(pk=tenant.pk).exists()
    context = {
        "tenant": tenant,
        "memberships": memberships,
        "can_manage": can_manage,
        "add_form": add_form or f.MemberAddForm(),
        "roles": Role.choices,
    }
    return page_or_partial(
        request, "frontend/members.html", "frontend/partials/members.html", context, status
    )


@login_required
@require_GET
def members(request: HttpRequest) -> HttpResponse:
    return render_members(request)


@login_required
@require_POST
def member_add(request: HttpRequest) -> HttpResponse:
    tenant = get_current_tenant_for_user(request, "manage")
    form = f.MemberAddForm(request.POST)
    if form.is_valid():
        try:
            membership = services.add_member(
                actor=Actor.from_request(request),
                tenant=tenant,
                username=form.cleaned_data["username"],
                role=form.cleaned_data["role"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            messages.success(
                request,
                f"{membership.user.get_username()} joined {tenant} as {membership.get_role_display()}.",
            )
            return done(request, "members", render_members)
    return render_members(request, form, status=422)


@login_required
@require_POST
def member_role(request: HttpRequest, pk: int) -> HttpResponse:
    membership = get_membership_for_user(request, pk)
    form = f.MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the listed roles.")
    else:
        try:
            membership = services.change_role(
                actor=Actor.from_request(request), membership=membership, role=form.cleaned_data["role"]
            )
        except REFUSALS as error:
            messages.error(request, f.refusal_message(error))
        else:
            messages.success(
                request, f"{membership.user.get_username()} is now {membership.get_role_display()}."
            )
    return done(request, "members", render_members)


@login_required
@require_POST
def member_remove(request: HttpRequest, pk: int) -> HttpResponse:
    membership = get_membership_for_user(request, pk)
    username = membership.user.get_username()
    removed_self = membership.user_id == request.user.pk
    try:
        services.remove_member(actor=Actor.from_request(request), membership=membership)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
        return done(request, "members", render_members)
    messages.success(request, f"{username} no longer belongs to {membership.tenant}.")
    if removed_self and not request.user.is_staff:
        # The tenant may no longer be visible to us: start over from the dashboard.
        url = reverse("dashboard")
        return HttpResponseClientRedirect(url) if wants_partial(request) else redirect(url)
    return done(request, "members", render_members)


# --- API tokens -----------------------------------------------------------------------------------


def render_tokens(
    request: HttpRequest,
    form: f.TokenCreateForm | None = None,
    *,
    created: ApiToken | None = None,
    secret: str = "",
    status: int = 200,
) -> HttpResponse:
    tokens = list(ApiToken.objects.for_user(request.user).filter(user=request.user).select_related("tenant"))
    now = timezone.now()
    for token in tokens:
        expired = token.expires_at is not None and token.expires_at <= now
        token.status = "revoked" if token.revoked_at else "expired" if expired else "active"  # type: ignore[attr-defined]
    context = {
        "tokens": tokens,
        "form": form or f.TokenCreateForm(user=request.user),
        "created": created,
        "secret": secret,
        "token_prefix": TOKEN_PREFIX,
    }
    response = page_or_partial(
        request, "frontend/tokens.html", "frontend/partials/tokens.html", context, status
    )
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def tokens(request: HttpRequest) -> HttpResponse:
    return render_tokens(request)


@login_required
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    form = f.TokenCreateForm(request.POST, user=request.user)
    if form.is_valid():
        try:
            token, secret = services.create_token(
                actor=Actor.from_request(request),
                name=form.cleaned_data["name"],
                tenant=form.cleaned_data["tenant"],
                read_only=form.cleaned_data["read_only"],
                expires_at=form.expires_at(),
            )
        except REFUSALS as error:
            f.add_service_error(form, error, {"expires_at": "expires_in_days"})
        else:
            # Rendered, not redirected: the secret must not pass through the session or a URL.
            return render_tokens(request, created=token, secret=secret)
    return render_tokens(request, form, status=422)


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    token = get_token_for_user(request, pk)
    try:
        services.revoke_token(actor=Actor.from_request(request), token=token)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        messages.success(request, f"Token “{token.name}” ({token.prefix}) revoked.")
    return done(request, "tokens", render_tokens)


# --- audit log ------------------------------------------------------------------------------------


@login_required
@require_GET
def audit_log(request: HttpRequest) -> HttpResponse:
    user = request.user
    entries = AuditEntry.objects.for_user(user).select_related("tenant")
    if user.is_staff:
        form = f.AuditFilterForm(request.GET or None, tenants=Tenant.objects.for_user(user).order_by("name"))
        tenant = None
    else:
        tenant = get_current_tenant_for_user(request, "audit")
        # The tenant's log, plus the user's own actions that belong to no tenant (e.g. unscoped tokens).
        entries = entries.filter(Q(tenant=tenant) | Q(tenant__isnull=True, actor=user))
        form = f.AuditFilterForm(request.GET or None)
    if form.is_bound:
        entries = form.filter(entries) if form.is_valid() else entries.none()
    context = {"form": form, "page": paginate(request, entries), "tenant": tenant}
    return page_or_partial(request, "frontend/audit.html", "frontend/partials/audit_table.html", context)


# --- operations -----------------------------------------------------------------------------------


@login_required
@require_GET
def operations_list(request: HttpRequest) -> HttpResponse:
    user = request.user
    ops = Operation.objects.for_user(user).select_related("tenant", "actor")
    if not user.is_staff:
        tenant = getattr(request, "tenant", None)
        ops = ops.filter(tenant=tenant) if tenant is not None else ops.none()
    form = f.OperationFilterForm(request.GET or None)
    if form.is_bound and form.is_valid() and form.cleaned_data["state"]:
        ops = ops.filter(state=form.cleaned_data["state"])
    context = {"form": form, "page": paginate(request, ops), "show_tenant": user.is_staff}
    return page_or_partial(
        request, "frontend/operations.html", "frontend/partials/operations_table.html", context
    )


@login_required
@require_GET
def operation_detail(request: HttpRequest, pk: Any) -> HttpResponse:
    """One operation's log: each step with its time and progress, and the error that ended it."""
    op = get_object_or_404(Operation.objects.for_user(request.user).select_related("tenant", "actor"), pk=pk)
    # The real error and store figures are for operators; tenants read the operation's own error text.
    details = op.operator_details if acts_as_operator(request.user) else {}
    context = {"op": op, "entries": op.log_entries.all(), "operator_details": details}
    template = "frontend/partials/operation_log.html" if wants_partial(request) else "frontend/operation.html"
    return render(request, template, context)


# --- operator pages -------------------------------------------------------------------------------


def render_tenants(
    request: HttpRequest, form: f.TenantCreateForm | None = None, status: int = 200
) -> HttpResponse:
    owners = Membership.objects.filter(role=Role.OWNER).select_related("user").order_by("user__username")
    rows = (
        Tenant.objects.for_user(request.user)
        .annotate(member_count=Count("memberships"))
        .prefetch_related(Prefetch("memberships", queryset=owners, to_attr="owner_memberships"))
        .order_by("name")
    )
    context = {"page": paginate(request, rows), "form": form or f.TenantCreateForm()}
    return page_or_partial(
        request, "frontend/tenants.html", "frontend/partials/tenants.html", context, status
    )


@operator_required
@require_GET
def tenants(request: HttpRequest) -> HttpResponse:
    return render_tenants(request)


@operator_required
@require_POST
def tenant_create(request: HttpRequest) -> HttpResponse:
    form = f.TenantCreateForm(request.POST)
    if form.is_valid():
        owner = None
        if username := form.cleaned_data["owner"]:
            owner = get_user_model().objects.filter(username=username).first()
            if owner is None:
                form.add_error("owner", f"No user named {username!r}.")
        if not form.errors:
            try:
                tenant = services.create_tenant(
                    actor=Actor.from_request(request),
                    name=form.cleaned_data["name"],
                    display_name=form.cleaned_data["display_name"],
                    owner=owner,
                )
            except REFUSALS as error:
                f.add_service_error(form, error)
            else:
                messages.success(request, f"Tenant {tenant.name} created.")
                return done(request, "tenants", render_tenants)
    return render_tenants(request, form, status=422)


@operator_required
@require_POST
def tenant_delete(request: HttpRequest, pk: Any) -> HttpResponse:
    tenant = get_object_or_404(Tenant.objects.for_user(request.user, "own"), pk=pk)
    try:
        services.delete_tenant(actor=Actor.from_request(request), tenant=tenant)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        messages.success(request, f"Tenant {tenant.name} deleted.")
    return done(request, "tenants", render_tenants)


@operator_required
@require_POST
def user_set_active(request: HttpRequest, pk: Any) -> HttpResponse:
    user = get_object_or_404(get_user_model(), pk=pk)
    active = request.POST.get("active") == "1"
    try:
        services.update_user(actor=Actor.from_request(request), user=user, is_active=active)
    except REFUSALS as error:
        messages.error(request, f.refusal_message(error))
    else:
        state = "activated" if active else "deactivated: their sessions ended and their tokens stopped"
        messages.success(request, f"User {user.get_username()} {state}.")
    return done(request, "users", render_users)


@login_required
@never_cache
def password_change(request: HttpRequest) -> HttpResponse:
    """Change your own password: the current one is required; the session stays signed in."""
    from django.contrib.auth import update_session_auth_hash

    form = f.PasswordChangeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.change_password(
                actor=Actor.from_request(request),
                user=request.user,
                old_password=form.cleaned_data["old_password"],
                new_password=form.cleaned_data["new_password"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            update_session_auth_hash(request, request.user)  # type: ignore[arg-type]
            messages.success(request, "Your password was changed.")
            return redirect("dashboard")
    status = 422 if request.method == "POST" else 200
    return render(request, "frontend/password.html", {"form": form}, status=status)


def render_users(
    request: HttpRequest, form: f.UserCreateForm | None = None, status: int = 200
) -> HttpResponse:
    rows = get_user_model().objects.annotate(tenant_count=Count("memberships")).order_by("username")
    context = {"page": paginate(request, rows), "form": form or f.UserCreateForm()}
    return page_or_partial(request, "frontend/users.html", "frontend/partials/users.html", context, status)


@operator_required
@require_GET
def users(request: HttpRequest) -> HttpResponse:
    return render_users(request)


@operator_required
@require_POST
@never_cache
def user_create(request: HttpRequest) -> HttpResponse:
    form = f.UserCreateForm(request.POST)
    if form.is_valid():
        try:
            user = services.create_user(
                actor=Actor.from_request(request),
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password"],
                email=form.cleaned_data["email"],
                is_staff=form.cleaned_data["is_staff"],
            )
        except REFUSALS as error:
            f.add_service_error(form, error)
        else:
            messages.success(request, f"User {user.get_username()} created.")
            return done(request, "users", render_users)
    return render_users(request, form, status=422)
