"""Operator exceptions to the egress policy, per tenant: service, API, audit, and what the host is sent.

The traffic itself (a workload reaching an allowed protected service, another tenant's not) is proven in
tests/network/test_compartments_e2e.py.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest

from compute import services
from compute.compartments import Compartment, EgressAllowance
from compute.models import Host, Workload
from tenants.actors import Actor
from tenants.choices import AuditOutcome
from tenants.models import AuditEntry, Tenant
from tests.compute.runtimes import host_network_state
from tests.compute.test_compartments import net_host, new_workload  # noqa: F401
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

SERVICE = "198.51.100.20/32"


def allowances_url(tenant: Tenant) -> str:
    return f"/api/v1/tenants/{tenant.pk}/egress-allowances/"


def allow(world: World, persona: str, tenant: Tenant, network: str = SERVICE, **extra: Any) -> Any:
    return client_for(world, persona).post(
        allowances_url(tenant), {"network": network, **extra}, format="json"
    )


def denials(action: str) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action, outcome=AuditOutcome.DENIED))


def test_it_lets_an_operator_open_a_protected_network_to_a_tenant(world: World) -> None:
    response = allow(world, "oscar", world.acme, note="the licence server")

    assert response.status_code == 201, response.json()
    assert response.json()["network"] == SERVICE and response.json()["note"] == "the licence server"
    assert [a.network for a in EgressAllowance.objects.filter(tenant=world.acme)] == [SERVICE]
    entry = AuditEntry.objects.get(action="tenant.egress_allow", outcome=AuditOutcome.OK)
    assert entry.actor == world.users["oscar"] and entry.tenant == world.acme
    assert entry.details == {"network": SERVICE, "note": "the licence server"}
    # The tenant's members see what was opened to them; the other tenant sees nothing of it.
    listed = client_for(world, "mia").get(allowances_url(world.acme))
    assert [a["network"] for a in listed.json()] == [SERVICE]
    assert client_for(world, "bob").get(allowances_url(world.acme)).status_code == 404


@pytest.mark.parametrize("persona", ["alice", "amir", "mia", "vic"])
def test_it_refuses_the_tenants_own_members_and_audits_the_attempt(world: World, persona: str) -> None:
    response = allow(world, persona, world.acme)

    assert response.status_code == 403, response.json()
    assert not EgressAllowance.objects.exists()
    (denial,) = denials("tenant.egress_allow")
    assert denial.actor == world.users[persona] and denial.tenant == world.acme


@pytest.mark.parametrize("token", ["oscar_readonly", "oscar_acme"])
def test_it_refuses_operator_tokens_that_are_read_only_or_scoped(world: World, token: str) -> None:
    response = client_for(world, token).post(allowances_url(world.acme), {"network": SERVICE}, format="json")
    assert response.status_code == 403, response.json()
    assert not EgressAllowance.objects.exists()
    assert len(denials("tenant.egress_allow")) == 1


def test_it_does_not_show_another_tenant_that_the_tenant_exists(world: World) -> None:
    assert allow(world, "bob", world.acme).status_code == 404
    assert client_for(world, "charlie").get(allowances_url(world.acme)).status_code == 404
    assert not EgressAllowance.objects.exists()


@pytest.mark.parametrize(
    ("network", "says"),
    [
        ("169.254.169.254/32", "link-local"),
        ("169.254.0.0/16", "link-local"),
        ("0.0.0.0/0", "link-local"),
        ("10.0.0.1/8", "CIDR"),
        ("not-a-network", "CIDR"),
        ("198.51.100.0/24; drop", "CIDR"),
        ("", "required"),
        ("127.0.0.0/8", "not a network"),
        ("224.0.0.0/4", "not a network"),
    ],
)
def test_it_refuses_networks_no_workload_may_reach_and_audits_it(
    world: World, network: str, says: str
) -> None:
    response = allow(world, "oscar", world.acme, network=network)

    assert response.status_code == 400, response.json()
    assert says in response.json()["error"]["message"]
    assert not EgressAllowance.objects.exists()
    assert len(denials("tenant.egress_allow")) == 1


def test_it_refuses_the_same_network_twice(world: World) -> None:
    assert allow(world, "oscar", world.acme).status_code == 201
    again = allow(world, "oscar", world.acme)
    assert again.status_code == 409
    assert EgressAllowance.objects.count() == 1


def test_it_lets_only_an_operator_revoke_an_allowance(world: World) -> None:
    allowance_id = allow(world, "oscar", world.acme).json()["id"]
    url = f"/api/v1/egress-allowances/{allowance_id}/"

    assert client_for(world, "alice").delete(url).status_code == 403
    assert client_for(world, "oscar_acme").delete(url).status_code == 403
    assert client_for(world, "bob").delete(url).status_code == 404
    assert client_for(world, "mia").get(url).json()["network"] == SERVICE
    assert EgressAllowance.objects.filter(pk=allowance_id).exists()
    assert len(denials("tenant.egress_revoke")) == 2

    assert client_for(world, "oscar").delete(url).status_code == 204
    assert not EgressAllowance.objects.exists()
    entry = AuditEntry.objects.get(action="tenant.egress_revoke", outcome=AuditOutcome.OK)
    assert entry.details == {"network": SERVICE} and entry.tenant == world.acme


def test_it_sends_a_tenants_allowances_with_its_compartments_only(world: World, net_host: Host) -> None:  # noqa: F811
    acme_workload = new_workload(world, "web")
    globex_spec = services.WorkloadSpec(name="gx", image=db_image(world.globex, "img-gx"))  # type: ignore[arg-type]
    services.create_workload(
        actor=Actor(user=world.user("bob")), tenant=world.globex, spec=globex_spec, start=False
    )
    assert Workload.objects.get(name="gx").host == net_host == acme_workload.host
    assert allow(world, "oscar", world.acme).status_code == 201

    state = host_network_state(net_host)

    allowed = {
        compartment.compartment_id: list(compartment.egress_allowed) for compartment in state.compartments
    }
    acme_net = Compartment.objects.get(tenant=world.acme).network_id
    globex_net = Compartment.objects.get(tenant=world.globex).network_id
    assert allowed == {acme_net: [IPv4Network(SERVICE)], globex_net: []}
