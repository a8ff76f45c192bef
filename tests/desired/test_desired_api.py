"""Desired state through the REST API: revisions, diff, rollback, plans, apply, export, permissions.

Apply operations run inline here (their on-commit send never fires inside a test transaction); the host
side of the workloads they create is not needed: plans compare database rows.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from django.db import DatabaseError, transaction

from compute import network_services
from compute import services as compute_services
from compute.compartments import Compartment, IPAllocation, PublishedPort
from compute.desired import services, tasks
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState, ImmutableRevision
from compute.desired.schema import SCHEMA
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging.images import db_image
from tests.processes import celery_worker, wait_until

pytestmark = pytest.mark.django_db

DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  workloads:
    - name: web
      image: busybox:1
      command: [/bin/sleep, "300"]
      memory_mib: 64
    - name: worker
      image: busybox:1
      env: {MODE: batch}
      memory_mib: 64
      state: stopped
"""


@pytest.fixture
def ready(world: World) -> World:
    Host.objects.create(name="db-host", cpus=64, memory_mib=65536, facts={"oci_runtimes": ["runc"]})
    db_image(world.acme, "busybox", "1")
    return world


def save(world: World, text: str = DOC, persona: str = "alice", message: str = "") -> Any:
    return client_for(world, persona).post(
        "/api/v1/desired/revisions/",
        {"tenant": str(world.acme.pk), "text": text, "message": message},
        format="json",
    )


def plan(world: World, revision_id: str, persona: str = "alice") -> Any:
    return client_for(world, persona).post("/api/v1/desired/plans/", {"revision": revision_id}, format="json")


def apply_inline(world: World, plan_id: str, persona: str = "alice") -> Operation:
    response = client_for(world, persona).post(f"/api/v1/desired/plans/{plan_id}/apply/", {}, format="json")
    assert response.status_code == 202, response.json()
    tasks.apply_plan.apply(args=[response.json()["id"]])
    return Operation.objects.get(pk=response.json()["id"])


def run_in_thread(op_id: str) -> None:
    from django.db import connection

    try:
        tasks.apply_plan.apply(args=[op_id])
    finally:
        connection.close()


def changes(plan_json: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["action"], s["key"]) for s in plan_json["plan"]["steps"] if s["action"] != "noop"]


def test_it_serves_the_json_schema(world: World) -> None:
    response = client_for(world, "vic").get("/api/v1/desired/schema/")
    assert response.status_code == 200
    assert response.json() == SCHEMA


def test_it_refuses_an_invalid_document_with_path_and_line_and_stores_nothing(ready: World) -> None:
    bad = DOC.replace("      memory_mib: 64\n    - name: worker", "      memory: 64\n    - name: worker")
    response = save(ready, bad)
    assert response.status_code == 400
    issues = response.json()["error"]["issues"]
    assert {k: issues[0][k] for k in ("path", "line")} == {"path": "spec.workloads[0].memory", "line": 8}
    assert "did you mean 'memory_mib'" in issues[0]["message"]
    assert not DesiredRevision.objects.exists()


def test_it_checks_images_against_what_the_tenant_can_see(ready: World) -> None:
    db_image(ready.globex, "secret", "1")
    db_image(None, "public", "2")
    text = DOC.replace("busybox:1", "secret:1", 1).replace("image: busybox:1", "image: public:2")
    issues = save(ready, text).json()["error"]["issues"]
    assert [(i["path"], i["line"], i["message"]) for i in issues] == [
        ("spec.workloads[0].image", 6, "image not found: 'secret:1'")
    ]


NET_DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  networks:
    - name: front
      subnet: 10.42.0.0/24
  workloads:
    - name: web
      image: busybox:1
      memory_mib: 64
      state: stopped
      networks: [front]
  ports:
    - workload: web
      port: 80
    - workload: web
      port: 53
      protocol: udp
      host_port: 20053
