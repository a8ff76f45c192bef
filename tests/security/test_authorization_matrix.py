"""The authorization matrix: every API route x every persona x an object of acme, of globex, or missing.

Routes are enumerated from the URL resolver; a route missing from ROUTES fails the suite, so coverage
cannot shrink silently. Expected outcomes follow the role matrix in README.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver

from portal.models import Operation
from portal.permissions import ROLES_ALLOWED
from tenants.models import ApiToken, AuditEntry, Membership, Quota
from tests.conftest import World, build_world, client_for
from tests.imaging.images import db_image

PERSONAS = [
    "oscar",
    "alice",
    "amir",
    "mia",
    "vic",
    "bob",
    "charlie",
    "anonymous",
    "mia_readonly",
    "alice_acme",
    "bob",
    "oscar_acme",
    "oscar_readonly",
]
PERSONAS = list(dict.fromkeys(PERSONAS))
TOKEN_USER = {
    "mia_readonly": "mia",
    "alice_acme": "alice",
    "bob": "bob",
    "oscar_acme": "oscar",
    "oscar_readonly": "oscar",
}
READ_ONLY_TOKENS = {"mia_readonly", "oscar_readonly"}
# A token scoped to a tenant is a member of that tenant only, operator or not.
SCOPED_TOKENS = {"alice_acme": "acme", "oscar_acme": "acme"}
RESTRICTED_TOKENS = READ_ONLY_TOKENS | set(SCOPED_TOKENS)

Ownership = str  # "acme" | "globex" | "missing"


def user_name(persona: str) -> str | None:
    if persona == "anonymous":
        return None
    return TOKEN_USER.get(persona, persona) if persona in TOKEN_USER and persona != "bob" else persona


def role_in(world: World, persona: str, tenant_name: str) -> str | None:
    name = user_name(persona)
    if name is None:
        return None
    if persona in SCOPED_TOKENS and SCOPED_TOKENS[persona] != tenant_name:
        return None
    if persona == "oscar_acme":
        return "owner"  # an operator inside the one tenant of its token
    tenant = world.acme if tenant_name == "acme" else world.globex
    m = Membership.objects.filter(user__username=name, tenant=tenant).first()
    return m.role if m else None


def is_staff(persona: str) -> bool:
    """Reads as an operator: the operator's session, or its read-only (unscoped) token."""
    return persona in ("oscar", "oscar_readonly")


def writes_as_operator(persona: str) -> bool:
    return persona == "oscar"


@dataclass(frozen=True)
class Route:
    """How to exercise one route and what each persona should get."""

    methods: tuple[str, ...]
    # For object routes: returns the object's pk for an ownership ("acme"/"globex").
    obj: Callable[[World, str], Any] | None = None
    read: str = "view"  # permission action for GET
    write: str = "operate"  # permission action for writes; "operator" = staff only after view
    visibility: str = "tenant"  # "tenant" | "self" (tokens, users: only their user and operators)
    list_post: int | None = None  # expected status of an empty POST to a collection (allowed personas)
    list_post_staff_only: bool = False
    list_post_operate: bool = False  # refused (403) to personas that may operate in no tenant
    extra: dict[str, Any] = field(default_factory=dict)
    # What an allowed GET may answer: 503 where the answer comes from a host's agent (none runs here).
    read_ok: frozenset[int] = frozenset({200})
    # Routes about the account itself (a password): read-only and tenant-scoped tokens are refused.
    refuses_restricted_tokens: bool = False


def _acme_or_globex(world: World, ownership: str) -> Any:
    return world.acme if ownership == "acme" else world.globex


def _membership(world: World, ownership: str) -> Any:
    user = "mia" if ownership == "acme" else "bob"
    return Membership.objects.get(user__username=user, tenant=_acme_or_globex(world, ownership)).pk


def _token(world: World, ownership: str) -> Any:
    user = "alice" if ownership == "acme" else "bob"
    return ApiToken.objects.filter(user__username=user).first().pk  # type: ignore[union-attr]


def _audit(world: World, ownership: str) -> Any:
    return AuditEntry.objects.filter(tenant=_acme_or_globex(world, ownership)).first().pk  # type: ignore[union-attr]


def _operation(world: World, ownership: str) -> Any:
    return Operation.objects.create(kind="test.noop", tenant=_acme_or_globex(world, ownership)).pk


