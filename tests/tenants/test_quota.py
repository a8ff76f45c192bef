"""Quota allocation under a row lock: concurrent creations never pass a limit together."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction

from tenants import quota
from tenants.models import Quota
from tests.conftest import World

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_allocates_within_the_limit_and_refuses_beyond(world: World) -> None:
    Quota.objects.filter(tenant=world.acme).update(workloads=2)
    with transaction.atomic():
        quota.allocate(world.acme, workloads=2, vcpus=Decimal("1.5"))
    with pytest.raises(quota.QuotaExceeded) as refused, transaction.atomic():
        quota.allocate(world.acme, workloads=1)
    assert refused.value.resource == "workloads"
    assert "2 of 2" in str(refused.value)
    q = Quota.objects.get(tenant=world.acme)
    assert (q.used_workloads, q.used_vcpus) == (2, Decimal("1.5"))


def test_it_releases_without_going_below_zero(world: World) -> None:
    with transaction.atomic():
        quota.allocate(world.acme, memory_mib=512)
    quota.release(world.acme, memory_mib=1024)
    assert Quota.objects.get(tenant=world.acme).used_memory_mib == 0


def test_it_refuses_to_allocate_outside_a_transaction(world: World) -> None:
    with pytest.raises(RuntimeError):
        quota.allocate(world.acme, workloads=1)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need PostgreSQL (make test runs it)")
def test_it_never_lets_concurrent_creations_pass_together(world: World) -> None:
    Quota.objects.filter(tenant=world.acme).update(workloads=5)
    attempts = 12
    barrier = threading.Barrier(attempts)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create_one() -> None:
        try:
            barrier.wait(timeout=30)
            with transaction.atomic():
                quota.allocate(world.acme, workloads=1)
                # Hold the lock a moment so that the others really queue behind it.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.02)")
            result = "ok"
        except quota.QuotaExceeded:
            result = "refused"
        finally:
            connections.close_all()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=create_one) for _ in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 7
    assert Quota.objects.get(tenant=world.acme).used_workloads == 5
