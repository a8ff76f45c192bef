"""Desired state outside its own page, and its history: "managed r<N>" and drift badges on the workload
and network pages (one DesiredState query a page, through the permission layer), per-resource conditions
on the desired page, tenant data read through `for_user`, and a revision compared with any other."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from compute.compartments import Compartment, PublishedPort
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState
from compute.models import Host, Workload
from portal.permissions import TenantOwnedQuerySet
from tests.conftest import World
from tests.frontend.test_network_pages import a_compartment, a_member, a_port
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
DESIRED_URL = "/desired/#desired-status"


def signed_in(world: World, persona: str) -> Client:
    client = Client()
    client.force_login(world.user(persona))
    return client


def a_workload(tenant: Any, name: str, managed_revision: int | None = None) -> Workload:
    host = Host.objects.filter(name="badge-host").first() or Host.objects.create(
        name="badge-host", cpus=8, memory_mib=16384
    )
    return Workload.objects.create(
        tenant=tenant,
        name=name,
        image=db_image(tenant, f"img-{name}"),
        host=host,
        managed_revision=managed_revision,
    )


def conditions(**problems: str) -> dict[str, Any]:
    """One resource_conditions entry: all healthy unless given ("Drifted": "True", reason=...)."""
    entry: dict[str, Any] = {
        "Ready": "True",
        "Drifted": "False",
        "Degraded": "False",
        "Flapping": "False",
        "observedRevision": 1,
    }
    entry.update(problems)
    if "True" in (entry["Drifted"], entry["Degraded"], entry["Flapping"]):
        entry["Ready"] = "False"
    return entry


def a_state(tenant: Any, per_resource: dict[str, Any]) -> DesiredState:
    return DesiredState.objects.create(tenant=tenant, mode="monitor", resource_conditions=per_resource)


def row_of(html: str, marker: str) -> str:
    return html[html.index(marker) :].split("</tr>")[0]


def desired_state_queries(ctx: CaptureQueriesContext) -> int:
    table = DesiredState._meta.db_table
    return sum(1 for q in ctx.captured_queries if f'"{table}"' in q["sql"] and q["sql"].startswith("SELECT"))


# --- 1. badges on the workload pages --------------------------------------------------------------


@pytest.mark.parametrize("persona", ["oscar", "alice", "amir", "mia", "vic"])
def test_it_badges_a_drifted_managed_workload_on_the_list_and_the_detail(world: World, persona: str) -> None:
    web = a_workload(world.acme, "web", managed_revision=1)
    adhoc = a_workload(world.acme, "adhoc")
    a_state(world.acme, {"workload/web": conditions(Drifted="True", reason="DriftChanged")})
    client = signed_in(world, persona)
    html = client.get(reverse("workloads")).content.decode()
    row = row_of(html, f'data-workload-id="{web.pk}"')
    assert 'data-managed="workload/web"' in row and "managed r1" in row
    assert 'data-drift-condition="Drifted"' in row and 'title="DriftChanged"' in row
    assert 'class="badge state-cancelled"' in row and ">changed</a>" in row  # coloured as DRIFT_BADGES
    assert f'href="{DESIRED_URL}"' in row
    plain = row_of(html, f'data-workload-id="{adhoc.pk}"')
    assert "data-managed" not in plain and "managed r" not in plain
    detail = client.get(reverse("workload-detail", args=[web.pk])).content.decode()
    assert "managed r1" in detail and 'data-drift-condition="Drifted"' in detail
    summary = client.get(reverse("workload-detail", args=[web.pk]), HTTP_HX_TARGET="workload-summary", **HTMX)
    assert 'id="workload-summary"' in summary.content.decode() and "managed r1" in summary.content.decode()
    unmanaged = client.get(reverse("workload-detail", args=[adhoc.pk])).content.decode()
    assert "managed r" not in unmanaged and "data-drift-condition" not in unmanaged


def test_it_shows_the_worst_condition_with_its_reason(world: World) -> None:
    a_workload(world.acme, "sick", managed_revision=3)
    a_workload(world.acme, "flappy", managed_revision=3)
    a_workload(world.acme, "gone", managed_revision=3)
    a_state(
        world.acme,
        {
            "workload/sick": conditions(Degraded="True", reason="Unhealthy", message="is failed: exit 1"),
            "workload/flappy": conditions(
                Drifted="True", Degraded="True", Flapping="True", reason="TooManyCorrections"
            ),
            "workload/gone": conditions(Drifted="True", reason="Correcting"),
        },
    )
    html = signed_in(world, "vic").get(reverse("workloads")).content.decode()
    sick = html[html.index('data-managed="workload/sick"') :].split("</span>")[0]
    assert 'class="badge state-failed"' in sick and 'title="Unhealthy: is failed: exit 1"' in sick
    assert 'data-drift-condition="Degraded"' in sick and ">degraded</a>" in sick
    flappy = html[html.index('data-managed="workload/flappy"') :].split("</span>")[0]
    assert 'data-drift-condition="Flapping"' in flappy and 'title="TooManyCorrections"' in flappy
    gone = html[html.index('data-managed="workload/gone"') :].split("</span>")[0]
    assert 'data-drift-condition="Drifted"' in gone and ">drifted</a>" in gone and "managed r3" in gone


def test_a_managed_workload_in_sync_or_never_reconciled_gets_the_managed_badge_alone(world: World) -> None:
    a_workload(world.acme, "web", managed_revision=2)
    client = signed_in(world, "mia")
    html = client.get(reverse("workloads")).content.decode()  # no DesiredState row at all
    assert "managed r2" in html and "data-drift-condition" not in html
    a_state(world.acme, {"workload/web": conditions()})
    html = client.get(reverse("workloads")).content.decode()
    assert "managed r2" in html and "data-drift-condition" not in html


def test_the_workload_list_reads_the_desired_state_once(world: World) -> None:
    for n in range(5):
        a_workload(world.acme, f"w{n}", managed_revision=1)
    a_state(
        world.acme, {f"workload/w{n}": conditions(Drifted="True", reason="DriftStopped") for n in range(5)}
    )
    client = signed_in(world, "alice")
    with CaptureQueriesContext(connection) as ctx:
        html = client.get(reverse("workloads")).content.decode()
    assert html.count('data-drift-condition="Drifted"') == 5
    assert desired_state_queries(ctx) == 1
    Workload.objects.update(managed_revision=None)
    with CaptureQueriesContext(connection) as ctx:
        client.get(reverse("workloads"))
    assert desired_state_queries(ctx) == 0  # nothing managed: nothing to look up


# --- 1. badges on the network pages ---------------------------------------------------------------


def test_it_badges_managed_networks_their_members_and_ports(world: World) -> None:
    front = a_compartment(world, "front", subnet="10.230.0.0/24")
    back = a_compartment(world, "back", subnet="10.231.0.0/24")
    web = a_member(world, front, "web")
    port = a_port(world, web, 8080)
    Compartment.objects.filter(pk=front.pk).update(managed_revision=4)
    Workload.objects.filter(pk=web.pk).update(managed_revision=4)
    PublishedPort.objects.filter(pk=port.pk).update(managed_revision=4)
    a_state(
        world.acme,
        {
            "network/front": conditions(Drifted="True", reason="DriftRepaired"),
            "workload/web": conditions(),
            "port/web/8080/tcp": conditions(Degraded="True", reason="Unhealthy", message="no listener"),
        },
    )
    client = signed_in(world, "vic")
    html = client.get(reverse("compartments")).content.decode()
    front_row = row_of(html, f'data-compartment-id="{front.pk}"')
    assert "managed r4" in front_row and 'data-drift-condition="Drifted"' in front_row
    assert 'title="DriftRepaired"' in front_row and ">repaired</a>" in front_row
    assert "managed r" not in row_of(html, f'data-compartment-id="{back.pk}"')
    with CaptureQueriesContext(connection) as ctx:
        detail = client.get(reverse("compartment-detail", args=[front.pk])).content.decode()
    assert desired_state_queries(ctx) == 1  # network, members and ports: one read
    summary = detail[detail.index('id="compartment-summary"') : detail.index('id="compartment-members"')]
    assert 'data-managed="network/front"' in summary and ">repaired</a>" in summary
    members = detail[detail.index('id="compartment-members"') : detail.index('id="compartment-ports"')]
    assert 'data-managed="workload/web"' in members and "data-drift-condition" not in members
    ports = row_of(detail, f'data-port-id="{port.pk}"')
    assert 'data-managed="port/web/8080/tcp"' in ports and 'title="Unhealthy: no listener"' in ports
    other = client.get(reverse("compartment-detail", args=[back.pk])).content.decode()
    assert "managed r" not in other


# --- 1. isolation ---------------------------------------------------------------------------------


def test_bob_sees_none_of_acmes_badges(world: World) -> None:
    acme_web = a_workload(world.acme, "web", managed_revision=1)
    front = a_compartment(world, "front", subnet="10.232.0.0/24")
    Compartment.objects.filter(pk=front.pk).update(managed_revision=1)
    a_state(
        world.acme,
        {
            "workload/web": conditions(Flapping="True", reason="TooManyCorrections"),
            "network/front": conditions(Drifted="True", reason="DriftChanged"),
        },
    )
    # globex has a workload and a network of the same names, managed, never reconciled.
    a_workload(world.globex, "web", managed_revision=7)
    globex_front = a_compartment(world, "front", tenant=world.globex, subnet="10.233.0.0/24")
    Compartment.objects.filter(pk=globex_front.pk).update(managed_revision=7)
    bob = signed_in(world, "bob")
    html = bob.get(reverse("workloads")).content.decode()
    assert "managed r7" in html and "managed r1" not in html
    assert "data-drift-condition" not in html and "TooManyCorrections" not in html
    networks = bob.get(reverse("compartments")).content.decode()
    assert "managed r7" in networks and "DriftChanged" not in networks
    assert bob.get(reverse("workload-detail", args=[acme_web.pk])).status_code == 404
    assert bob.get(reverse("compartment-detail", args=[front.pk])).status_code == 404
    desired = bob.get(reverse("desired")).content.decode()
    assert "TooManyCorrections" not in desired and "DriftChanged" not in desired


def test_a_signed_in_user_without_a_tenant_gets_no_badges(world: World) -> None:
    a_workload(world.acme, "web", managed_revision=1)
    a_state(world.acme, {"workload/web": conditions(Drifted="True", reason="DriftChanged")})
    html = signed_in(world, "charlie").get(reverse("workloads")).content.decode()
    assert "managed r" not in html and "DriftChanged" not in html


# --- 2. per-resource conditions on the desired page -----------------------------------------------


def test_the_desired_page_shows_each_resources_conditions(world: World) -> None:
    a_workload(world.acme, "web", managed_revision=1)
    a_workload(world.acme, "api", managed_revision=1)
    a_workload(world.acme, "adhoc")
    DesiredState.objects.create(
        tenant=world.acme,
        mode="monitor",
        drift=[{"key": "workload/gone", "kind": "missing", "resource_kind": "workload", "changes": []}],
        resource_conditions={
            "workload/web": conditions(Degraded="True", reason="Unhealthy", message="is failed: exit 1"),
            "workload/api": conditions(),
            "workload/gone": conditions(Drifted="True", Flapping="True", reason="TooManyCorrections"),
        },
    )
    html = signed_in(world, "vic").get(reverse("desired")).content.decode()
    web = row_of(html, 'data-resource="workload/web"')
    assert 'data-resource-condition="Ready" data-status="False"' in web
    assert 'data-resource-condition="Degraded" data-status="True"' in web
    assert 'data-resource-condition="Flapping" data-status="False"' in web
    assert 'title="Unhealthy: is failed: exit 1"' in web and "data-problem" in web
    assert 'data-observed-revision="1"' in web
    api = row_of(html, 'data-resource="workload/api"')
    assert 'data-resource-condition="Ready" data-status="True"' in api and "state-failed" not in api
    gone = row_of(html, 'data-resource="workload/gone"')
    assert 'data-drift="missing"' in gone and 'data-resource-condition="Flapping" data-status="True"' in gone
    adhoc = row_of(html, 'data-resource="workload/adhoc"')
    assert "data-resource-condition" not in adhoc  # not managed: no conditions


def test_a_managed_resource_the_reconciler_has_not_seen_is_unknown(world: World) -> None:
    a_workload(world.acme, "web", managed_revision=1)
    html = signed_in(world, "alice").get(reverse("desired")).content.decode()
    web = row_of(html, 'data-resource="workload/web"')
    assert 'data-resource-condition="Ready" data-status="Unknown"' in web and "state-queued" in web


# --- 3. tenant data through the permission layer --------------------------------------------------


@pytest.fixture
def for_user_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every `for_user` of the request: (model, action)."""
    calls: list[tuple[str, str]] = []
    original = TenantOwnedQuerySet.for_user

    def recording(self: Any, user: Any, action: Any = "view") -> Any:
        calls.append((self.model.__name__, action))
        return original(self, user, action)

    monkeypatch.setattr(TenantOwnedQuerySet, "for_user", recording)
    return calls


