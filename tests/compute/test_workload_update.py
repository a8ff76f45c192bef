"""Updating a workload in place: compute.services.update_workload and PATCH /api/workloads/{id}/.

Rows only: an update changes no runtime (a running workload picks the change up when restarted), so
these tests need no host agent. Quota and host capacity are the real rows under their real locks.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse

from compute import services
from compute.models import Host, Workload
from compute.placement import NoHostFits
from portal.errors import Conflict, Invalid
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tenants.quota import QuotaExceeded
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db


def placed(world: World, tenant: Any, *, vcpus: str = "1", memory_mib: int = 256, **fields: Any) -> Workload:
    """A workload row placed on a small host, with its resources counted in the tenant's quota."""
    host, _ = Host.objects.get_or_create(name="small", defaults={"cpus": 4, "memory_mib": 2048})
    workload = Workload.objects.create(
        tenant=tenant,
        name=fields.pop("name", "web"),
        image=db_image(tenant, "img"),
        host=host,
        state=fields.pop("state", "running"),
        vcpus=Decimal(vcpus),
        memory_mib=memory_mib,
        **fields,
    )
    Quota.objects.filter(tenant=tenant).update(
        used_vcpus=Decimal(vcpus), used_memory_mib=memory_mib, used_workloads=1
    )
    return workload


def alice(world: World) -> Actor:
    return Actor(user=world.user("alice"))


def test_it_changes_the_process_and_says_which_fields_changed(world: World) -> None:
    workload = placed(world, world.acme, command=["/bin/sh"])

    changed = services.update_workload(
        actor=alice(world),
        workload=workload,
        changes={"command": ["/bin/echo"], "env": {"A": "1"}, "restart_policy": "always"},
    )

    assert changed == {"command", "env", "restart_policy"}
    workload.refresh_from_db()
    assert workload.command == ["/bin/echo"] and workload.env == {"A": "1"}
    assert workload.restart_policy == "always"
    entry = AuditEntry.objects.get(action="workload.update")
    assert entry.details == {"fields": ["command", "env", "restart_policy"]}
    assert changed & services.RESTART_FIELDS == {"command", "env"}


def test_it_writes_nothing_when_nothing_changes(world: World) -> None:
    workload = placed(world, world.acme, env={"A": "1"})

    changed = services.update_workload(actor=alice(world), workload=workload, changes={"env": {"A": "1"}})

    assert changed == set()
    assert not AuditEntry.objects.filter(action="workload.update").exists()


def test_it_moves_the_quota_with_the_resources(world: World) -> None:
    workload = placed(world, world.acme, vcpus="1", memory_mib=256)

    services.update_workload(
        actor=alice(world), workload=workload, changes={"vcpus": Decimal("2"), "memory_mib": 128}
    )

    quota = Quota.objects.get(tenant=world.acme)
    assert quota.used_vcpus == Decimal(2) and quota.used_memory_mib == 128


def test_it_refuses_growth_beyond_the_quota_and_changes_nothing(world: World) -> None:
    workload = placed(world, world.acme, vcpus="1")
    Quota.objects.filter(tenant=world.acme).update(vcpus=Decimal(2))

    with pytest.raises(QuotaExceeded):
        services.update_workload(
            actor=alice(world), workload=workload, changes={"vcpus": Decimal("3"), "env": {"X": "1"}}
        )

    workload.refresh_from_db()
    assert workload.vcpus == Decimal(1) and workload.env == {}
    assert Quota.objects.get(tenant=world.acme).used_vcpus == Decimal(1)
    denial = AuditEntry.objects.get(action="quota.exceeded")
    assert denial.outcome == "denied" and denial.tenant == world.acme


def test_it_refuses_growth_beyond_the_hosts_free_capacity(world: World) -> None:
    workload = placed(world, world.acme, memory_mib=256)

    with pytest.raises(NoHostFits, match="cannot grow"):
        services.update_workload(actor=alice(world), workload=workload, changes={"memory_mib": 4096})

    workload.refresh_from_db()
    assert workload.memory_mib == 256
    assert Quota.objects.get(tenant=world.acme).used_memory_mib == 256


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"vcpus": Decimal(0)}, "vcpus"),
        ({"memory_mib": 8}, "memory_mib"),
        ({"workdir": "relative"}, "workdir"),
        ({"env": {"A=B": "1"}}, "env"),
    ],
)
def test_it_refuses_what_a_create_would_refuse(world: World, changes: dict[str, Any], field: str) -> None:
    workload = placed(world, world.acme)

    with pytest.raises(Invalid) as refused:
        services.update_workload(actor=alice(world), workload=workload, changes=changes)

    assert refused.value.field == field
    assert not AuditEntry.objects.filter(action="workload.update").exists()


def test_it_refuses_fields_that_are_the_workloads_identity(world: World) -> None:
    workload = placed(world, world.acme)

    with pytest.raises(Invalid, match="isolation"):
        services.update_workload(actor=alice(world), workload=workload, changes={"isolation": "microvm"})


def test_it_refuses_a_workload_being_deleted(world: World) -> None:
    workload = placed(world, world.acme, state="deleting")

    with pytest.raises(Conflict):
        services.update_workload(actor=alice(world), workload=workload, changes={"env": {"A": "1"}})


def test_it_updates_through_the_api(world: World) -> None:
    workload = placed(world, world.acme)
    url = reverse("api:workload-detail", kwargs={"pk": workload.pk})

    response = client_for(world, "mia").patch(url, {"args": ["-c", "echo hi"], "vcpus": "0.5"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["args"] == ["-c", "echo hi"]
    assert response.json()["vcpus"] == "0.50"


def test_it_answers_an_unknown_field_with_a_clear_error(world: World) -> None:
    workload = placed(world, world.acme)
    url = reverse("api:workload-detail", kwargs={"pk": workload.pk})

    response = client_for(world, "mia").patch(url, {"image": "something-else"}, format="json")

    assert response.status_code == 400
    assert "image" in response.content.decode()
    workload.refresh_from_db()
    assert workload.image.name == "img"


def test_it_hides_another_tenants_workload(world: World) -> None:
    workload = placed(world, world.globex)
    url = reverse("api:workload-detail", kwargs={"pk": workload.pk})

    response = client_for(world, "mia").patch(url, {"env": {"A": "1"}}, format="json")

    assert response.status_code == 404
    workload.refresh_from_db()
    assert workload.env == {}