def _secret(world: World, ownership: str) -> Any:
    from tenants.models import Secret

    tenant = _acme_or_globex(world, ownership)
    return Secret.objects.get_or_create(tenant=tenant, name="matrix", defaults={"sealed_value": "x"})[0].pk


def _user(world: World, ownership: str) -> Any:
    return world.user("alice" if ownership == "acme" else "bob").pk


def _egress_allowance(world: World, ownership: str) -> Any:
    from compute.compartments import EgressAllowance

    tenant = _acme_or_globex(world, ownership)
    return EgressAllowance.objects.get_or_create(tenant=tenant, network="198.51.100.20/32")[0].pk


ROUTES: dict[str, Route] = {
    "api-root": Route(methods=("GET",)),
    "tenant-list": Route(methods=("GET", "POST"), list_post=400, list_post_staff_only=True),
    "tenant-detail": Route(
        methods=("GET", "PATCH", "DELETE"),
        obj=lambda w, o: _acme_or_globex(w, o).pk,
        write="own",
        extra={"DELETE": "operator"},
    ),
    "tenant-history": Route(methods=("GET",), obj=lambda w, o: _acme_or_globex(w, o).pk),
    # Operators only open a protected network to a tenant; its members may see what was opened.
    "tenant-egress-allowances": Route(
        methods=("GET", "POST"), obj=lambda w, o: _acme_or_globex(w, o).pk, write="operator"
    ),
    "egress-allowance-list": Route(methods=("GET",)),
    "egress-allowance-detail": Route(methods=("GET", "DELETE"), obj=_egress_allowance, write="operator"),
    "membership-list": Route(methods=("GET", "POST"), list_post=400),
    "membership-detail": Route(methods=("GET", "PATCH", "DELETE"), obj=_membership, write="manage"),
    "token-list": Route(methods=("GET", "POST"), list_post=400),
    "token-detail": Route(methods=("GET", "DELETE"), obj=_token, visibility="self", write="view"),
    "secret-list": Route(methods=("GET", "POST"), list_post=400),
    "secret-detail": Route(methods=("GET", "PUT", "DELETE"), obj=_secret, write="manage"),
    "quota-list": Route(methods=("GET",)),
    "quota-detail": Route(
        methods=("GET", "PATCH"),
        obj=lambda w, o: Quota.objects.get(tenant=_acme_or_globex(w, o)).pk,
        write="operator",
    ),
    "audit-list": Route(methods=("GET",)),
    "audit-detail": Route(methods=("GET",), obj=_audit, read="audit"),
    "operation-list": Route(methods=("GET",)),
    "operation-detail": Route(methods=("GET",), obj=_operation),
    "operation-log": Route(methods=("GET",), obj=_operation),
    "operation-cancel": Route(methods=("POST",), obj=_operation, write="operate"),
    "operation-selfcheck": Route(methods=("POST",), list_post=202, list_post_staff_only=True),
    "user-list": Route(methods=("GET", "POST"), list_post=400, list_post_staff_only=True),
    "user-detail": Route(methods=("GET", "PATCH"), obj=_user, visibility="self", write="operator"),
    "user-me": Route(methods=("GET",)),
    "user-password": Route(methods=("POST",), list_post=400, refuses_restricted_tokens=True),
    "user-deactivate": Route(methods=("POST",), obj=_user, visibility="self", write="operator"),
    "user-activate": Route(methods=("POST",), obj=_user, visibility="self", write="operator"),
    "image-list": Route(methods=("GET",)),
    "image-detail": Route(
        methods=("GET", "DELETE"), obj=lambda w, o: db_image(_acme_or_globex(w, o), "matrix").pk
    ),
    # Refused before the body is read to whoever may add images nowhere.
    "image-import": Route(methods=("POST",), list_post=400, list_post_operate=True),
    "image-pull": Route(methods=("POST",), list_post=400),
    "image-tag": Route(methods=("POST",), obj=lambda w, o: db_image(_acme_or_globex(w, o), "matrix").pk),
    "image-publish": Route(
        methods=("POST",), obj=lambda w, o: db_image(_acme_or_globex(w, o), "matrix").pk, write="operator"
    ),
    "store-list": Route(methods=("GET",)),
    "store-gc": Route(methods=("POST",), list_post=202, list_post_staff_only=True),
    "schema": Route(methods=("GET",)),
    "swagger-ui": Route(methods=("GET",)),
    "redoc": Route(methods=("GET",)),
}


