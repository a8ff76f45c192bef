"""The host API as a compromised host would use it: host A holds its own credential and tries to act on
host B's workloads, operations and compartments, to read B's specs, and to inflate its own capacity.
Each attempt is refused like a missing object (or a 403 for capacity), changes nothing and is audited."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from compute import hosts, services
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db

BASE = "/api/v1/hosts/self"


def make_host(name: str) -> Host:
    facts = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100, "oci_runtimes": ["runc"]}
    return hosts.register_host(actor=Actor.system("test"), name=name, facts=facts)


def as_host(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def place(world: World, name: str, host: Host, **spec: Any) -> Workload:
    """A workload of acme pinned to `host` (its creation task is never run here)."""
    image = db_image(world.acme, f"img-{name}")
    services.create_workload(
        actor=Actor(user=world.user("oscar")),
        tenant=world.acme,
        spec=services.WorkloadSpec(name=name, image=image, host=host, **spec),  # type: ignore[arg-type]
        compartments=[],
    )
    return Workload.objects.get(tenant=world.acme, name=name)


def denied(action: str, host: Host) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action, outcome="denied", actor_label=f"host {host.name}"))


@pytest.fixture
def two_hosts(world: World) -> dict[str, Any]:
    a, b = make_host("bht-api-a"), make_host("bht-api-b")
    system = Actor.system("test")
    return {
        "a": a,
        "b": b,
        "secret_a": hosts.issue_host_credential(actor=system, host=a),
        "secret_b": hosts.issue_host_credential(actor=system, host=b),
        "on_a": place(world, "on-a", a),
        "on_b": place(world, "on-b", b),
    }


def test_it_records_a_state_a_host_reports_for_its_own_workload(two_hosts: dict[str, Any]) -> None:
    on_a = two_hosts["on_a"]
    answer = as_host(two_hosts["secret_a"]).post(
        f"{BASE}/workloads/{on_a.pk}/state/",
        {"expected": ["pending"], "changes": {"state": "running", "started_at": "now", "exit_code": None}},
        format="json",
    )
    assert answer.status_code == 200, answer.json()
    assert answer.json()["applied"] is True
    on_a.refresh_from_db()
    assert on_a.state == "running" and on_a.started_at is not None


def test_it_refuses_a_host_reporting_state_for_another_hosts_workload(two_hosts: dict[str, Any]) -> None:
    on_b, a = two_hosts["on_b"], two_hosts["a"]
    answer = as_host(two_hosts["secret_a"]).post(
        f"{BASE}/workloads/{on_b.pk}/state/",
        {"expected": ["pending"], "changes": {"state": "failed", "exit_code": 1, "status_message": "pwned"}},
        format="json",
    )
    assert answer.status_code == 404
    on_b.refresh_from_db()
    assert (on_b.state, on_b.exit_code, on_b.status_message) == ("pending", None, "")
    assert denied("host.workload.report", a)


def test_it_refuses_a_host_changing_what_only_the_portal_decides(two_hosts: dict[str, Any]) -> None:
    on_a = two_hosts["on_a"]
    client = as_host(two_hosts["secret_a"])
    for changes in (
        {"state": "deleting"},
        {"desired_running": False},
        {"host": str(two_hosts["b"].pk)},
        {"started_at": "2020-01-01T00:00:00Z"},
        {"exit_code": "1; drop table"},
    ):
        answer = client.post(
            f"{BASE}/workloads/{on_a.pk}/state/", {"expected": ["pending"], "changes": changes}, format="json"
        )
        assert answer.status_code == 400, (changes, answer.json())
    on_a.refresh_from_db()
    assert on_a.state == "pending" and on_a.host == two_hosts["a"] and on_a.started_at is None


def test_it_shows_a_host_only_the_specs_of_its_own_workloads(two_hosts: dict[str, Any]) -> None:
    client, on_a, on_b = as_host(two_hosts["secret_a"]), two_hosts["on_a"], two_hosts["on_b"]
    listed = client.get(f"{BASE}/workloads/").json()["workloads"]
    assert [spec["id"] for spec in listed] == [str(on_a.pk)]
    spec = listed[0]
    assert spec["runtime_id"] == on_a.runtime_id
    assert spec["process"]["args"] == ["/bin/sh"]
    assert [layer["digest"] for layer in spec["image"]["layers"]] == [
        il.layer.digest for il in on_a.image.image_layers.order_by("position")
    ]
    assert client.get(f"{BASE}/workloads/{on_a.pk}/").status_code == 200
    assert client.get(f"{BASE}/workloads/{on_b.pk}/").status_code == 404
    assert client.get(f"{BASE}/workloads/not-a-uuid/").status_code == 404
    assert denied("host.workload.read", two_hosts["a"])


def test_it_puts_the_secret_values_into_the_spec_of_the_host_that_runs_the_workload(world: World) -> None:
    from tenants import services as tenant_services

    tenant_services.create_secret(
        actor=Actor(user=world.user("alice")), tenant=world.acme, name="db-password", value="s3cr3t"
    )
    a = make_host("bht-api-sec")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=a)
    on_a = place(world, "with-secret", a, secret_env={"DB_PASSWORD": "db-password"})
    spec = as_host(secret).get(f"{BASE}/workloads/{on_a.pk}/").json()
    assert "DB_PASSWORD=s3cr3t" in spec["process"]["env"]


def test_it_refuses_capacity_above_what_was_approved(two_hosts: dict[str, Any]) -> None:
    a, client = two_hosts["a"], as_host(two_hosts["secret_a"])
    before = Host.objects.get(pk=a.pk)
    for inflated in ({"cpus": 4096}, {"memory_mib": 8193}, {"disk_gib": 101}):
        answer = client.post(f"{BASE}/facts/", {"facts": {**inflated, "kernel": "x"}}, format="json")
        assert answer.status_code == 403, answer.json()
    after = Host.objects.get(pk=a.pk)
    assert (after.cpus, after.memory_mib, after.facts) == (before.cpus, before.memory_mib, before.facts)
    assert len(denied("host.facts.report", a)) == 3
    # Less than approved (a host that lost a disk) and capabilities are recorded.
    answer = client.post(
        f"{BASE}/facts/", {"facts": {"cpus": 2, "disk_gib": 50, "kvm": False}}, format="json"
    )
    assert answer.status_code == 200, answer.json()
    after = Host.objects.get(pk=a.pk)
    assert after.cpus == 4 and after.facts["disk_gib"] == 50
    # ... and the bound stays what was approved, not what was last reported.
    assert client.post(f"{BASE}/facts/", {"facts": {"disk_gib": 100}}, format="json").status_code == 200
    assert client.post(f"{BASE}/facts/", {"facts": {"disk_gib": 101}}, format="json").status_code == 403


def test_it_refuses_facts_it_does_not_know_or_cannot_read(two_hosts: dict[str, Any]) -> None:
    client = as_host(two_hosts["secret_a"])
    for facts in (
        {"approved_disk_gib": 10**6},
        {"cpus": "many"},
        {"cpus": -1},
        {"oci_runtimes": ["runc", "/bin/sh"]},
        {"networks": ["0.0.0.0/0"]},
        {"networks": ["not a network"]},
        {"kernel": "x" * 1000},
    ):
        assert client.post(f"{BASE}/facts/", {"facts": facts}, format="json").status_code == 400, facts
    assert Host.objects.get(pk=two_hosts["a"].pk).facts["approved_disk_gib"] == 100


def test_it_lets_a_host_remove_only_its_own_workloads_being_deleted(
    world: World, two_hosts: dict[str, Any]
) -> None:
    a, on_a, on_b = two_hosts["a"], two_hosts["on_a"], two_hosts["on_b"]
    client = as_host(two_hosts["secret_a"])
    # Not being deleted: a host cannot drop a tenant's workload.
    assert client.post(f"{BASE}/workloads/{on_a.pk}/removed/").status_code == 409
    Workload.objects.filter(pk__in=[on_a.pk, on_b.pk]).update(state="deleting")
    assert client.post(f"{BASE}/workloads/{on_b.pk}/removed/").status_code == 404
    assert Workload.objects.filter(pk=on_b.pk).exists()
    assert denied("host.workload.removed", a)
    used = Quota.objects.get(tenant=world.acme).used_workloads
    assert client.post(f"{BASE}/workloads/{on_a.pk}/removed/").json() == {"removed": True}
    assert not Workload.objects.filter(pk=on_a.pk).exists()
    assert Quota.objects.get(tenant=world.acme).used_workloads == used - 1


def test_it_refuses_a_host_reporting_on_another_hosts_operation(two_hosts: dict[str, Any]) -> None:
    on_b = two_hosts["on_b"]
    op_b = Operation.objects.get(target_id=on_b.pk, kind="workload.create")
    client = as_host(two_hosts["secret_a"])
    for event in ("peek", "claim", "finish", "fail", "progress", "moved", "interrupted"):
        body = {"event": event, "error": "x", "before": "2999-01-01T00:00:00+00:00"}
        answer = client.post(f"{BASE}/operations/{op_b.pk}/", body, format="json")
        assert answer.status_code == 404
    op_b.refresh_from_db()
    assert op_b.state == "queued"
    assert denied("host.operation.report", two_hosts["a"])
    # Its own operation: claimed with what the task needs, then finished.
    op_a = Operation.objects.get(target_id=two_hosts["on_a"].pk, kind="workload.create")
    claimed = client.post(f"{BASE}/operations/{op_a.pk}/", {"event": "claim"}, format="json").json()
    # A create is no move: a host cannot hand its workload to another host by saying it moved.
    moved = client.post(f"{BASE}/operations/{op_a.pk}/", {"event": "moved"}, format="json")
    assert moved.status_code == 409
    assert Workload.objects.get(pk=two_hosts["on_a"].pk).host == two_hosts["a"]
    assert claimed["operation"]["target_id"] == str(two_hosts["on_a"].pk)
    finished = client.post(
        f"{BASE}/operations/{op_a.pk}/", {"event": "finish", "result": {"state": "running"}}, format="json"
    )
    assert finished.status_code == 200
    op_a.refresh_from_db()
    assert op_a.state == "succeeded" and op_a.result == {"state": "running"}


def test_it_refuses_samples_for_another_hosts_workload(two_hosts: dict[str, Any]) -> None:
    from compute.models import Workload as W

    W.objects.filter(pk__in=[two_hosts["on_a"].pk, two_hosts["on_b"].pk]).update(state="running")
    client = as_host(two_hosts["secret_a"])
    figures = {"cpu_seconds": 1.0, "memory_bytes": 1024}
    own = client.post(
        f"{BASE}/samples/", {"workloads": {str(two_hosts["on_a"].pk): figures}, "host": {}}, format="json"
    )
    assert own.status_code == 200 and own.json() == {"sampled": 1}
    foreign = client.post(
        f"{BASE}/samples/", {"workloads": {str(two_hosts["on_b"].pk): figures}, "host": {}}, format="json"
    )
    assert foreign.status_code == 404
    assert denied("host.samples.report", two_hosts["a"])
    # The portal counts what is allocated: a host cannot claim to be empty.
    lying = client.post(f"{BASE}/samples/", {"workloads": {}, "host": {"allocated_vcpus": 0}}, format="json")
    assert lying.status_code == 400


def test_it_refuses_network_repairs_for_a_compartment_the_host_does_not_serve(
    world: World, two_hosts: dict[str, Any]
) -> None:
    from compute import network_services

    compartment = network_services.create_compartment(
        actor=Actor(user=world.user("alice")), tenant=world.acme, name="other"
    )
    answer = as_host(two_hosts["secret_a"]).post(
        f"{BASE}/network-repairs/",
        {"repaired": ["bridge"], "repaired_by_compartment": {compartment.network_id: ["bridge"]}},
        format="json",
    )
    assert answer.status_code == 200 and answer.json() == {"recorded": 0, "refused": [compartment.network_id]}
    assert denied("host.network.report", two_hosts["a"])
    assert not AuditEntry.objects.filter(action="compartment.repaired").exists()


def test_it_serves_a_host_only_the_network_of_the_compartments_it_serves(
    world: World, two_hosts: dict[str, Any]
) -> None:
    """Host A learns nothing of a compartment whose members all live on B: not its subnet, bridge,
    members' names or addresses, nor the operations running on B's queue."""
    import json

    from compute import network_services

    a, b = two_hosts["a"], two_hosts["b"]
    Host.objects.filter(pk__in=[a.pk, b.pk]).update(labels={"network": "on", "uplink": "up0"})
    alice, oscar = Actor(user=world.user("alice")), Actor(user=world.user("oscar"))
    front = network_services.create_compartment(actor=alice, tenant=world.acme, name="front")
    back = network_services.create_compartment(actor=alice, tenant=world.acme, name="back")
    for name, host, compartment in (("web", a, front), ("secret-db", b, back)):
        spec = services.WorkloadSpec(name=name, image=db_image(world.acme, f"img-{name}"), host=host)  # type: ignore[arg-type]
        services.create_workload(actor=oscar, tenant=world.acme, spec=spec, compartments=[compartment])
    client = as_host(two_hosts["secret_a"])
    state = client.get(f"{BASE}/network/").json()
    assert [c["compartment_id"] for c in state["compartments"]] == [front.network_id]
    assert [binding["workload"] for binding in state["bindings"]] == [
        str(Workload.objects.get(name="web").pk)
    ]
    served = json.dumps(state)
    assert "secret-db" not in served and back.bridge not in served and str(back.network) not in served
    own = client.get(f"{BASE}/").json()
    assert (own["id"], own["network"]["enabled"]) == (str(a.pk), True)
    listed = client.get(f"{BASE}/operations/").json()["operations"]
    assert all(op["target_id"] != str(Workload.objects.get(name="secret-db").pk) for op in listed)


def test_it_answers_401_without_a_current_credential(two_hosts: dict[str, Any]) -> None:
    on_a = two_hosts["on_a"]
    for secret in ("", "bhh_not-a-credential", "Basic abc"):
        client = as_host(secret) if secret else APIClient()
        assert client.get(f"{BASE}/workloads/").status_code == 401
        assert client.post(f"{BASE}/heartbeat/").status_code == 401
        assert client.get(f"{BASE}/network/").status_code == 401
        assert client.get(f"{BASE}/").status_code == 401
    rotated = hosts.issue_host_credential(actor=Actor.system("test"), host=two_hosts["a"])
    assert as_host(two_hosts["secret_a"]).post(f"{BASE}/workloads/{on_a.pk}/state/").status_code == 401
    assert as_host(rotated).post(f"{BASE}/heartbeat/").status_code == 200


CREATING = {
    "expected": ["pending", "stopped", "failed", "unknown", "creating"],
    "changes": {"state": "creating", "status_message": ""},
    "never_started": True,
}


def test_it_claims_a_hosts_creation_with_its_creating_report_and_spec_in_one_request(
    two_hosts: dict[str, Any],
) -> None:
    on_a = two_hosts["on_a"]
    op = Operation.objects.get(target_id=on_a.pk, kind="workload.create")
    answer = as_host(two_hosts["secret_a"]).post(
        f"{BASE}/operations/{op.pk}/", {"event": "claim", "spec": True, "report": CREATING}, format="json"
    )
    assert answer.status_code == 200, answer.json()
    claimed = answer.json()["operation"]
    assert claimed["reported"] is True
    assert claimed["workload"]["id"] == str(on_a.pk) and claimed["workload"]["state"] == "creating"
    op.refresh_from_db()
    on_a.refresh_from_db()
    assert (op.state, on_a.state) == ("running", "creating")


def test_it_refuses_a_claim_whose_report_is_not_one_and_claims_nothing(two_hosts: dict[str, Any]) -> None:
    """A report that the state endpoint refuses is refused with the claim, before anything changes: the
    operation stays queued for a worker that asks properly."""
    on_a = two_hosts["on_a"]
    op = Operation.objects.get(target_id=on_a.pk, kind="workload.create")
    client = as_host(two_hosts["secret_a"])
    for report in (
        {"expected": ["pending"], "changes": {"state": "deleting"}},  # not a state a host may set
        {"expected": ["pending"], "changes": {"host": str(two_hosts["b"].pk)}},  # not a host's to change
        {"expected": "pending", "changes": {"state": "creating"}},
        ["creating"],
    ):
        body = {"event": "claim", "spec": True, "report": report}
        assert client.post(f"{BASE}/operations/{op.pk}/", body, format="json").status_code == 400, report
    op.refresh_from_db()
    on_a.refresh_from_db()
    assert (op.state, on_a.state, on_a.host) == ("queued", "pending", two_hosts["a"])


def test_it_never_lets_a_claim_report_on_or_read_another_hosts_workload(two_hosts: dict[str, Any]) -> None:
    """Host A's claim carries a report and asks the spec: of B's operation, refused like a missing one;
    of its own operation whose workload the portal moved to B since, the report applies to nothing and no
    spec comes back (B's workload is untouched)."""
    a, on_a, on_b = two_hosts["a"], two_hosts["on_a"], two_hosts["on_b"]
    client = as_host(two_hosts["secret_a"])
    body = {"event": "claim", "spec": True, "report": CREATING}
    op_b = Operation.objects.get(target_id=on_b.pk, kind="workload.create")
    assert client.post(f"{BASE}/operations/{op_b.pk}/", body, format="json").status_code == 404
    op_a = Operation.objects.get(target_id=on_a.pk, kind="workload.create")
    Workload.objects.filter(pk=on_a.pk).update(host=two_hosts["b"])  # moved while its create was queued
    answer = client.post(f"{BASE}/operations/{op_a.pk}/", body, format="json")
    assert answer.status_code == 200, answer.json()
    assert answer.json()["operation"]["reported"] is False
    assert answer.json()["operation"]["workload"] is None
    for workload in (on_a, on_b):
        workload.refresh_from_db()
        assert workload.state == "pending", workload.name
    op_b.refresh_from_db()
    assert op_b.state == "queued"
    assert len(denied("host.operation.report", a)) == 1
    assert len(denied("host.workload.report", a)) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("forged", ["not-an-id", "random", "its-own-move"])
def test_it_counts_a_move_whose_host_names_no_create_of_that_workload_as_failed_in_an_evacuation(
    world: World, forged: str
) -> None:
    """An evacuation followed each move by the `create_operation` its host put in the move's result: a
    host lying there crashed the operator's evacuation (not an operation id) or made a workload look
    moved (another operation's id). Only the create of that very workload counts."""
    import threading
    import time
    import uuid

    from django.db import connection

    from compute import host_reports
    from compute.hosts import run_evacuation
    from portal.models import Operation

    a, b = make_host("bht-evac-a"), make_host("bht-evac-b")
    workload = place(world, "evacuated", a)
    Workload.objects.filter(pk=workload.pk).update(pinned=False)
    op = services.evacuate_host(actor=Actor(user=world.user("oscar")), host=a)

    def lying_host() -> None:
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                move = Operation.objects.filter(queue=a.queue, kind="workload.move").first()
                if move is not None:
                    break
                time.sleep(0.05)
            assert move is not None
            actor = host_reports.host_actor(a)
            host_reports.report_operation(actor=actor, host=a, op_id=move.pk, event="claim")
            named = {"not-an-id": "not-an-id", "random": str(uuid.uuid4()), "its-own-move": str(move.pk)}
            host_reports.report_operation(
                actor=actor, host=a, op_id=move.pk, event="finish", result={"create_operation": named[forged]}
            )
        finally:
            connection.close()

    host = threading.Thread(target=lying_host)
    host.start()
    try:
        result = run_evacuation(op.pk, lambda *args, **kwargs: None)
    finally:
        host.join(30)
    assert result["failed"] == ["evacuated"] and result["moved"] == []
    assert not Operation.objects.filter(kind="workload.create", queue=b.queue).exists()
    assert len(denied("host.operation.report", a)) == 1
