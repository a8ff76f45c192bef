"""Every operation keeps a log of its steps: queued, started, each new message, and how it ended."""

from __future__ import annotations

import pytest

from portal import operations
from portal.tasks import selfcheck
from tenants.actors import Actor
from tenants.api.views import start_selfcheck
from tests.conftest import World, client_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_logs_each_step_of_an_operation_in_order(world: World) -> None:
    op = start_selfcheck(Actor(user=world.user("oscar")), steps=2)
    selfcheck.apply(args=[str(op.pk)], task_id=str(op.pk))
    log = client_for(world, "oscar").get(f"/api/v1/operations/{op.pk}/log/").json()
    assert log["operation"]["state"] == "succeeded"
    steps = [(entry["event"], entry["message"]) for entry in log["entries"]]
    assert steps == [
        ("queued", ""),
        ("started", ""),
        ("progress", "Checking the database"),
        ("progress", "Checking the broker"),
        ("progress", "Checking disk space"),
        ("progress", "Step 1 of 2"),
        ("progress", "Step 2 of 2"),
        ("succeeded", "Done"),
    ]
    times = [entry["at"] for entry in log["entries"]]
    assert times == sorted(times)


def test_it_logs_the_failure_and_shows_the_error_on_the_page(world: World) -> None:
    op = start_selfcheck(Actor(user=world.user("oscar")))
    operations.claim(op.pk)
    operations.fail(op.pk, "The broker did not answer.")
    log = client_for(world, "oscar").get(f"/api/v1/operations/{op.pk}/log/").json()
    assert [entry["event"] for entry in log["entries"]] == ["queued", "started", "failed"]
    assert log["operation"]["error"] == "The broker did not answer."
    from django.test import Client

    browser = Client()
    browser.force_login(world.user("oscar"))
    page = browser.get(f"/operations/{op.pk}/").content.decode()
    assert "The broker did not answer." in page and "Why it failed" in page