def _host(world: World, ownership: str) -> Any:
    from compute.models import Host

    return Host.objects.get_or_create(name=f"matrix-{ownership}")[0].pk


FROM_HOST = frozenset({200, 503})


def _workload(world: World, ownership: str) -> Any:
    from compute.models import Host, Workload

    tenant = _acme_or_globex(world, ownership)
    host = Host.objects.get_or_create(name="matrix-host")[0]
    image = db_image(tenant, f"matrix-{ownership}")
    workload = Workload.objects.create(
        tenant=tenant, name=f"w-{uuid.uuid4().hex[:8]}", image=image, host=host, state="stopped"
    )
    return workload.pk


ROUTES.update(
    {
        "workload-list": Route(methods=("GET", "POST"), list_post=400),
        "workload-detail": Route(methods=("GET", "PATCH", "DELETE"), obj=_workload),
        "workload-start": Route(methods=("POST",), obj=_workload),
        "workload-stop": Route(methods=("POST",), obj=_workload),
        "workload-restart": Route(methods=("POST",), obj=_workload),
        "workload-commit": Route(methods=("POST",), obj=_workload),
        "workload-logs": Route(methods=("GET",), obj=_workload, read_ok=FROM_HOST),
        "workload-stats": Route(methods=("GET",), obj=_workload),
        "workload-history": Route(methods=("GET",), obj=_workload),
        "workload-changes": Route(methods=("GET",), obj=_workload, read_ok=FROM_HOST),
        "host-list": Route(methods=("GET",)),
        "host-detail": Route(
            methods=("GET", "PATCH", "DELETE"), obj=_host, visibility="operator", write="operator"
        ),
        "host-history": Route(methods=("GET",), obj=_host, visibility="operator"),
        "host-evacuate": Route(methods=("POST",), obj=_host, visibility="operator", write="operator"),
        "host-credential": Route(
            methods=("POST", "DELETE"), obj=_host, visibility="operator", write="operator"
        ),
        # The host API: a host's own credential only (tests/security/test_host_api.py); every persona 401.
        "host-self": Route(methods=("GET",), visibility="public", list_post=401),
        **{
            f"host-self-{name}": Route(methods=methods, visibility="public", list_post=401)
            for name, methods in (
                ("heartbeat", ("POST",)),
                ("facts", ("POST",)),
                ("workloads", ("GET",)),
                ("samples", ("POST",)),
                ("network-repairs", ("POST",)),
                ("network", ("GET",)),
                ("operations", ("GET",)),
            )
        },
        **{
            f"host-self-{name}": Route(
                methods=methods, obj=lambda w, o: uuid.uuid4(), visibility="public", list_post=401
            )
            for name, methods in (
                ("workload", ("GET",)),
                ("workload-state", ("POST",)),
                ("workload-removed", ("POST",)),
                # Commit: the layer's upload and the report (tests/security/test_host_api_commit.py).
                ("workload-commit", ("POST",)),
                ("workload-commit-layer", ("PUT",)),
                ("operation", ("POST",)),
                # Volumes, snapshots and backups (issue 17; tests/security/test_host_api_volumes.py).
                ("volume-operation", ("GET",)),
                ("volume-operation-resume", ("POST",)),
                ("volume", ("POST",)),
                ("snapshot", ("POST",)),
                ("backup", ("POST",)),
                ("backup-missing", ("POST",)),
                ("backup-manifest", ("GET",)),
            )
        },
        **{
            f"host-self-{name}": Route(methods=methods, visibility="public", list_post=401)
            for name, methods in (
                ("volume-operations", ("GET",)),
                ("volume-pool", ("POST",)),
                ("volume-usage", ("POST",)),
            )
        },
        **{
            f"host-self-{name}": Route(
                methods=methods,
                obj=lambda w, o: {"pk": uuid.uuid4(), "digest": "sha256:" + "0" * 64},
                visibility="public",
                list_post=401,
            )
            for name, methods in (("backup-chunk", ("GET", "PUT")), ("backup-manifest-upload", ("PUT",)))
        },
        "host-join-tokens": Route(methods=("POST",), list_post=400, list_post_staff_only=True),
        "host-join": Route(methods=("POST",), visibility="public", list_post=400),
    }
)


