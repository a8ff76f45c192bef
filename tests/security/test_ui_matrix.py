"""The UI half of the authorization matrix: every UI route x every persona x own/foreign/missing object.

UI routes are enumerated from the resolver (everything outside /api/ and /static/); a
route missing from UI_ROUTES fails the suite. Sessions only: API tokens do not sign in to the UI.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from tenants.models import ApiToken, Membership
from tests.conftest import World, build_world

USERS = ["oscar", "alice", "amir", "mia", "vic", "bob", "charlie", "anonymous"]
ACME_ROLES = {"alice": "owner", "amir": "admin", "mia": "member", "vic": "viewer"}


@dataclass(frozen=True)
class UiRoute:
    method: str = "GET"
    public: bool = False  # reachable signed out (the login page)
    operator_only: bool = False
    audit_only: bool = False  # owners, admins and operators
    obj: Callable[[World, str], Any] | None = None
    # For object routes: who may act on acme's object ("manage" = owner/admin of acme, "self" = alice,
    # "operate" = owner/admin/member, "view" = any role). Without an object: in the current tenant.
    acts: str = ""
    # Operators see this object of any tenant (the operations list shows them all tenants' operations).
    staff_sees_all: bool = False


def _membership(world: World, ownership: str) -> Any:
    user = "mia" if ownership == "acme" else "bob"
    tenant = world.acme if ownership == "acme" else world.globex
    return Membership.objects.get(user__username=user, tenant=tenant).pk


def _token(world: World, ownership: str) -> Any:
    user = "alice" if ownership == "acme" else "bob"
    return ApiToken.objects.filter(user__username=user).first().pk  # type: ignore[union-attr]


def _image(world: World, ownership: str) -> Any:
    from tests.imaging.images import db_image

    tenant = world.acme if ownership == "acme" else world.globex
    return db_image(tenant, f"matrix-{ownership}").pk  # type: ignore[attr-defined]


def _host(world: World, ownership: str) -> Any:
    from compute.models import Host

    return Host.objects.get_or_create(name="matrix-host", defaults={"cpus": 4, "memory_mib": 4096})[0].pk


def _secret(world: World, ownership: str) -> Any:
    from tenants.models import Secret

    tenant = world.acme if ownership == "acme" else world.globex
    return Secret.objects.get_or_create(tenant=tenant, name="matrix", defaults={"sealed_value": "x"})[0].pk


def _operation(world: World, ownership: str) -> Any:
    from portal.models import Operation

    tenant = world.acme if ownership == "acme" else world.globex
    return Operation.objects.create(kind="portal.selfcheck", tenant=tenant).pk


def _workload(world: World, ownership: str) -> Any:
    from compute.models import Host, Workload
    from tests.imaging.images import db_image

    tenant = world.acme if ownership == "acme" else world.globex
    image = db_image(tenant, f"matrix-w-{ownership}")
    host = Host.objects.get(pk=_host(world, ownership))
    return Workload.objects.create(tenant=tenant, name=f"w-{ownership}", image=image, host=host).pk


UI_ROUTES: dict[str, UiRoute] = {
    "login": UiRoute(public=True),
    "logout": UiRoute(method="POST", public=True),
    "dashboard": UiRoute(),
    "switch-tenant": UiRoute(method="POST", acts="member"),
    "selfcheck-start": UiRoute(method="POST", operator_only=True),
    "members": UiRoute(),
    "member-add": UiRoute(method="POST", acts="manage"),
    "member-role": UiRoute(method="POST", obj=_membership, acts="manage"),
    "member-remove": UiRoute(method="POST", obj=_membership, acts="manage"),
    "secrets": UiRoute(),
    "secret-create": UiRoute(method="POST", acts="manage"),
    "secret-set-value": UiRoute(method="POST", obj=_secret, acts="manage"),
    "secret-delete": UiRoute(method="POST", obj=_secret, acts="manage"),
    "tokens": UiRoute(),
    "token-create": UiRoute(method="POST"),
    "token-revoke": UiRoute(method="POST", obj=_token, acts="self"),
    "audit": UiRoute(audit_only=True),
    "operations": UiRoute(),
    "operation-detail": UiRoute(obj=_operation, acts="view", staff_sees_all=True),
    "tenants": UiRoute(operator_only=True),
    "tenant-create": UiRoute(method="POST", operator_only=True),
    "users": UiRoute(operator_only=True),
    "user-create": UiRoute(method="POST", operator_only=True),
    "user-set-active": UiRoute(
        method="POST", obj=lambda w, o: w.user("alice" if o == "acme" else "bob").pk, operator_only=True
    ),
    "tenant-delete": UiRoute(
        method="POST", obj=lambda w, o: (w.acme if o == "acme" else w.globex).pk, operator_only=True
    ),
    "password-change": UiRoute(),
    "images": UiRoute(),
    "image-import": UiRoute(method="POST", acts="operate"),
    "image-pull": UiRoute(method="POST", acts="operate"),
    "image-gc": UiRoute(method="POST", operator_only=True),
    "image-detail": UiRoute(obj=_image, acts="view"),
    "image-tag": UiRoute(method="POST", obj=_image, acts="operate"),
    "image-delete": UiRoute(method="POST", obj=_image, acts="operate"),
    "repositories": UiRoute(
        obj=lambda w, o: (w.acme if o == "acme" else w.globex).pk, acts="view", staff_sees_all=True
    ),
    "workloads": UiRoute(),
    "workload-create": UiRoute(method="POST", acts="operate"),
    "workload-detail": UiRoute(obj=_workload, acts="view"),
    "workload-start": UiRoute(method="POST", obj=_workload, acts="operate"),
    "workload-stop": UiRoute(method="POST", obj=_workload, acts="operate"),
    "workload-restart": UiRoute(method="POST", obj=_workload, acts="operate"),
    "workload-delete": UiRoute(method="POST", obj=_workload, acts="operate"),
    "workload-commit": UiRoute(method="POST", obj=_workload, acts="operate"),
    "workload-console-token": UiRoute(method="POST", obj=_workload, acts="operate"),
    "hosts": UiRoute(operator_only=True),
    "host-join": UiRoute(method="POST", operator_only=True),
    "host-state": UiRoute(method="POST", operator_only=True, obj=_host),
    "host-evacuate": UiRoute(method="POST", operator_only=True, obj=_host),
    "host-credential": UiRoute(method="POST", operator_only=True, obj=_host),
    "host-remove": UiRoute(method="POST", operator_only=True, obj=_host),
}


def _merge_area_routes() -> None:
    """Pages of other areas keep their matrix entries beside them (one file per area)."""
    from tests.security import ui_routes_backups, ui_routes_desired, ui_routes_network, ui_routes_volumes

    for module in (ui_routes_network, ui_routes_desired, ui_routes_volumes, ui_routes_backups):
        UI_ROUTES.update(module.ROUTES)


_merge_area_routes()


def ui_route_names() -> set[str]:
    names: set[str] = set()

    def walk(patterns: list[Any], prefix: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            # /metrics is an API (Prometheus' format, token auth): tests/portal/test_metrics_scope.py.
            if route.startswith(("api/", "static/", "metrics")):
                continue
            if isinstance(p, URLResolver):
                walk(p.url_patterns, route)
            elif isinstance(p, URLPattern) and p.name:
                names.add(p.name)

    walk(get_resolver().url_patterns, "")
    return names


def test_it_has_an_expectation_for_every_ui_route() -> None:
    missing = ui_route_names() - set(UI_ROUTES)
    assert not missing, f"Add these UI routes to the authorization matrix: {sorted(missing)}"


def ok(status: int) -> bool:
    # Allowed: the page, a redirect after a POST, or a validation answer for an empty form.
    return status in {200, 204, 302, 400, 409, 422}


def expected_ok(route: UiRoute, user: str, ownership: str | None) -> bool | None:
    """True: allowed (ok()), False: must be 404, None: anonymous -> redirect to login."""
    if user == "anonymous":
        return True if route.public else None
    staff = user == "oscar"
    if route.operator_only:
        return staff and ownership != "missing"
    if route.audit_only:
        return staff or ACME_ROLES.get(user) in {"owner", "admin"} or user == "bob"
    # The UI acts within the current tenant (acme for its members and for operators, globex for bob);
    # what the role may not do there is not offered, and answers 404 like a foreign object.
    managers = {"acme": {"oscar", "alice", "amir"}, "globex": {"bob"}}
    operators = {"acme": {"oscar", "alice", "amir", "mia"}, "globex": {"bob"}}
    viewers = {"acme": {"oscar", *ACME_ROLES}, "globex": {"bob"}}
    if route.obj is None:
        if route.acts == "manage":
            return user in managers["acme"] | managers["globex"]
        if route.acts == "operate":
            return user in operators["acme"] | operators["globex"]
        if route.acts == "member":  # switching to acme
            return staff or user in ACME_ROLES
        return True
    if ownership == "missing":
        return False
    if route.staff_sees_all and staff:
        return True
    if route.acts == "self":
        # The UI revokes only your own tokens, operators included (the API lets operators revoke any).
        return user == ("alice" if ownership == "acme" else "bob")
    if route.acts == "operate":
        return user in operators[ownership]
    if route.acts == "view":
        return user in viewers[ownership]
    return user in managers[ownership]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "user"), [(n, u) for n in sorted(UI_ROUTES) for u in USERS])
def test_it_answers_each_ui_persona_as_the_role_matrix_says(name: str, user: str) -> None:
    world = build_world()
    route = UI_ROUTES[name]
    failures = []
    for ownership in ["acme", "globex", "missing"] if route.obj else [None]:
        with transaction.atomic():
            client = Client()
            if user != "anonymous":
                client.force_login(world.user(user))
            if ownership is None:
                url = reverse(name)
            elif ownership == "missing":
                pk = route.obj(world, "acme")  # type: ignore[misc]
                url = reverse(name, kwargs={"pk": uuid.uuid4() if isinstance(pk, uuid.UUID) else 10**9})
            else:
                url = reverse(name, kwargs={"pk": route.obj(world, ownership)})  # type: ignore[misc]
            data = {"tenant": str(world.acme.pk)} if name == "switch-tenant" else {}
            response = client.get(url) if route.method == "GET" else client.post(url, data)
            want = expected_ok(route, user, ownership)
            if want is None:
                good = response.status_code == 302 and response["Location"].startswith(reverse("login"))
            elif want:
                good = ok(response.status_code)
            else:
                good = response.status_code == 404
            if not good:
                failures.append(f"{route.method} {url} [{ownership}] -> {response.status_code}, want {want}")
            transaction.set_rollback(True)
    assert not failures, "\n".join(failures)
