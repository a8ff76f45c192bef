"""The htmx UI: pages render for the right people, changes go through services, nothing is external."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.urls import reverse

from frontend.middleware import SESSION_KEY
from portal.models import Operation
from tenants import quota, services
from tenants.actors import Actor
from tenants.models import ApiToken, AuditEntry, Membership, Quota
from tenants.tokens import prefix_of

User = get_user_model()
PASSWORD = "correct horse battery"

# --- personas (local until tests/conftest.py offers them) -----------------------------------------


@pytest.fixture
def operator(db):
    return User.objects.create_user("olivia", password=PASSWORD, is_staff=True)


@pytest.fixture
def alice(db):
    return User.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def bob(db):
    return User.objects.create_user("bob", password=PASSWORD)


@pytest.fixture
def carol(db):
    return User.objects.create_user("carol", password=PASSWORD)


@pytest.fixture
def acme(operator, alice):
    return services.create_tenant(actor=Actor(user=operator), name="acme", owner=alice)


@pytest.fixture
def globex(operator, bob):
    return services.create_tenant(actor=Actor(user=operator), name="globex", owner=bob)


@pytest.fixture
def alice_client(client, alice, acme, globex):
    client.force_login(alice)
    return client


# --- sign in --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_renders_login_page(client):
    response = client.get(reverse("login"))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="username"' in html and 'name="password"' in html
    assert 'for="id_username"' in html
    assert "csrfmiddlewaretoken" in html


@pytest.mark.django_db
def test_it_sends_anonymous_visitors_to_login(client):
    response = client.get(reverse("dashboard"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.django_db
def test_it_signs_in_and_out(client, alice, acme):
    response = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert AuditEntry.objects.filter(action="auth.login", actor=alice).exists()
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("dashboard")).status_code == 302


@pytest.mark.django_db
def test_it_shows_a_failed_sign_in_as_a_form_error(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "wrong password"})
    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()
    assert AuditEntry.objects.filter(action="auth.login", outcome="denied").exists()


# --- dashboard and tenant switcher ----------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_the_dashboard_with_quota_bars(alice_client, acme):
    with transaction.atomic():
        quota.allocate(acme, vcpus=2, workloads=19)
    response = alice_client.get(reverse("dashboard"))
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="quota-bar') == len(Quota.RESOURCES)  # one per quota resource
    assert 'aria-label="vCPUs used"' in html
    assert 'aria-label="Disk used"' in html
    assert 'aria-valuenow="25"' in html  # 2 of 8 vCPUs
    assert "level-danger" in html  # 19 of 20 workloads
    assert "1 member" in html
    assert "Run self-check" not in html  # operators only


@pytest.mark.django_db
def test_it_shows_operators_the_tenants_and_selfcheck(client, operator, acme, globex):
    client.force_login(operator)
    html = client.get(reverse("dashboard")).content.decode()
    assert "Run self-check" in html
    assert 'id="hosts"' in html
    assert "acme" in html and "globex" in html


@pytest.mark.django_db
def test_it_starts_the_selfcheck_with_a_live_progress_bar(client, operator):
    client.force_login(operator)
    response = client.post(reverse("selfcheck-start"), HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    op = Operation.objects.get(kind="portal.selfcheck")
    html = response.content.decode()
    assert f'data-operation-id="{op.pk}"' in html
    assert 'role="progressbar"' in html
    assert "<html" not in html


@pytest.mark.django_db
def test_it_switches_tenant_only_to_own_tenants(alice_client, alice, operator, globex):
    initech = services.create_tenant(actor=Actor(user=operator), name="initech", owner=alice)
    response = alice_client.post(reverse("switch-tenant"), {"tenant": str(initech.pk), "next": "/members/"})
    assert response.status_code == 302 and response["Location"] == "/members/"
    assert alice_client.session[SESSION_KEY] == str(initech.pk)

    response = alice_client.post(reverse("switch-tenant"), {"tenant": str(globex.pk)})
    assert response.status_code == 404
    assert alice_client.session[SESSION_KEY] == str(initech.pk)


@pytest.mark.django_db
def test_it_refuses_to_redirect_a_tenant_switch_elsewhere(alice_client, acme):
    response = alice_client.post(
        reverse("switch-tenant"), {"tenant": str(acme.pk), "next": "https://evil.test/"}
    )
    assert response["Location"] == reverse("dashboard")


# --- members --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_adds_a_member(alice_client, acme, carol):
    response = alice_client.post(reverse("member-add"), {"username": "carol", "role": "member"})
    assert response.status_code == 302
    assert Membership.objects.filter(tenant=acme, user=carol, role="member").exists()
    entry = AuditEntry.objects.get(action="membership.create", tenant=acme, details__user="carol")
    assert entry.actor_label == "alice"


@pytest.mark.django_db
def test_it_shows_service_errors_next_to_the_field(alice_client):
    response = alice_client.post(
        reverse("member-add"), {"username": "nobody", "role": "member"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert "No user named &#x27;nobody&#x27;." in html
    assert 'class="field-error" id="id_username_error"' in html


@pytest.mark.django_db
def test_it_keeps_the_last_owner(alice_client, alice, acme):
    membership = Membership.objects.get(tenant=acme, user=alice)
    response = alice_client.post(
        reverse("member-role", args=[membership.pk]), {"role": "viewer"}, follow=True
    )
    assert response.status_code == 200
    assert "A tenant keeps at least one owner." in response.content.decode()
    membership.refresh_from_db()
    assert membership.role == "owner"


@pytest.mark.django_db
def test_it_hides_another_tenants_members(alice_client, bob, globex):
    membership = Membership.objects.get(tenant=globex, user=bob)
    assert alice_client.post(reverse("member-remove", args=[membership.pk])).status_code == 404
    assert Membership.objects.filter(pk=membership.pk).exists()


@pytest.mark.django_db
def test_it_lets_viewers_see_but_not_manage_members(client, alice, acme, carol):
    services.add_member(actor=Actor(user=alice), tenant=acme, username="carol", role="viewer")
    client.force_login(carol)
    assert "Add a member" not in client.get(reverse("members")).content.decode()
    response = client.post(reverse("member-add"), {"username": "bob", "role": "viewer"})
    assert response.status_code == 404


# --- tokens ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_a_token_and_shows_secret_once(alice_client, alice, acme):
    response = alice_client.post(
        reverse("token-create"),
        {"name": "ci", "tenant": str(acme.pk), "read_only": "on", "expires_in_days": "30"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=alice, name="ci")
    assert token.read_only and token.tenant == acme and token.expires_at is not None
    secret = re.search(r'<code id="token-secret" class="secret">([^<]+)</code>', response.content.decode())
    assert secret is not None and prefix_of(secret.group(1)) == token.prefix
    assert "data-copy-target" in response.content.decode()

    later = alice_client.get(reverse("tokens")).content.decode()
    assert token.prefix in later
    assert secret.group(1) not in later


@pytest.mark.django_db
def test_it_shows_an_empty_state_without_tokens(alice_client):
    assert "No tokens yet: create one to use the API" in alice_client.get(reverse("tokens")).content.decode()


@pytest.mark.django_db
def test_it_revokes_a_token(alice_client, alice):
    token, _ = services.create_token(actor=Actor(user=alice), name="old")
    response = alice_client.post(reverse("token-revoke", args=[token.pk]))
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert AuditEntry.objects.filter(action="token.revoke", object_id=str(token.pk)).exists()


@pytest.mark.django_db
def test_it_hides_another_users_token(alice_client, bob):
    token, _ = services.create_token(actor=Actor(user=bob), name="bobs")
    assert alice_client.post(reverse("token-revoke", args=[token.pk])).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


# --- audit and operations -------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_renders_htmx_partial_for_audit(alice_client):
    response = alice_client.get(reverse("audit"), {"action": "membership."}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert 'id="audit-table"' in html
    assert "membership.create" in html

    page = alice_client.get(reverse("audit")).content.decode()
    assert "<html" in page and 'id="audit-table"' in page


@pytest.mark.django_db
def test_it_shows_tenant_admins_only_their_audit_log(alice_client):
    html = alice_client.get(reverse("audit")).content.decode()
    assert "acme" in html
    assert "globex" not in html


@pytest.mark.django_db
def test_it_pages_the_audit_log(client, operator, acme):
    for n in range(60):
        services.create_user(actor=Actor(user=operator), username=f"user{n}", password=PASSWORD)
    client.force_login(operator)
    html = client.get(reverse("audit"), {"action": "user.create"}).content.decode()
    assert html.count("<code>user.create</code>") == 50
    assert "Page 1 of 2" in html
    html = client.get(reverse("audit"), {"action": "user.create", "page": 2}).content.decode()
    assert html.count("<code>user.create</code>") == 10


@pytest.mark.django_db
def test_it_lists_operations_for_live_updates(client, operator):
    client.force_login(operator)
    client.post(reverse("selfcheck-start"))
    op = Operation.objects.get()
    html = client.get(reverse("operations")).content.decode()
    assert f'data-operation-id="{op.pk}"' in html
    assert 'data-field="progress"' in html


# --- operator pages -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_hides_operator_pages_from_tenants(alice_client):
    for name in ("tenants", "users"):
        assert alice_client.get(reverse(name)).status_code == 404
    for name in ("tenant-create", "user-create", "selfcheck-start"):
        assert alice_client.post(reverse(name), {"name": "x", "username": "x"}).status_code == 404
    assert 'href="/tenants/"' not in alice_client.get(reverse("dashboard")).content.decode()


@pytest.mark.django_db
def test_it_lets_operators_create_tenants_and_users(client, operator, alice):
    client.force_login(operator)
    assert client.get(reverse("tenants")).status_code == 200
    response = client.post(
        reverse("tenant-create"), {"name": "initech", "display_name": "", "owner": "alice"}
    )
    assert response.status_code == 302
    assert Membership.objects.filter(tenant__name="initech", user=alice, role="owner").exists()

    response = client.post(
        reverse("user-create"),
        {"username": "dave", "email": "", "password": PASSWORD, "password_again": PASSWORD},
    )
    assert response.status_code == 302
    assert User.objects.filter(username="dave", is_staff=False).exists()


@pytest.mark.django_db
def test_it_shows_a_taken_tenant_name_as_a_form_error(client, operator, acme):
    client.force_login(operator)
    response = client.post(reverse("tenant-create"), {"name": "acme"})
    assert response.status_code == 422
    assert "already exists" in response.content.decode()


# --- nothing from outside -------------------------------------------------------------------------

OWN_OUTSIDE_REFERENCES = [
    re.compile(r"https?://", re.IGNORECASE),
    # protocol-relative: //host in an attribute, a CSS url()/@import, or a string literal
    re.compile(r"""\b(?:src|href|action|srcset|poster|data)\s*=\s*["']?\s*//""", re.IGNORECASE),
    re.compile(r"""url\(\s*["']?\s*//""", re.IGNORECASE),
    re.compile(r"""@import\s+(?:url\(\s*)?["']?\s*//""", re.IGNORECASE),
    re.compile(r"""["'`]//[\w-]+(?:\.[\w-]+)+"""),
]
# Vendored libraries mention URLs in licence comments and docs; only what would load something counts.
VENDOR_OUTSIDE_REFERENCES = [
    re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE),
    re.compile(r"""url\(\s*["']?\s*(?:https?:)?//""", re.IGNORECASE),
    re.compile(r"""@import\s+(?:url\(\s*)?["']?\s*(?:https?:)?//""", re.IGNORECASE),
]
TEXT_SUFFIXES = {".html", ".txt", ".css", ".js", ".mjs", ".svg", ".json", ".xml"}