"""


@pytest.fixture
def net_ready(world: World) -> World:
    """A host that realises compartments: only rows, allocations and quotas are looked at here."""
    Host.objects.create(
        name="db-net-host",
        cpus=64,
        memory_mib=65536,
        facts={"oci_runtimes": ["runc"]},
        labels={"network": "on"},
    )
    db_image(world.acme, "busybox", "1")
    return world


def test_networks_workloads_and_ports_apply_in_order_and_converge(net_ready: World) -> None:
    revision = save(net_ready, NET_DOC).json()
    first = plan(net_ready, revision["id"]).json()
    assert changes(first) == [
        ("create", "network/front"),
        ("create", "workload/web"),
        ("create", "port/web/53/udp"),
        ("create", "port/web/80/tcp"),
    ]
    op = apply_inline(net_ready, first["id"])
    assert op.state == "succeeded", op.error
    assert [s["outcome"] for s in op.result["steps"]] == ["done", "submitted", "submitted", "submitted"]
    front = Compartment.objects.get(tenant=net_ready.acme)
    assert (front.name, front.subnet, front.nat, front.managed_revision) == ("front", "10.42.0.0/24", True, 1)
    web = Workload.objects.get(name="web")
    assert [(a.compartment.name, a.address) for a in IPAllocation.objects.filter(workload=web)] == [
        ("front", "10.42.0.2")
    ]
    ports = {(p.workload_port, p.protocol): p.host_port for p in PublishedPort.objects.filter(workload=web)}
    assert ports == {(80, "tcp"): 20000, (53, "udp"): 20053}
    used = Quota.objects.get(tenant=net_ready.acme)
    assert (used.used_compartments, used.used_published_ports) == (1, 2)
    second = plan(net_ready, revision["id"]).json()
    assert changes(second) == []
    exported = services.export_for(net_ready.acme)
    assert "networks: [front]" in exported and "host_port: 20000" in exported


def test_a_port_removed_from_the_document_is_unpublished(net_ready: World) -> None:
    apply_inline(net_ready, plan(net_ready, save(net_ready, NET_DOC).json()["id"]).json()["id"])
    text = NET_DOC.replace("    - workload: web\n      port: 80\n", "")
    planned = plan(net_ready, save(net_ready, text).json()["id"]).json()
    assert changes(planned) == [("delete", "port/web/80/tcp")]
    op = apply_inline(net_ready, planned["id"])
    assert op.state == "succeeded", op.error
    assert list(PublishedPort.objects.values_list("workload_port", "protocol")) == [(53, "udp")]
    assert Quota.objects.get(tenant=net_ready.acme).used_published_ports == 1
    assert changes(plan(net_ready, DesiredRevision.objects.get(number=2).pk.hex).json()) == []


def test_an_unmanaged_port_is_adopted_and_a_hand_made_one_is_not_deleted(net_ready: World) -> None:
    apply_inline(net_ready, plan(net_ready, save(net_ready, NET_DOC).json()["id"]).json()["id"])
    actor = Actor(user=net_ready.user("alice"))
    network_services.publish_port(actor=actor, workload=Workload.objects.get(name="web"), workload_port=8080)
    planned = plan(net_ready, DesiredRevision.objects.get(number=1).pk.hex).json()
    assert changes(planned) == []
    assert ("noop", "port/web/8080/tcp") in [(s["action"], s["key"]) for s in planned["plan"]["steps"]]
    text = NET_DOC + "    - workload: web\n      port: 8080\n"
    adopted = plan(net_ready, save(net_ready, text).json()["id"]).json()
    assert [
        (s["action"], s["key"], s["reason"]) for s in adopted["plan"]["steps"] if s["action"] != "noop"
    ] == [("update", "port/web/8080/tcp", "adopt: declared in the document, exists unmanaged")]
    assert apply_inline(net_ready, adopted["id"]).state == "succeeded"
    assert changes(plan(net_ready, DesiredRevision.objects.get(number=2).pk.hex).json()) == []
    assert PublishedPort.objects.count() == 3


def test_removing_everything_tears_down_ports_then_workloads_then_networks(
    net_ready: World, settings: Any
) -> None:
    settings.BULKHEAD_DESIRED_APPLY_WAIT_SECONDS = 0
    apply_inline(net_ready, plan(net_ready, save(net_ready, NET_DOC).json()["id"]).json()["id"])
    empty = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {}\n"
    planned = plan(net_ready, save(net_ready, empty).json()["id"]).json()
    assert changes(planned) == [
        ("delete", "port/web/53/udp"),
        ("delete", "port/web/80/tcp"),
        ("delete", "workload/web"),
        ("delete", "network/front"),
    ]
    op = apply_inline(net_ready, planned["id"])
    # The host has not finished deleting the workload: the network waits for it (apply wait is 0 here).
    assert op.state == "failed" and "network/front: waiting for its workloads' deletion" in op.error
    assert not PublishedPort.objects.exists()
    assert Workload.objects.get(name="web").state == "deleting"
    compute_services.forget_workload(Workload.objects.get(name="web").pk)  # what the host's task does
    again = plan(net_ready, DesiredRevision.objects.get(number=2).pk.hex).json()
    assert changes(again) == [("delete", "network/front")]
    assert apply_inline(net_ready, again["id"]).state == "succeeded"
    assert not Compartment.objects.exists()
    used = Quota.objects.get(tenant=net_ready.acme)
    assert (used.used_compartments, used.used_published_ports, used.used_workloads) == (0, 0, 0)


def test_a_subnet_overlapping_an_existing_network_of_the_tenant_is_refused_at_its_line(
    net_ready: World,
) -> None:
    network_services.create_compartment(
        actor=Actor(user=net_ready.user("alice")), tenant=net_ready.acme, name="legacy", subnet="10.42.0.0/16"
    )
    response = save(net_ready, NET_DOC)
    assert response.status_code == 400
    issues = response.json()["error"]["issues"]
    assert [(i["path"], i["line"]) for i in issues] == [("spec.networks[0].subnet", 6)]
    assert "overlaps 10.42.0.0/16 of the tenant's existing network 'legacy'" in issues[0]["message"]
    assert not DesiredRevision.objects.exists()


def test_another_tenants_overlapping_subnet_fails_the_apply_clearly(net_ready: World) -> None:
    network_services.create_compartment(
        actor=Actor(user=net_ready.user("bob")), tenant=net_ready.globex, name="theirs", subnet="10.42.0.0/24"
    )
    op = apply_inline(net_ready, plan(net_ready, save(net_ready, NET_DOC).json()["id"]).json()["id"])
    assert op.state == "failed"
    assert "network/front: Subnet 10.42.0.0/24 overlaps a network in use on this installation." in op.error
    assert "theirs" not in op.error
    assert not Compartment.objects.filter(tenant=net_ready.acme).exists()
    assert not Workload.objects.exists() and not PublishedPort.objects.exists()


def test_an_unknown_network_or_an_unreachable_port_is_refused_with_path_and_line(net_ready: World) -> None:
    text = NET_DOC.replace("networks: [front]", "networks: [back]")
    issues = save(net_ready, text).json()["error"]["issues"]
    assert [(i["path"], i["line"], i["message"]) for i in issues] == [
        ("spec.workloads[0].networks[0]", 12, "unknown network 'back': declare it under spec.networks")
    ]
    no_network = NET_DOC.replace("      networks: [front]\n", "")
    issues = save(net_ready, no_network).json()["error"]["issues"]
    assert [(i["path"], i["line"]) for i in issues] == [
        ("spec.ports[0].workload", 13),
        ("spec.ports[1].workload", 15),
    ]
    assert "is on no network" in issues[0]["message"]
    out_of_range = NET_DOC.replace("host_port: 20053", "host_port: 80")
    issues = save(net_ready, out_of_range).json()["error"]["issues"]
    assert [(i["path"], i["line"]) for i in issues] == [("spec.ports[1].host_port", 19)]


def test_it_numbers_revisions_and_keeps_them_immutable(ready: World) -> None:
    first = save(ready, message="first")
    assert first.status_code == 201 and first.json()["number"] == 1
    assert save(ready).status_code == 200  # the same text again is the same revision
    second = save(ready, DOC.replace("batch", "stream"), message="stream mode")
    assert second.json()["number"] == 2 and second.json()["author_label"] == "alice"
    revision = DesiredRevision.objects.get(number=1)
    revision.message = "rewritten"
    with pytest.raises(ImmutableRevision):
        revision.save()
    # Bypassing save() does not help: the database refuses too.
    with pytest.raises(DatabaseError, match="immutable"), transaction.atomic():
        DesiredRevision.objects.filter(pk=revision.pk).update(text="spec: {}")
    assert DesiredRevision.objects.get(pk=revision.pk).text == DOC


def test_it_diffs_any_two_revisions_and_rolls_back_to_an_old_one(ready: World) -> None:
    client = client_for(ready, "amir")
    one = save(ready).json()
    two = save(ready, DOC.replace("batch", "stream")).json()
    diff = client.get(f"/api/v1/desired/revisions/{two['id']}/diff/").json()
    assert "-      env: {MODE: batch}\n+      env: {MODE: stream}" in diff["diff"]
    assert [(c["action"], c["key"]) for c in diff["changes"]] == [("update", "workload/worker")]
    assert diff["changes"][0]["changes"] == [{"path": "env.MODE", "before": "batch", "after": "stream"}]
    reverse = client.get(f"/api/v1/desired/revisions/{one['id']}/diff/?against=2").json()
    assert reverse["from"] == 2 and reverse["to"] == 1
    rolled = client.post(f"/api/v1/desired/revisions/{one['id']}/rollback/", {}, format="json")
    assert rolled.status_code == 201
    assert rolled.json()["number"] == 3 and rolled.json()["rolled_back_from"] == 1
    assert rolled.json()["text"] == DOC


def test_applying_twice_leaves_nothing_to_do_and_plans_are_deterministic(ready: World) -> None:
    revision = save(ready).json()
    first = plan(ready, revision["id"]).json()
    again = plan(ready, revision["id"]).json()
    assert first["plan"] == again["plan"]
    assert changes(first) == [("create", "workload/web"), ("create", "workload/worker")]
    op = apply_inline(ready, first["id"])
    assert op.state == "succeeded", op.error
    web, worker = Workload.objects.order_by("name")
    assert (web.managed_revision, worker.managed_revision) == (1, 1)
    assert web.desired_running and not worker.desired_running
    assert DesiredState.objects.get(tenant=ready.acme).target_revision == 1
    second = plan(ready, revision["id"]).json()
    assert changes(second) == []
    assert DesiredPlan.objects.get(pk=first["id"]).state == "applied"


def test_an_update_changes_the_row_in_place_and_a_removal_deletes(ready: World) -> None:
    apply_inline(ready, plan(ready, save(ready).json()["id"]).json()["id"])
    text = DOC.replace("batch", "stream")
    planned = plan(ready, save(ready, text).json()["id"]).json()
    assert changes(planned) == [("update", "workload/worker")]
    assert apply_inline(ready, planned["id"]).state == "succeeded"
    assert Workload.objects.get(name="worker").env == {"MODE": "stream"}
    assert Workload.objects.get(name="worker").managed_revision == 2


def test_it_refuses_a_stale_plan_with_a_clear_409(ready: World) -> None:
    revision = save(ready).json()
    planned = plan(ready, revision["id"]).json()
    Workload.objects.create(
        tenant=ready.acme, name="hand-made", image=db_image(ready.acme, "busybox", "2"), state="stopped"
    )
    response = client_for(ready, "alice").post(
        f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json"
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "stale_plan"
    assert "changed since this plan was made" in response.json()["error"]["message"]
    assert DesiredPlan.objects.get(pk=planned["id"]).state == "stale"
    assert not Workload.objects.filter(name="web").exists()


def test_members_read_and_only_owners_and_admins_write(ready: World) -> None:
    revision = save(ready).json()
    planned = plan(ready, revision["id"]).json()
    mia = client_for(ready, "mia")
    assert mia.get(f"/api/v1/desired/revisions/{revision['id']}/").status_code == 200
    assert mia.get(f"/api/v1/desired/plans/{planned['id']}/").status_code == 200
    assert mia.get(f"/api/v1/desired/{ready.acme.pk}/status/").status_code == 200
    assert save(ready, persona="mia").status_code == 403
    assert plan(ready, revision["id"], persona="mia").status_code == 403
    assert mia.post(f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json").status_code == 403
    assert (
        mia.patch(f"/api/v1/desired/{ready.acme.pk}/", {"mode": "autocorrect"}, format="json").status_code
        == 403
    )
    bob = client_for(ready, "bob")
    assert bob.get(f"/api/v1/desired/plans/{planned['id']}/").status_code == 404
    assert bob.post(f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json").status_code == 404
    amir = client_for(ready, "amir")
    state = amir.patch(f"/api/v1/desired/{ready.acme.pk}/", {"mode": "monitor"}, format="json")
    assert state.status_code == 200 and state.json()["mode"] == "monitor"


def test_it_exports_current_resources_for_adoption(ready: World) -> None:
    image = db_image(ready.acme, "busybox", "2")
    Workload.objects.create(
        tenant=ready.acme,
        name="legacy",
        image=image,
        state="running",
        command=["/bin/sleep", "1000"],
        memory_mib=128,
        restart_policy="always",
    )
    exported = client_for(ready, "vic").get(f"/api/v1/desired/{ready.acme.pk}/export/").json()["document"]
    assert "name: legacy" in exported and "image: busybox:2" in exported
    planned = plan(ready, save(ready, exported).json()["id"]).json()
    assert [(s["action"], s["reason"]) for s in planned["plan"]["steps"]] == [
        ("update", "adopt: declared in the document, exists unmanaged")
    ]
    assert apply_inline(ready, planned["id"]).state == "succeeded"
    assert Workload.objects.get(name="legacy").managed_revision == 1
    assert changes(plan(ready, DesiredRevision.objects.get(number=1).pk.hex).json()) == []


def test_a_preview_plan_of_an_unsaved_document_cannot_be_applied(ready: World) -> None:
    response = client_for(ready, "alice").post(
        "/api/v1/desired/plans/", {"tenant": str(ready.acme.pk), "text": DOC}, format="json"
    )
    assert response.status_code == 201 and response.json()["revision"] is None
    assert changes(response.json()) == [("create", "workload/web"), ("create", "workload/worker")]
    applied = client_for(ready, "alice").post(
        f"/api/v1/desired/plans/{response.json()['id']}/apply/", {}, format="json"
    )
    assert applied.status_code == 409
    assert not DesiredRevision.objects.exists()


def test_an_apply_interrupted_by_a_lost_worker_resumes_and_converges(ready: World) -> None:
    revision = save(ready).json()
    planned = plan(ready, revision["id"]).json()
    response = client_for(ready, "alice").post(
        f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json"
    )
    # The first delivery claimed the plan and created "web", then the worker died.
    real_run = services.Executor.run

    def die_after_first_step(self: services.Executor, plan_: Any) -> Any:
        self._guarded(plan_.build_steps()[0], self._build)
        raise SystemExit("worker killed")

    services.Executor.run = die_after_first_step  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            services.execute_plan(planned["id"])
    finally:
        services.Executor.run = real_run  # type: ignore[method-assign]
    assert list(Workload.objects.values_list("name", flat=True)) == ["web"]
    assert DesiredPlan.objects.get(pk=planned["id"]).state == "applying"
    # Redelivery (acks_late): the same operation runs again and converges from what exists.
    tasks.apply_plan.apply(args=[response.json()["id"]])
    op = Operation.objects.get(pk=response.json()["id"])
    assert op.state == "succeeded", op.error
    assert op.result["resumed"] is True
    assert sorted(Workload.objects.values_list("name", flat=True)) == ["web", "worker"]
    assert changes(plan(ready, revision["id"]).json()) == []


@pytest.mark.django_db(transaction=True)
def test_an_apply_whose_worker_is_killed_mid_way_is_resumed_and_converges(
    ready: World, settings: Any
) -> None:
    settings.BULKHEAD_DESIRED_APPLY_LEASE_SECONDS = 2
    revision = save(ready).json()
    planned = plan(ready, revision["id"]).json()
    lease = {"BULKHEAD_DESIRED_APPLY_LEASE_SECONDS": "2"}
    with celery_worker(name="doomed", BULKHEAD_FAILPOINT="desired.apply.after_step", **lease) as worker:
        response = client_for(ready, "alice").post(
            f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json"
        )
        assert response.status_code == 202
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL  # killed right after its first step
    op_id = response.json()["id"]
    assert Operation.objects.get(pk=op_id).state == "running"
    assert DesiredPlan.objects.get(pk=planned["id"]).state == "applying"
    assert list(Workload.objects.values_list("name", flat=True)) == ["web"]

    # Once the dead worker's lease has lapsed, the beat tick's sweep sends the apply again, once.
    wait_until(lambda: services.resume_interrupted_applies() == [planned["id"]], what="resumed", timeout=15)
    assert services.resume_interrupted_applies() == []
    with celery_worker(name="healthy", **lease):
        wait_until(lambda: Operation.objects.get(pk=op_id).state != "running", what="apply done", timeout=60)

    op = Operation.objects.get(pk=op_id)
    assert op.state == "succeeded", op.error
    assert op.result["resumed"] is True
    assert sorted(Workload.objects.values_list("name", flat=True)) == ["web", "worker"]  # no duplicate
    assert all(w.managed_revision == 1 for w in Workload.objects.all())  # no orphan: both are managed
    assert DesiredPlan.objects.get(pk=planned["id"]).state == "applied"
    assert changes(plan(ready, revision["id"]).json()) == []
    assert AuditEntry.objects.filter(action="desired.apply.resumed").count() == 1
    assert AuditEntry.objects.filter(action="desired.applied").count() == 1


def test_a_live_apply_is_not_resumed_and_a_dead_operation_fails_its_plan(ready: World) -> None:
    revision = save(ready).json()
    planned = plan(ready, revision["id"]).json()
    response = client_for(ready, "alice").post(
        f"/api/v1/desired/plans/{planned['id']}/apply/", {}, format="json"
    )
    DesiredPlan.objects.filter(pk=planned["id"]).update(state="applying")
    assert services.claim(ready.acme.pk, f"apply:{planned['id']}:live", 60)

    assert services.resume_interrupted_applies() == []  # its worker holds a live claim

    services.release(ready.acme.pk, f"apply:{planned['id']}:live")
    Operation.objects.filter(pk=response.json()["id"]).update(state="failed", error="boom")
    assert services.resume_interrupted_applies() == []
    assert DesiredPlan.objects.get(pk=planned["id"]).state == "failed"


@pytest.mark.django_db(transaction=True)
def test_concurrent_applies_of_one_tenant_serialize(ready: World) -> None:
    revision = save(ready).json()
    first = plan(ready, revision["id"]).json()
    second = plan(ready, revision["id"]).json()
    ops = [
        client_for(ready, "alice")
        .post(f"/api/v1/desired/plans/{p['id']}/apply/", {}, format="json")
        .json()["id"]
        for p in (first, second)
    ]
    spans: list[tuple[float, float]] = []
    real_run = services.Executor.run

    def slow_run(self: services.Executor, plan_: Any) -> Any:
        started = time.monotonic()
        time.sleep(0.5)
        try:
            return real_run(self, plan_)
        finally:
            spans.append((started, time.monotonic()))

    services.Executor.run = slow_run  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=run_in_thread, args=(op,)) for op in ops]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        services.Executor.run = real_run  # type: ignore[method-assign]
    states = sorted(Operation.objects.get(pk=op).state for op in ops)
    assert states == ["failed", "succeeded"]
    failed = Operation.objects.get(pk__in=ops, state="failed")
    assert "StalePlanError" in failed.operator_details["error"]
    assert len(spans) == 1  # the second found the first's result and refused to run a stale plan
    assert Workload.objects.count() == 2


def test_it_resolves_a_documents_images_in_one_query_its_own_first(world: World) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    db_image(None, "shared", "1")
    own = db_image(world.acme, "shared", "1")
    public = db_image(None, "shared", "2")
    latest = db_image(None, "registry.example:5000/tool", "latest")
    theirs = db_image(world.globex, "private", "1")
    images = services.TenantImages(world.acme)
    digest = f"shared@{public.manifest_digest}"  # type: ignore[attr-defined]
    references = ["shared:1", "shared", digest, "registry.example:5000/tool", "private:1"]

    with CaptureQueriesContext(connection) as queries:
        images.prefetch(references)
        found = {reference: images.image(reference) for reference in references}

    assert len(queries) == 1
    assert found == {
        "shared:1": own,  # the tenant's own image before the public one of the same name
        "shared": None,  # no "shared:latest"
        digest: public,
        "registry.example:5000/tool": latest,  # a port, not a tag
        "private:1": None,  # another tenant's image is not visible
    }
    assert theirs is not None


def apply_document(world: World, text: str = DOC, persona: str = "alice", **extra: Any) -> Any:
    body = {"tenant": str(world.acme.pk), "text": text, **extra}
    return client_for(world, persona).post("/api/v1/desired/apply/", body, format="json")


def test_it_saves_plans_and_applies_a_document_in_one_request(ready: World) -> None:
    response = apply_document(ready, message="at once")
    assert response.status_code == 202, response.json()
    answer = response.json()
    assert (answer["revision"]["number"], answer["revision"]["message"]) == (1, "at once")
    assert answer["revision_created"] is True
    assert changes(answer["plan"]) == [("create", "workload/web"), ("create", "workload/worker")]
    assert answer["plan"]["revision"] == answer["revision"]["id"]
    op = Operation.objects.get(pk=answer["operation"]["id"])
    assert (op.kind, op.tenant_id, op.state) == ("desired.apply", ready.acme.pk, "queued")
    assert DesiredPlan.objects.get(pk=answer["plan"]["id"]).operation_id == op.pk
    # Each step is audited as when the three requests were separate.
    actions = list(AuditEntry.objects.filter(tenant=ready.acme).values_list("action", flat=True))
    assert {"desired.revision", "desired.plan", "desired.apply"} <= set(actions)
    tasks.apply_plan.apply(args=[str(op.pk)])
    assert Operation.objects.get(pk=op.pk).state == "succeeded"
    assert DesiredState.objects.get(tenant=ready.acme).target_revision == 1


def test_it_applies_an_unchanged_document_only_when_its_revision_is_not_yet_the_target(
    ready: World,
) -> None:
    first = apply_document(ready).json()
    tasks.apply_plan.apply(args=[first["operation"]["id"]])
    again = apply_document(ready)
    assert again.status_code == 200 and again.json()["operation"] is None
    assert again.json()["revision_created"] is False and changes(again.json()["plan"]) == []
    # The same resources under a new revision: nothing to change, but the new revision becomes the target.
    renumbered = apply_document(ready, DOC + "# a comment\n")
    assert renumbered.status_code == 202 and renumbered.json()["revision"]["number"] == 2
    tasks.apply_plan.apply(args=[renumbered.json()["operation"]["id"]])
    assert DesiredState.objects.get(tenant=ready.acme).target_revision == 2


def test_it_refuses_a_one_request_apply_like_the_separate_requests(ready: World) -> None:
    refused = apply_document(ready, persona="mia")  # a member: reads, does not manage
    assert refused.status_code == 403
    assert AuditEntry.objects.filter(outcome="denied", details__path="/api/v1/desired/apply/").exists()
    assert apply_document(ready, persona="bob").status_code == 400  # another tenant's id: "No such tenant."
    invalid = apply_document(ready, "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {workloads: 3}\n")
    assert invalid.status_code == 400 and invalid.json()["error"]["issues"]
    assert not DesiredRevision.objects.exists() and not DesiredPlan.objects.exists()
    assert not Operation.objects.filter(kind="desired.apply").exists()