def revision(tenant: Any, number: int, text: str) -> DesiredRevision:
    return DesiredRevision.objects.create(tenant=tenant, number=number, text=text, sha256=f"{number:064d}")


def test_planning_finds_the_revision_through_the_permission_layer(
    world: World, for_user_calls: list[tuple[str, str]]
) -> None:
    Host.objects.create(name="plan-host", cpus=64, memory_mib=65536, facts={"oci_runtimes": ["runc"]})
    db_image(world.acme, "busybox", "1")
    revision(world.acme, 1, doc("300"))
    response = signed_in(world, "amir").post(reverse("desired-plan"), {"number": 1}, **HTMX)
    assert response.status_code == 200 and DesiredPlan.objects.filter(tenant=world.acme).count() == 1
    assert ("DesiredRevision", "manage") in for_user_calls


def test_planning_cannot_reach_another_tenants_revision(world: World) -> None:
    revision(world.acme, 1, doc("300"))
    response = signed_in(world, "bob").post(reverse("desired-plan"), {"number": 1})
    assert response.status_code == 422 and "Save a revision first" in response.content.decode()
    assert not DesiredPlan.objects.exists()


def test_the_revision_page_reads_its_neighbours_through_the_permission_layer(
    world: World, for_user_calls: list[tuple[str, str]]
) -> None:
    revision(world.acme, 1, doc("300"))
    second = revision(world.acme, 2, doc("600"))
    response = signed_in(world, "vic").get(reverse("desired-revision", args=[second.pk]))
    assert response.status_code == 200 and "Changes since revision 1" in response.content.decode()
    assert for_user_calls.count(("DesiredRevision", "view")) >= 2  # the revision and its neighbours


