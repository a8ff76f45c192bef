"""The reconciler: scheduling, exclusivity, backoff, monitor and autocorrect, the flap breaker.

Most tests run a reconciler pass in-process against database rows (a workload "stopped on the host" is
its row saying so, which is what the host agent writes). One test runs the real thing: a worker and an
agent on a host, a workload stopped and another deleted through the API, corrected by the reconciler.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from compute.desired import reconciler, services, tasks
from compute.desired.models import DesiredState, ResourceCorrection
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import busybox, finished, host, store_dir, workload_in  # noqa: F401
from tests.conftest import World, client_for
from tests.imaging.images import db_image
from tests.processes import celery_beat, celery_worker, wait_until

DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  workloads:
    - name: web
      image: busybox:1
      command: [/bin/sleep, "300"]
      memory_mib: 64
    - name: api
      image: busybox:1
      command: [/bin/sleep, "300"]
      memory_mib: 64
"""


def apply_document(world: World, text: str = DOC) -> None:
    actor = Actor(user=world.user("alice"))
    revision, _ = services.save_revision(actor=actor, tenant=world.acme, text=text)
    plan = services.create_plan(actor=actor, tenant=world.acme, revision=revision)
    op = services.apply_plan(actor=actor, plan=plan)
    tasks.apply_plan.apply(args=[str(op.pk)])
    op.refresh_from_db()
    assert op.state == "succeeded", op.error


def set_mode(world: World, mode: str) -> None:
    services.set_mode(actor=Actor(user=world.user("alice")), tenant=world.acme, mode=mode)


def condition(world: World, kind: str) -> dict[str, Any]:
    found = DesiredState.objects.get(tenant=world.acme).condition(kind)
    assert found is not None
    return found


@pytest.fixture
def applied(world: World) -> World:
    Host.objects.create(name="db-host", cpus=64, memory_mib=65536, facts={"oci_runtimes": ["runc"]})
    db_image(world.acme, "busybox", "1")
    apply_document(world)
    Workload.objects.update(state="running")
    Operation.objects.update(state="succeeded")
    return world


@pytest.mark.django_db
def test_monitor_reports_drift_and_changes_nothing(applied: World) -> None:
    set_mode(applied, "monitor")
    reconciler.reconcile_tenant(applied.acme.pk)
    assert condition(applied, "Ready")["status"] == "True"
    Workload.objects.filter(name="web").update(state="stopped")
    Workload.objects.filter(name="api").delete()
    operations_before = Operation.objects.count()
    reconciler.reconcile_tenant(applied.acme.pk)
    drifted = condition(applied, "Drifted")
    assert drifted["status"] == "True" and drifted["observedRevision"] == 1
    assert drifted["message"] == "workload/api missing; workload/web stopped"
    assert condition(applied, "Ready")["reason"] == "Drifted"
    assert Operation.objects.count() == operations_before
    assert Workload.objects.get(name="web").state == "stopped"
    per_resource = DesiredState.objects.get(tenant=applied.acme).resource_conditions
    assert per_resource["workload/web"]["Drifted"] == "True"
    assert per_resource["workload/web"]["reason"] == "DriftStopped"
    assert per_resource["workload/api"]["reason"] == "DriftMissing"
    assert per_resource["workload/api"]["Ready"] == "False"


@pytest.mark.django_db
def test_mode_off_reports_and_schedules_nothing(applied: World) -> None:
    set_mode(applied, "monitor")
    set_mode(applied, "off")
    Workload.objects.filter(name="web").update(state="stopped")

    assert reconciler.reconcile_tenant(applied.acme.pk) == {"skipped": "mode is off"}
    assert reconciler.due_tenants() == []
    assert DesiredState.objects.get(tenant=applied.acme).conditions == []


