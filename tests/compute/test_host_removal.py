"""Removing a host (issue 16, "lost hosts and maintenance"): an operator retires an empty host; its
credential stops at once, nothing is placed on it again, its row stays for the audit trail, and only a new
operator's join token brings it back. Rows only: no agent runs here."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from compute import hosts, placement
from compute.models import Host, JoinToken, Workload
from imaging.models import Image
from portal.errors import Conflict, ServiceError
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World, client_for
from tests.frontend.test_compute_pages import signed_in

pytestmark = pytest.mark.django_db

SYSTEM = Actor.system("test")


def joined_host(name: str) -> tuple[Host, str]:
    host = hosts.register_host(actor=SYSTEM, name=name, facts={"cpus": 4, "memory_mib": 4096})
    return host, hosts.issue_host_credential(actor=SYSTEM, host=host)


def workload_on(world: World, host: Host, name: str) -> Workload:
    digest = "sha256:" + "0" * 64
    image = Image.objects.create(tenant=world.acme, name="img", tag=name, manifest_digest=digest)
    return Workload.objects.create(tenant=world.acme, name=name, image=image, host=host, state="stopped")


def test_it_removes_an_empty_host_revokes_its_credential_and_keeps_the_row(world: World) -> None:
    host, secret = joined_host("retiring")
    assert hosts.host_for_credential(secret) == host

    answer = client_for(world, "oscar").delete(f"/api/v1/hosts/{host.pk}/")

    assert answer.status_code == 200
    assert answer.json()["state"] == "removed" and answer.json()["removed_at"]
    assert hosts.host_for_credential(secret) is None
    assert Host.objects.get(pk=host.pk).state == "removed"
    assert AuditEntry.objects.filter(action="host.remove", object_id=str(host.pk)).exists()
    assert AuditEntry.objects.filter(action="host.credential.revoke", object_id=str(host.pk)).exists()


def test_it_refuses_to_remove_a_host_that_still_has_workloads_and_says_evacuate(world: World) -> None:
    host, secret = joined_host("busy")
    workload_on(world, host, "db")

    answer = client_for(world, "oscar").delete(f"/api/v1/hosts/{host.pk}/")

    assert answer.status_code == 409
    assert "evacuate" in answer.json()["error"]["message"] and "db" in answer.json()["error"]["message"]
    assert Host.objects.get(pk=host.pk).state == "ready"
    assert hosts.host_for_credential(secret) == host  # nothing changed
    assert AuditEntry.objects.filter(action="host.remove", outcome="denied").exists()


@pytest.mark.parametrize("persona", ["alice", "bob", "charlie", "oscar_acme", "oscar_readonly"])
def test_it_lets_nobody_but_an_operator_remove_a_host(world: World, persona: str) -> None:
    host, secret = joined_host("guarded")

    answer = client_for(world, persona).delete(f"/api/v1/hosts/{host.pk}/")

    assert answer.status_code in (403, 404)
    assert Host.objects.get(pk=host.pk).state == "ready"
    assert hosts.host_for_credential(secret) == host


def test_it_never_places_a_workload_on_a_removed_host(world: World) -> None:
    host, _ = joined_host("gone")
    hosts.remove_host(actor=Actor(user=world.user("oscar")), host=host)

    with pytest.raises(ServiceError):
        placement.choose_host(isolation="namespace", vcpus=Decimal("0.1"), memory_mib=16, pinned=host)


def test_it_does_not_call_a_removed_host_lost_nor_let_it_be_set_ready_or_evacuated(world: World) -> None:
    host, _ = joined_host("quiet")
    oscar = Actor(user=world.user("oscar"))
    hosts.remove_host(actor=oscar, host=host)
    Host.objects.filter(pk=host.pk).update(last_heartbeat=timezone.now() - timedelta(hours=1))

    assert host.name not in hosts.mark_lost_hosts()
    with pytest.raises(Conflict):
        hosts.set_host_state(actor=oscar, host=Host.objects.get(pk=host.pk), state="ready")
    assert client_for(world, "oscar").post(f"/api/v1/hosts/{host.pk}/evacuate/").status_code == 409
    assert Host.objects.get(pk=host.pk).state == "removed"


def test_it_expires_unused_join_tokens_and_lets_a_new_one_bring_the_host_back(world: World) -> None:
    oscar = Actor(user=world.user("oscar"))
    _, first = hosts.create_join_token(actor=oscar, host_name="phoenix", profile={})
    _, stale = hosts.create_join_token(actor=oscar, host_name="phoenix", profile={})  # never used
    host, _ = hosts.redeem_join_token(secret=first, facts={"cpus": 2, "memory_mib": 2048}, address=None)

    hosts.remove_host(actor=oscar, host=host)

    with pytest.raises(ServiceError):
        hosts.redeem_join_token(secret=stale, facts={"cpus": 2, "memory_mib": 2048}, address=None)
    assert Host.objects.get(pk=host.pk).state == "removed"
    _, fresh = hosts.create_join_token(actor=oscar, host_name="phoenix", profile={})
    back, profile = hosts.redeem_join_token(secret=fresh, facts={"cpus": 2, "memory_mib": 2048}, address=None)
    assert back.pk == host.pk and back.state == "ready" and back.removed_at is None
    assert hosts.host_for_credential(profile["credential"]) == back
    assert JoinToken.objects.filter(host_name="phoenix", used_at__isnull=False).count() == 2


def test_it_removes_a_host_from_the_hosts_page_and_shows_it_removed(world: World) -> None:
    host, secret = joined_host("paged")
    client = signed_in(world, "oscar")

    page = client.post(reverse("host-remove", args=[host.pk]), HTTP_HX_REQUEST="true")

    assert page.status_code == 200
    assert Host.objects.get(pk=host.pk).state == "removed"
    assert hosts.host_for_credential(secret) is None
    assert "was removed" in page.content.decode()


def test_it_shows_a_rotated_credential_once_on_the_hosts_page(world: World) -> None:
    host, secret = joined_host("rotating")
    client = signed_in(world, "oscar")

    page = client.post(reverse("host-credential", args=[host.pk]), HTTP_HX_REQUEST="true")

    text = page.content.decode()
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    assert hosts.host_for_credential(secret) is None
    new_secret = text.split('id="host-credential" class="secret">')[1].split("<")[0]
    assert hosts.host_for_credential(new_secret) == host
    assert new_secret not in client.get(reverse("hosts")).content.decode()