def test_the_desired_page_reads_the_state_through_the_permission_layer(
    world: World, for_user_calls: list[tuple[str, str]]
) -> None:
    assert signed_in(world, "vic").get(reverse("desired")).status_code == 200
    assert ("DesiredState", "view") in for_user_calls


# --- 4. compare a revision with any other ---------------------------------------------------------


def doc(seconds: str, image: str = "busybox:1") -> str:
    return (
        "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec:\n  workloads:\n    - name: web\n"
        f'      image: {image}\n      command: [/bin/sleep, "{seconds}"]\n      memory_mib: 64\n'
    )


@pytest.fixture
def history(world: World) -> list[DesiredRevision]:
    return [
        revision(world.acme, 1, doc("300")),
        revision(world.acme, 2, doc("600")),
        revision(world.acme, 3, doc("600", "busybox:2")),
    ]


def test_it_compares_with_the_previous_revision_by_default_and_offers_the_others(
    world: World, history: list[DesiredRevision]
) -> None:
    html = signed_in(world, "vic").get(reverse("desired-revision", args=[history[2].pk])).content.decode()
    assert "Changes since revision 2" in html and 'data-base="2"' in html
    assert '<select id="compare-against" name="against">' in html
    assert (
        '<option value="2" selected>2 (previous)</option>' in html and '<option value="1">1</option>' in html
    )
    assert '<option value="3"' not in html  # not itself
    assert 'hx-get="{}"'.format(reverse("desired-revision", args=[history[2].pk])) in html
    assert "busybox:2" in html and "busybox:1" in html  # the diff
    assert 'id="text-heading"' in html  # the full page


