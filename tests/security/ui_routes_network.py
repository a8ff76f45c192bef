"""UI matrix entries for the network pages (merged into UI_ROUTES by test_ui_matrix.py).

Imported by test_ui_matrix once UiRoute and its object builders exist (the module is then in sys.modules).
"""

from typing import Any

from tests.conftest import World
from tests.security.test_ui_matrix import UiRoute, _workload


def _compartment(world: World, ownership: str) -> Any:
    from compute.compartments import Compartment

    tenant = world.acme if ownership == "acme" else world.globex
    third = 10 if ownership == "acme" else 11
    return Compartment.objects.create(
        tenant=tenant,
        name=f"matrix-{ownership}",
        subnet=f"10.250.{third}.0/24",
        gateway=f"10.250.{third}.1",
        vni=60000 + third,
    ).pk


def _published_port(world: World, ownership: str) -> Any:
    from compute.compartments import Compartment, IPAllocation, PublishedPort
    from compute.models import Workload

    workload = Workload.objects.select_related("host").get(pk=_workload(world, ownership))
    compartment = Compartment.objects.get(pk=_compartment(world, ownership))
    IPAllocation.objects.create(
        compartment=compartment,
        workload=workload,
        address=compartment.subnet[:-4] + "2",
        mac="02:00:00:00:00:02",
    )
    assert workload.host is not None
    return PublishedPort.objects.create(
        tenant=workload.tenant, workload=workload, host=workload.host, host_port=20000, workload_port=80
    ).pk


ROUTES: dict[str, Any] = {
    "compartments": UiRoute(),
    "compartment-create": UiRoute(method="POST", acts="manage"),
    "compartment-detail": UiRoute(obj=_compartment, acts="view"),
    "compartment-delete": UiRoute(method="POST", obj=_compartment, acts="manage"),
    "compartment-publish": UiRoute(method="POST", obj=_compartment, acts="operate"),
    "port-unpublish": UiRoute(method="POST", obj=_published_port, acts="operate"),
}