@pytest.mark.django_db
def test_an_unhealthy_managed_workload_degrades_the_tenant_and_the_resource(applied: World) -> None:
    set_mode(applied, "monitor")
    Workload.objects.filter(name="web").update(state="failed", status_message="exit code 3")

    reconciler.reconcile_tenant(applied.acme.pk)

    degraded = condition(applied, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ResourcesUnhealthy"
    assert degraded["message"] == "workload/web is failed: exit code 3"
    web = DesiredState.objects.get(tenant=applied.acme).resource_conditions["workload/web"]
    assert web["Degraded"] == "True" and web["Ready"] == "False"
    assert web["message"] == "is failed: exit code 3"
    api = DesiredState.objects.get(tenant=applied.acme).resource_conditions["workload/api"]
    assert api == {
        "Ready": "True",
        "Drifted": "False",
        "Degraded": "False",
        "Flapping": "False",
        "observedRevision": 1,
    }


@pytest.mark.django_db
def test_autocorrect_starts_a_stopped_and_recreates_a_deleted_workload(applied: World) -> None:
    set_mode(applied, "autocorrect")
    Workload.objects.filter(name="web").update(state="stopped", desired_running=False)
    Workload.objects.filter(name="api").delete()
    result = reconciler.reconcile_tenant(applied.acme.pk)
    assert [(c["key"], c["action"]) for c in result["corrected"]] == [
        ("workload/api", "create"),
        ("workload/web", "update"),
    ]
    assert Operation.objects.filter(kind="workload.start", state="queued").count() == 1
    assert Workload.objects.get(name="api").managed_revision == 1
    assert condition(applied, "Ready")["reason"] == "Correcting"
    # The start is in flight: the next pass does not pile up another one.
    reconciler.reconcile_tenant(applied.acme.pk)
    assert Operation.objects.filter(kind="workload.start").count() == 1


@pytest.mark.django_db
def test_the_flap_breaker_stops_correcting_a_resource_that_keeps_changing_back(
    applied: World, settings: Any
) -> None:
    settings.BULKHEAD_FLAP_MAX_CORRECTIONS = 2
    settings.BULKHEAD_FLAP_WINDOW_SECONDS = 600
    set_mode(applied, "autocorrect")
    now = timezone.now()
    for attempt in range(3):
        Operation.objects.update(state="succeeded")
        Workload.objects.filter(name="web").update(state="stopped")  # someone stops it again
        result = reconciler.reconcile_tenant(applied.acme.pk, now=now + timedelta(seconds=30 * attempt))
    assert result["corrected"] == [] and result["flapping"] == ["workload/web"]
    flapping = condition(applied, "Flapping")
    assert flapping["status"] == "True" and "workload/web" in flapping["message"]
    assert ResourceCorrection.objects.filter(key="workload/web").count() == 2
    assert Operation.objects.filter(kind="workload.start").count() == 2
    # Said once, when it started flapping: in the audit log and on the resource.
    announced = AuditEntry.objects.get(action="desired.flapping")
    assert announced.tenant == applied.acme and announced.details["key"] == "workload/web"
    web = DesiredState.objects.get(tenant=applied.acme).resource_conditions["workload/web"]
    assert web["Flapping"] == "True" and web["reason"] == "TooManyCorrections"
    reconciler.reconcile_tenant(applied.acme.pk, now=now + timedelta(seconds=100))
    assert AuditEntry.objects.filter(action="desired.flapping").count() == 1
    assert AuditEntry.objects.filter(action="desired.corrected").count() == 2
    # Once the window has passed it corrects again.
    Operation.objects.update(state="succeeded")
    later = reconciler.reconcile_tenant(applied.acme.pk, now=now + timedelta(seconds=700))
    assert [c["key"] for c in later["corrected"]] == ["workload/web"]


@pytest.mark.django_db
def test_one_run_per_tenant_at_a_time(applied: World) -> None:
    set_mode(applied, "monitor")
    assert services.claim(applied.acme.pk, "apply:someone", 60)
    assert reconciler.reconcile_tenant(applied.acme.pk) == {
        "skipped": "another run or an apply holds this tenant"
    }
    assert reconciler.due_tenants() == []
    services.release(applied.acme.pk, "apply:someone")
    assert reconciler.due_tenants() == [applied.acme.pk]
    assert reconciler.due_tenants() == []  # picked once: the next tick does not queue it again


@pytest.mark.django_db
def test_runs_are_jittered_and_status_writes_do_not_trigger_another(applied: World, settings: Any) -> None:
    settings.BULKHEAD_RECONCILE_SECONDS = 10
    set_mode(applied, "monitor")
    now = timezone.now()
    delays = []
    for _ in range(20):
        reconciler.reconcile_tenant(applied.acme.pk, now=now)
        next_run = DesiredState.objects.get(tenant=applied.acme).next_run_at
        assert next_run is not None
        delays.append((next_run - now).total_seconds())
    assert all(8 <= delay <= 10 for delay in delays)
    assert max(delays) - min(delays) > 0.2, "runs of different tenants must not line up"
    # The run wrote its status (conditions, drift, timings) 20 times: none of that made it due again.
    assert reconciler.due_tenants(now=now) == []
    assert reconciler.due_tenants(now=now + timedelta(seconds=5)) == []
    assert reconciler.due_tenants(now=now + timedelta(seconds=10)) == [applied.acme.pk]


@pytest.mark.django_db
def test_failures_back_off_exponentially_up_to_a_cap(
    applied: World, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.BULKHEAD_RECONCILE_SECONDS = 10
    settings.BULKHEAD_RECONCILE_MAX_BACKOFF_SECONDS = 25
    set_mode(applied, "monitor")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database of the runtime is on fire")

    monkeypatch.setattr(reconciler.observe, "observed_resources", broken)
    now = timezone.now()
    delays = []
    for _ in range(4):
        with pytest.raises(RuntimeError):
            reconciler.reconcile_tenant(applied.acme.pk, now=now)
        state = DesiredState.objects.get(tenant=applied.acme)
        delays.append((state.next_run_at - now).total_seconds())  # type: ignore[operator]
    assert 8 <= delays[0] <= 10 and 16 <= delays[1] <= 20 and 20 <= delays[2] <= 25 and delays[3] <= 25
    assert state.failures == 4 and "on fire" in state.last_error
    assert condition(applied, "Degraded")["reason"] == "ReconcileFailed"
    monkeypatch.undo()
    reconciler.reconcile_tenant(applied.acme.pk, now=now)
    assert DesiredState.objects.get(tenant=applied.acme).failures == 0


@pytest.mark.django_db(transaction=True)
def test_autocorrect_restores_workloads_stopped_or_deleted_through_the_api(
    world: World,
    busybox: Any,  # noqa: F811
    host: Host,  # noqa: F811
) -> None:
    apply_document(world)
    web, api = workload_in("web", {"running"}), workload_in("api", {"running"})
    mia = client_for(world, "mia")
    assert finished(
        mia.post(f"/api/v1/workloads/{web.pk}/stop/", {"grace_seconds": 1}, format="json").json()["id"]
    )
    assert finished(mia.delete(f"/api/v1/workloads/{api.pk}/").json()["id"]).state == "succeeded"
    set_mode(world, "monitor")
    reconciler.reconcile_tenant(world.acme.pk)
    assert condition(world, "Drifted")["message"] == "workload/api missing; workload/web stopped"
    set_mode(world, "autocorrect")
    reconciler.reconcile_tenant(world.acme.pk)
    workload_in("web", {"running"})
    workload_in("api", {"running"})
    wait_until(
        lambda: not Operation.objects.filter(state__in=["queued", "running"]).exists(), what="ops done"
    )
    reconciler.reconcile_tenant(world.acme.pk)
    assert condition(world, "Ready")["status"] == "True"
    assert condition(world, "Drifted")["status"] == "False"


@pytest.mark.django_db(transaction=True)
def test_drift_made_on_the_host_shows_within_one_interval_of_the_real_beat_and_is_corrected(
    world: World,
    busybox: Any,  # noqa: F811
    host: Host,  # noqa: F811
) -> None:
    """Real beat, real worker, real agent: a container killed behind Bulkhead's back is reported by the
    next reconciler run in monitor mode, and started again in autocorrect mode."""
    from tests.compute.runtimes import oci_runtime

    # restart: never - with the default (on-failure) the host agent itself restarts a killed container.
    apply_document(
        world, DOC.replace("      memory_mib: 64\n", "      memory_mib: 64\n      restart: never\n")
    )
    web = workload_in("web", {"running"})
    workload_in("api", {"running"})
    wait_until(
        lambda: not Operation.objects.filter(state__in=["queued", "running"]).exists(), what="ops done"
    )
    set_mode(world, "monitor")
    interval = {"BULKHEAD_RECONCILE_SECONDS": "2"}
    with (
        celery_worker(queues="default", name="reconciler", **interval),
        celery_beat("reconciler", **interval),
    ):
        wait_until(lambda: _status(world, "Ready") == "True", what="a first run", timeout=30)
        pid = oci_runtime(host).state(web.runtime_id).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: _status(world, "Drifted") == "True", what="drift reported", timeout=30)
        # The agent notices the exit within a second; the next run comes at most one interval later.
        assert time.monotonic() - killed < 2 + 1 + 2, "drift must show within one interval"
        assert condition(world, "Drifted")["message"] == "workload/web stopped"
        assert Workload.objects.get(pk=web.pk).state == "failed"  # killed: exit code 137

        set_mode(world, "autocorrect")
        workload_in("web", {"running"}, timeout=60)
        wait_until(lambda: _status(world, "Ready") == "True", what="corrected", timeout=60)
    assert ResourceCorrection.objects.filter(key="workload/web").count() == 1


def _status(world: World, kind: str) -> str | None:
    found = DesiredState.objects.get(tenant=world.acme).condition(kind)
    return found["status"] if found else None


NET_DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  networks:
    - name: front
  workloads:
    - name: web
      image: busybox:1
      memory_mib: 64
      networks: [front]
  ports:
    - workload: web
      port: 80
"""


@pytest.mark.django_db
def test_autocorrect_republishes_a_port_unpublished_by_hand(world: World) -> None:
    from compute import network_services
    from compute.compartments import Compartment, PublishedPort

    Host.objects.create(
        name="db-net-host",
        cpus=64,
        memory_mib=65536,
        facts={"oci_runtimes": ["runc"]},
        labels={"network": "on"},
    )
    db_image(world.acme, "busybox", "1")
    apply_document(world, NET_DOC)
    Workload.objects.update(state="running")
    Operation.objects.update(state="succeeded")
    assert Compartment.objects.get(name="front").subnet == "10.200.0.0/24"  # IPAM's choice is not drift
    set_mode(world, "monitor")
    reconciler.reconcile_tenant(world.acme.pk)
    assert condition(world, "Ready")["status"] == "True"
    network_services.unpublish_port(actor=Actor(user=world.user("mia")), port=PublishedPort.objects.get())
    reconciler.reconcile_tenant(world.acme.pk)
    assert condition(world, "Drifted")["message"] == "port/web/80/tcp missing"
    set_mode(world, "autocorrect")
    result = reconciler.reconcile_tenant(world.acme.pk)
    assert [(c["key"], c["action"]) for c in result["corrected"]] == [("port/web/80/tcp", "create")]
    assert PublishedPort.objects.get().workload_port == 80
    Operation.objects.update(state="succeeded")
    reconciler.reconcile_tenant(world.acme.pk)
    assert condition(world, "Ready")["status"] == "True"