# --- issue 7: compartments (admins manage) and published ports (members operate) ---------------


def _compartment(world: World, ownership: str) -> Any:
    from compute.compartments import Compartment

    n = Compartment.objects.count()
    return Compartment.objects.create(
        tenant=_acme_or_globex(world, ownership),
        name=f"m-{uuid.uuid4().hex[:8]}",
        subnet=f"10.250.{n}.0/24",
        gateway=f"10.250.{n}.1",
        vni=90000 + n,
    ).pk


def _published_port(world: World, ownership: str) -> Any:
    from compute.compartments import Compartment, IPAllocation, PublishedPort
    from compute.models import Workload

    workload = Workload.objects.select_related("host").get(pk=_workload(world, ownership))
    compartment = Compartment.objects.get(pk=_compartment(world, ownership))
    IPAllocation.objects.create(
        compartment=compartment,
        workload=workload,
        address=str(compartment.network[2]),
        mac="02:00:00:00:00:02",
    )
    return PublishedPort.objects.create(
        tenant=workload.tenant,
        workload=workload,
        host=workload.host,
        host_port=20000 + PublishedPort.objects.count(),
        workload_port=80,
    ).pk


ROUTES.update(
    {
        "compartment-list": Route(methods=("GET", "POST"), list_post=400),
        "compartment-detail": Route(methods=("GET", "DELETE"), obj=_compartment, write="manage"),
        "published-port-list": Route(methods=("GET", "POST"), list_post=400),
        "published-port-detail": Route(methods=("GET", "DELETE"), obj=_published_port, write="operate"),
    }
)


def _desired_revision(world: World, ownership: str) -> Any:
    from compute.desired.models import DesiredRevision

    tenant = _acme_or_globex(world, ownership)
    number = DesiredRevision.objects.filter(tenant=tenant).count() + 1
    text = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {}\n"
    return DesiredRevision.objects.create(tenant=tenant, number=number, text=text, sha256="x").pk


def _desired_plan(world: World, ownership: str) -> Any:
    from compute.desired.models import DesiredPlan, DesiredRevision
    from compute.desired.planning import compute_plan

    revision = DesiredRevision.objects.get(pk=_desired_revision(world, ownership))
    plan = compute_plan([], [], prune=False)
    return DesiredPlan.objects.create(
        tenant=revision.tenant,
        revision=revision,
        plan=plan.to_dict(),
        observed_fingerprint=plan.observed_fingerprint,
        desired_fingerprint=plan.desired_fingerprint,
    ).pk


ROUTES.update(
    {
        "desired-list": Route(methods=("GET",)),
        "desired-schema": Route(methods=("GET",)),
        "desired-apply": Route(methods=("POST",), list_post=400),
        "desired-detail": Route(
            methods=("GET", "PATCH"), obj=lambda w, o: _acme_or_globex(w, o).pk, write="manage"
        ),
        "desired-status": Route(methods=("GET",), obj=lambda w, o: _acme_or_globex(w, o).pk),
        "desired-export": Route(methods=("GET",), obj=lambda w, o: _acme_or_globex(w, o).pk),
        "desired-revision-list": Route(methods=("GET", "POST"), list_post=400),
        "desired-revision-detail": Route(methods=("GET",), obj=_desired_revision),
        "desired-revision-diff": Route(methods=("GET",), obj=_desired_revision),
        "desired-revision-rollback": Route(methods=("POST",), obj=_desired_revision, write="manage"),
        "desired-plan-list": Route(methods=("GET", "POST"), list_post=400),
        "desired-plan-detail": Route(methods=("GET",), obj=_desired_plan),
        "desired-plan-apply": Route(methods=("POST",), obj=_desired_plan, write="manage"),
    }
)

# --- issue 17: backups (members operate; hosts fetch and upload with their own credential) ------


def _backup_volume(world: World, ownership: str) -> Any:
    from compute.models import Host
    from volumes.models import GIB, Volume

    tenant = _acme_or_globex(world, ownership)
    host = Host.objects.get_or_create(name="matrix-host")[0]
    return Volume.objects.create(
        tenant=tenant, name=f"v-{uuid.uuid4().hex[:8]}", host=host, size_bytes=GIB, state="ready"
    )