@pytest.mark.parametrize("persona", ["alice", "mia", "vic"])
def test_it_compares_with_a_picked_revision(
    world: World, history: list[DesiredRevision], persona: str
) -> None:
    client = signed_in(world, persona)
    url = reverse("desired-revision", args=[history[2].pk])
    html = client.get(url, {"against": 1}).content.decode()
    assert "Changes since revision 1" in html and 'data-base="1"' in html
    assert '<option value="1" selected>1</option>' in html
    assert "+      command: [/bin/sleep, &quot;600&quot;]" in html
    assert "-      command: [/bin/sleep, &quot;300&quot;]" in html
    assert 'data-action="replace"' in html and "<html" in html  # a new image: replaced
    partial = client.get(url, {"against": 1}, **HTMX)
    assert partial.status_code == 200
    body = partial.content.decode()
    assert body.lstrip().startswith('<section id="desired-diff"')
    assert "<html" not in body and "Roll back" not in body and "Changes since revision 1" in body
    later = client.get(reverse("desired-revision", args=[history[0].pk]), {"against": 3}).content.decode()
    assert "Changes from revision 3 back to revision 1" in later and 'data-action="replace"' in later


def test_the_first_revision_offers_a_comparison_but_shows_none(
    world: World, history: list[DesiredRevision]
) -> None:
    html = signed_in(world, "alice").get(reverse("desired-revision", args=[history[0].pk])).content.decode()
    assert "First revision" in html and '<option value="" selected>' in html
    assert 'class="diff-add"' not in html


def test_an_unknown_or_foreign_revision_to_compare_with_is_a_404(
    world: World, history: list[DesiredRevision]
) -> None:
    client = signed_in(world, "alice")
    url = reverse("desired-revision", args=[history[2].pk])
    assert client.get(url, {"against": 99}).status_code == 404
    assert client.get(url, {"against": "two"}).status_code == 404
    assert client.get(url, {"against": 0}).status_code == 404
    assert client.get(url, {"against": ""}).status_code == 200  # empty: the previous one
    # bob: acme's revisions are not his, neither as the page nor as the comparison.
    globex_first = revision(world.globex, 1, doc("100"))
    bob = signed_in(world, "bob")
    assert bob.get(url).status_code == 404
    assert bob.get(url, {"against": 1}, **HTMX).status_code == 404
    own = reverse("desired-revision", args=[globex_first.pk])
    assert bob.get(own).status_code == 200
    assert bob.get(own, {"against": 2}).status_code == 404  # acme has a 2; globex does not
    assert bob.get(own, {"against": 3}, **HTMX).status_code == 404
    assert "busybox:2" not in bob.get(own, {"against": 1}).content.decode()
