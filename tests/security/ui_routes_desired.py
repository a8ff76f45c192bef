"""UI matrix entries for the desired pages (merged into UI_ROUTES by test_ui_matrix.py)."""

from __future__ import annotations

from typing import Any

from tests.conftest import World
from tests.security.test_ui_matrix import UiRoute

MATRIX_DOC = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {}\n"


def _revision(world: World, ownership: str) -> Any:
    from compute.desired.models import DesiredRevision

    tenant = world.acme if ownership == "acme" else world.globex
    number = DesiredRevision.objects.filter(tenant=tenant).count() + 1
    return DesiredRevision.objects.create(tenant=tenant, number=number, text=MATRIX_DOC, sha256="0" * 64).pk


def _plan(world: World, ownership: str) -> Any:
    """A stored plan whose fingerprint matches nothing: applying it is the stale-plan 409."""
    from compute.desired.models import DesiredPlan, DesiredRevision

    revision = DesiredRevision.objects.get(pk=_revision(world, ownership))
    return DesiredPlan.objects.create(
        tenant=revision.tenant,
        revision=revision,
        plan={"format": 1, "prune": False, "steps": []},
        observed_fingerprint="stale",
        desired_fingerprint="x",
    ).pk


ROUTES: dict[str, Any] = {
    "desired": UiRoute(),
    "desired-mode": UiRoute(method="POST", acts="manage"),
    "desired-validate": UiRoute(method="POST", acts="manage"),
    "desired-save": UiRoute(method="POST", acts="manage"),
    "desired-plan": UiRoute(method="POST", acts="manage"),
    "desired-apply": UiRoute(method="POST", obj=_plan, acts="manage"),
    "desired-revision": UiRoute(obj=_revision, acts="view"),
    "desired-rollback": UiRoute(method="POST", obj=_revision, acts="manage"),
}