def _backup(world: World, ownership: str) -> Any:
    from backups.models import Backup

    volume = _backup_volume(world, ownership)
    return Backup.objects.create(
        tenant=volume.tenant,
        volume=volume,
        volume_name=volume.name,
        state="ready",
        manifest="sha256:" + "1" * 64,
    ).pk


def _backup_schedule(world: World, ownership: str) -> Any:
    from backups.models import BackupSchedule

    volume = _backup_volume(world, ownership)
    return BackupSchedule.objects.create(tenant=volume.tenant, volume=volume).pk


_A_DIGEST = "sha256:" + "0" * 64

ROUTES.update(
    {
        "backup-list": Route(methods=("GET", "POST"), list_post=400),
        "backup-detail": Route(methods=("GET", "DELETE"), obj=_backup),
        "backup-restore": Route(methods=("POST",), obj=_backup),
        "backup-verify": Route(methods=("POST",), obj=_backup),
        "backup-export": Route(methods=("POST",), obj=_backup),
        # No export was made: a visible backup answers 404 too (never the file of another tenant).
        "backup-download": Route(methods=("GET",), obj=_backup, read_ok=frozenset({404})),
        "backup-schedule-list": Route(methods=("GET", "POST"), list_post=400),
        "backup-schedule-detail": Route(methods=("GET", "DELETE"), obj=_backup_schedule),
    }
)


# --- issue 17: volumes and snapshots (members operate) -------------------------------------------


def _volume(world: World, ownership: str) -> Any:
    from compute.models import Host
    from volumes.models import Volume

    host = Host.objects.get_or_create(name="matrix-host")[0]
    return Volume.objects.create(
        tenant=_acme_or_globex(world, ownership),
        name=f"v-{uuid.uuid4().hex[:8]}",
        host=host,
        size_bytes=1024**3,
        state="ready",
    ).pk


def _snapshot(world: World, ownership: str) -> Any:
    from volumes.models import Snapshot

    return Snapshot.objects.create(volume_id=_volume(world, ownership), name="s1", state="ready").pk


ROUTES.update(
    {
        "volume-list": Route(methods=("GET", "POST"), list_post=400),
        "volume-detail": Route(methods=("GET", "PATCH", "DELETE"), obj=_volume),
        "volume-attach": Route(methods=("POST",), obj=_volume),
        "volume-detach": Route(methods=("POST",), obj=_volume),
        "volume-snapshot": Route(methods=("POST",), obj=_volume),
        "snapshot-list": Route(methods=("GET",)),
        "snapshot-detail": Route(methods=("GET", "DELETE"), obj=_snapshot),
        "snapshot-restore": Route(methods=("POST",), obj=_snapshot),
        "snapshot-clone": Route(methods=("POST",), obj=_snapshot),
    }
)


# No namespace is left out (Django's admin site is gone).
IGNORED_NAMESPACES: set[str] = set()


def api_route_names() -> set[str]:
    names: set[str] = set()

    def walk(patterns: list[Any], prefix: str, namespace: str | None) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                ns = p.namespace or namespace
                if ns in IGNORED_NAMESPACES:
                    continue
                walk(p.url_patterns, prefix + str(p.pattern), ns)
            elif isinstance(p, URLPattern) and (prefix + str(p.pattern)).startswith("api/v1/") and p.name:
                if "format" in str(p.pattern):
                    continue  # DRF's format-suffix twins of the same views
                names.add(p.name)

    walk(get_resolver().url_patterns, "", None)
    return names


def test_it_has_an_expectation_for_every_api_route() -> None:
    missing = api_route_names() - set(ROUTES)
    assert not missing, f"Add these routes to the authorization matrix: {sorted(missing)}"


