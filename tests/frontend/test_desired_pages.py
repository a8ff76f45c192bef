"""The desired-state pages: everyone in the tenant reads, owners and admins write, services do the work."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from compute.desired import tasks
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState
from compute.models import Host, Workload
from portal.models import Operation
from tests.conftest import World
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}

DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  workloads:
    - name: web
      image: busybox:1
      command: [/bin/sleep, "300"]
      memory_mib: 64
"""


@pytest.fixture
def ready(world: World) -> World:
    Host.objects.create(name="ui-host", cpus=64, memory_mib=65536, facts={"oci_runtimes": ["runc"]})
    db_image(world.acme, "busybox", "1")
    return world


def signed_in(world: World, persona: str) -> Client:
    client = Client()
    client.force_login(world.user(persona))
    return client


def save(client: Client, text: str = DOC, message: str = "first") -> DesiredRevision:
    response = client.post(reverse("desired-save"), {"text": text, "message": message})
    assert response.status_code == 302, response.content.decode()[:2000]
    return DesiredRevision.objects.order_by("-number").first()  # type: ignore[return-value]


@pytest.mark.parametrize("persona", ["alice", "amir", "mia", "vic", "oscar"])
def test_it_renders_for_every_role_and_offers_writing_to_managers_only(ready: World, persona: str) -> None:
    save(signed_in(ready, "alice"))
    response = signed_in(ready, persona).get(reverse("desired"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Desired state" in html and 'data-condition="Ready"' in html
    assert "name: web" in html  # the current revision's text
    assert 'data-revision="1"' in html and "first" in html
    writes = persona in {"alice", "amir", "oscar"}
    assert ('action="/desired/save/"' in html) is writes
    assert ('action="/desired/mode/"' in html) is writes
    assert ('hx-post="/desired/validate/"' in html) is writes


def test_without_a_revision_the_editor_holds_an_export_of_the_resources(ready: World) -> None:
    html = signed_in(ready, "alice").get(reverse("desired")).content.decode()
    assert "apiVersion: bulkhead/v1" in html and "No revision yet" in html


def test_another_tenant_sees_nothing_of_acme(ready: World) -> None:
    revision = save(signed_in(ready, "alice"))
    bob = signed_in(ready, "bob")
    assert bob.get(reverse("desired-revision", args=[revision.pk])).status_code == 404
    assert bob.post(reverse("desired-rollback", args=[revision.pk])).status_code == 404
    assert "name: web" not in bob.get(reverse("desired")).content.decode()


def test_validation_reports_line_numbers_and_stores_nothing(ready: World) -> None:
    client = signed_in(ready, "alice")
    broken = DOC.replace("memory_mib: 64", "memory_mib: lots")
    response = client.post(reverse("desired-validate"), {"text": broken}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="desired-issues"' in html
    assert 'data-line="8"' in html and "Line 8" in html and "memory_mib" in html
    unknown = client.post(reverse("desired-validate"), {"text": DOC.replace("busybox:1", "nosuch:9")}, **HTMX)
    assert 'data-line="6"' in unknown.content.decode() and "Line 6" in unknown.content.decode()
    assert not DesiredRevision.objects.exists() and not DesiredPlan.objects.exists()
    ok = signed_in(ready, "alice").post(reverse("desired-validate"), {"text": DOC}, **HTMX)
    assert "The document is valid" in ok.content.decode()
    assert not DesiredRevision.objects.exists()


def test_an_invalid_save_shows_the_issues_and_stores_nothing(ready: World) -> None:
    response = signed_in(ready, "alice").post(
        reverse("desired-save"), {"text": DOC.replace("busybox:1", "nosuch:9"), "message": "x"}
    )
    assert response.status_code == 422
    assert "Line 6" in response.content.decode()
    assert not DesiredRevision.objects.exists()


def test_save_plan_and_apply_create_rows_and_an_operation(ready: World) -> None:
    client = signed_in(ready, "amir")
    revision = save(client)
    assert revision.number == 1 and revision.author_label
    follow = client.get(reverse("desired")).content.decode()
    assert "Saved revision 1." in follow
    response = client.post(reverse("desired-plan"), {}, **HTMX)
    assert response.status_code == 200
    plan = DesiredPlan.objects.get()
    html = response.content.decode()
    assert plan.revision == revision
    assert 'data-action="create"' in html and "workload/web" in html and "state-succeeded" in html
    assert f'action="/desired/plans/{plan.pk}/apply/"' in html
    applied = client.post(reverse("desired-apply", args=[plan.pk]), **HTMX)
    assert applied.status_code == 200
    op = Operation.objects.get(kind="desired.apply")
    assert f'data-operation-id="{op.pk}"' in applied.content.decode()
    assert 'role="progressbar"' in applied.content.decode()
    tasks.apply_plan.apply(args=[str(op.pk)])
    assert Workload.objects.filter(tenant=ready.acme, name="web").exists()
    assert DesiredState.objects.get(tenant=ready.acme).target_revision == 1


def test_a_stale_plan_says_so_with_a_409(ready: World) -> None:
    client = signed_in(ready, "alice")
    save(client)
    client.post(reverse("desired-plan"))
    plan = DesiredPlan.objects.get()
    db_image(ready.acme, "other", "1")
    Workload.objects.create(
        tenant=ready.acme, name="sneaky", image=db_image(ready.acme, "sneak"), host=Host.objects.get()
    )
    response = client.post(reverse("desired-apply", args=[plan.pk]))
    assert response.status_code == 409
    assert "changed since this plan was made" in response.content.decode()
    partial = client.post(reverse("desired-apply", args=[plan.pk]), **HTMX)
    assert "make a new plan" in partial.content.decode()
    assert not Operation.objects.filter(kind="desired.apply").exists()


def test_history_shows_the_diff_and_rollback_saves_a_new_revision(ready: World) -> None:
    client = signed_in(ready, "alice")
    first = save(client)
    second = save(client, DOC.replace('"300"', '"600"'), "longer")
    html = client.get(reverse("desired-revision", args=[second.pk])).content.decode()
    assert "Changes since revision 1" in html
    assert 'class="diff-add">+' in html and 'class="diff-del">-' in html
    assert 'data-action="update"' in html
    response = client.post(reverse("desired-rollback", args=[first.pk]), {"message": ""})
    assert response.status_code == 302
    third = DesiredRevision.objects.get(number=3)
    assert third.text == first.text and third.rolled_back_from == 1
    assert "Rollback to revision 1" in third.message


@pytest.mark.parametrize("persona", ["mia", "vic"])
def test_members_and_viewers_cannot_write(ready: World, persona: str) -> None:
    revision = save(signed_in(ready, "alice"))
    client = signed_in(ready, persona)
    assert client.get(reverse("desired-revision", args=[revision.pk])).status_code == 200
    assert client.post(reverse("desired-save"), {"text": DOC, "message": "x"}).status_code == 404
    assert client.post(reverse("desired-validate"), {"text": DOC}).status_code == 404
    assert client.post(reverse("desired-plan")).status_code == 404
    assert client.post(reverse("desired-mode"), {"mode": "monitor"}).status_code == 404
    assert client.post(reverse("desired-rollback", args=[revision.pk])).status_code == 404
    assert DesiredRevision.objects.count() == 1 and not DesiredPlan.objects.exists()
    assert DesiredState.objects.get(tenant=ready.acme).mode == "off"


def test_an_admin_sets_the_mode(ready: World) -> None:
    response = signed_in(ready, "amir").post(reverse("desired-mode"), {"mode": "monitor"})
    assert response.status_code == 302
    assert DesiredState.objects.get(tenant=ready.acme).mode == "monitor"
    assert signed_in(ready, "amir").post(reverse("desired-mode"), {"mode": "wild"}).status_code == 422


def test_conditions_and_drift_show_with_reasons(ready: World) -> None:
    state = DesiredState.objects.create(
        tenant=ready.acme,
        mode="monitor",
        conditions=[
            {"type": "Ready", "status": "False", "reason": "Drifted", "message": "workload/web missing"},
            {"type": "Drifted", "status": "True", "reason": "Missing", "message": "1 resource"},
        ],
        drift=[{"key": "workload/web", "kind": "missing", "resource_kind": "workload", "changes": []}],
    )
    html = signed_in(ready, "vic").get(reverse("desired")).content.decode()
    assert state.mode == "monitor"
    assert 'data-drift="missing"' in html and "workload/web missing" in html
    assert "Missing" in html