def _project_dirs(kind: str) -> list[Path]:
    base = Path(settings.BASE_DIR).resolve()
    dirs = []
    for config in apps.get_app_configs():
        path = Path(config.path).resolve()
        if path.is_relative_to(base) and ".venv" not in path.parts and (path / kind).is_dir():
            dirs.append(path / kind)
    return dirs


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]


def test_it_loads_no_outside_resources():
    frontend = Path(apps.get_app_config("frontend").path)
    vendor = frontend / "static" / "vendor"
    own = {p for d in [*_project_dirs("templates"), *_project_dirs("static")] for p in _files(d)}
    own = {p for p in own if not p.is_relative_to(vendor) and "node_modules" not in p.parts}
    assert any(p.name == "base.html" for p in own)

    found = [
        f"{p.relative_to(settings.BASE_DIR)}: {m.group(0)!r}"
        for p in sorted(own)
        for pattern in OWN_OUTSIDE_REFERENCES
        for m in pattern.finditer(p.read_text(errors="replace"))
    ]
    if vendor.is_dir():  # generated by scripts/vendor-js.sh
        found += [
            f"{p.relative_to(settings.BASE_DIR)}: {m.group(0)!r}"
            for p in sorted(_files(vendor))
            for pattern in VENDOR_OUTSIDE_REFERENCES
            for m in pattern.finditer(p.read_text(errors="replace"))
        ]
    assert found == []