def expected_status(
    world: World, route: Route, name: str, persona: str, method: str, ownership: str
) -> set[int]:
    if route.visibility == "public":
        return {route.list_post or 400}
    if persona == "anonymous":
        return {401, 403} if name in {"swagger-ui", "redoc"} else {401}
    if route.obj is None:
        if method == "GET":
            return {200}
        if route.list_post_staff_only and not writes_as_operator(persona):
            return {403}
        if route.refuses_restricted_tokens and persona in RESTRICTED_TOKENS:
            return {403}
        if route.list_post_operate and not writes_as_operator(persona):
            roles = {role_in(world, persona, t) for t in ("acme", "globex")}
            if persona in READ_ONLY_TOKENS or not roles & ROLES_ALLOWED["operate"]:
                return {403}
        return {route.list_post or 400}
    if ownership == "missing":
        return {404}
    # Object routes: can the persona see the object at all?
    if route.visibility == "self":
        owner = "alice" if ownership == "acme" else "bob"
        if name == "token-detail" and persona in RESTRICTED_TOKENS:
            visible = persona == "alice_acme" and owner == "alice"  # alice's one token: itself
        else:
            visible = is_staff(persona) or user_name(persona) == owner
    elif route.visibility == "operator":
        visible = is_staff(persona)
    else:
        role = role_in(world, persona, ownership)
        visible = is_staff(persona) or (role is not None and role in ROLES_ALLOWED["view"])
        if route.read == "audit" and not is_staff(persona):
            visible = role is not None and role in ROLES_ALLOWED["audit"]
    if not visible:
        return {404}
    if method == "GET":
        return set(route.read_ok)
    if persona in READ_ONLY_TOKENS:
        return {403}
    action = route.extra.get(method, route.write)
    if action == "operator":
        allowed = writes_as_operator(persona)
    elif route.visibility in ("self", "operator"):
        allowed = True
    else:
        role = role_in(world, persona, ownership)
        allowed = writes_as_operator(persona) or (role is not None and role in ROLES_ALLOWED[action])
    if not allowed:
        return {403}
    return {200, 201, 202, 204, 400, 409}


def url_for(name: str, pk: Any = None) -> str:
    from django.urls import reverse

    if isinstance(pk, dict):  # a route with more than a pk (a backup's chunk: pk and digest)
        return reverse(f"api:{name}", kwargs=pk)
    return reverse(f"api:{name}", kwargs={"pk": pk} if pk is not None else None)


def denial_audit_problem(
    world: World, route: Route, persona: str, ownership: str | None, after_id: int
) -> str:
    """Every refusal leaves a denied audit entry, with the tenant it concerns where there is one."""
    entries = list(AuditEntry.objects.filter(id__gt=after_id, outcome="denied"))
    if not entries:
        return "wrote no denied audit entry"
    if route.visibility == "tenant" and ownership in ("acme", "globex"):
        want = _acme_or_globex(world, ownership).pk
    elif persona in SCOPED_TOKENS and route.obj is None:
        want = world.acme.pk
    else:
        return ""
    if not any(entry.tenant_id == want for entry in entries):
        return f"denial audited without its tenant {ownership or 'acme'}: {[e.tenant_id for e in entries]}"
    return ""


CASES = [(name, persona) for name in sorted(ROUTES) for persona in PERSONAS]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "persona"), CASES)
def test_it_answers_each_persona_as_the_role_matrix_says(name: str, persona: str) -> None:
    world = build_world()
    route = ROUTES[name]
    ownerships = ["acme", "globex", "missing"] if route.obj is not None else [None]
    failures = []
    for ownership in ownerships:
        for method in route.methods:
            # Each request in a savepoint that is rolled back: a DELETE doesn't spoil the next case.
            with transaction.atomic():
                if ownership is None:
                    url = url_for(name)
                elif ownership == "missing":
                    pk = route.obj(world, "acme") if route.obj else None  # type: ignore[misc]
                    missing_pk: Any = uuid.uuid4() if isinstance(pk, uuid.UUID) else 10**9
                    if isinstance(pk, dict):
                        missing_pk = {**pk, "pk": uuid.uuid4()}
                    url = url_for(name, missing_pk)
                else:
                    url = url_for(name, route.obj(world, ownership))  # type: ignore[misc]
                client = client_for(world, persona)
                last_entry = AuditEntry.objects.order_by("-id").values_list("id", flat=True).first() or 0
                response = getattr(client, method.lower())(url, {}, format="json")
                want = expected_status(world, route, name, persona, method, ownership or "")
                if response.status_code not in want:
                    failures.append(
                        f"{method} {url} [{ownership}] -> {response.status_code}, want {sorted(want)}"
                    )
                if response.status_code == 403:
                    problem = denial_audit_problem(world, route, persona, ownership, last_entry)
                    if problem:
                        failures.append(f"{method} {url} [{ownership}] -> 403 {problem}")
                transaction.set_rollback(True)
    assert not failures, "\n".join(failures)
