"""Volumes, their mounts and backup schedules in the TenantConfig: plan, apply, drift, correction.

Rows only (the host's part is played by hand where said: a created volume becomes ready, a stopped
workload stops); the end-to-end test with a real container is in test_desired_volumes_e2e.py. Deleting a
volume takes both ``prune: true`` and ``prune_volumes: true``; everything else keeps it and says so.
"""

from __future__ import annotations

from typing import Any

import pytest

from backups.models import BackupSchedule
from compute.desired import reconciler, services
from compute.desired.document import DocumentError, parse_document
from compute.desired.models import DesiredState
from compute.desired.planning import PlanConflict, compute_plan
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.desired.test_desired_api import apply_inline, changes, plan, save
from tests.imaging.images import db_image
from volumes.models import GIB, Volume, VolumeAttachment

pytestmark = pytest.mark.django_db

DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  volumes:
    - name: db-data
      size_gib: 2
      backups: {every_hours: 24, keep_last: 3}
  workloads:
    - name: db
      image: busybox:1
      memory_mib: 64
      state: stopped
      volumes:
        - {volume: db-data, path: /var/lib/db}
"""

DB_MOUNT = "        - {volume: db-data, path: /var/lib/db}\n"
EMPTY = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec:\n  prune: {prune}\n  prune_volumes: {volumes}\n"


@pytest.fixture
def ready(world: World, settings: Any) -> World:
    # The host's part is done by hand here: an apply that would wait for it reports "waiting" at once.
    settings.BULKHEAD_DESIRED_APPLY_WAIT_SECONDS = 0
    pool = {"total_bytes": 100 * GIB, "used_bytes": 0, "free_bytes": 100 * GIB}
    Host.objects.create(
        name="db-vol-host",
        cpus=64,
        memory_mib=65536,
        facts={"oci_runtimes": ["runc"], "volume_pool": pool},
    )
    db_image(world.acme, "busybox", "1")
    return world


def host_made_volumes_ready() -> None:
    """What the volume's host task does when it has created or grown the subvolume."""
    Volume.objects.filter(state__in=["creating", "resizing"]).update(state="ready")


def apply_text(world: World, text: str) -> Operation:
    planned = plan(world, save(world, text).json()["id"]).json()
    return apply_inline(world, planned["id"])


def applied(world: World, text: str = DOC) -> None:
    """Apply ``text`` until it converges, playing the host in between."""
    apply_text(world, text)
    host_made_volumes_ready()
    op = apply_text(world, text)
    assert op.state == "succeeded", op.error


def steps_of(planned: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(s["action"], s["key"], s["reason"]) for s in planned["plan"]["steps"] if s["action"] != "noop"]


def issues(world: World, text: str, persona: str = "alice") -> list[tuple[str, int, str]]:
    response = save(world, text, persona)
    assert response.status_code == 400, response.json()
    return [(i["path"], i["line"], i["message"]) for i in response.json()["error"]["issues"]]


# ------------------------------------------------------------------------------------------ plan, apply


def test_a_volume_and_its_mount_are_created_the_workload_once_the_volume_is_ready(ready: World) -> None:
    revision = save(ready, DOC).json()
    first = plan(ready, revision["id"]).json()
    assert changes(first) == [("create", "volume/db-data"), ("create", "workload/db")]

    op = apply_inline(ready, first["id"])

    # The volume is on its way; the workload waits for it rather than start on a volume not there yet.
    assert op.state == "failed" and "workload/db: waiting for volume 'db-data' to be ready" in op.error
    volume = Volume.objects.get(tenant=ready.acme, name="db-data")
    assert (volume.size_bytes, volume.state, volume.managed_revision) == (2 * GIB, "creating", 1)
    assert Quota.objects.get(tenant=ready.acme).used_volume_bytes == 2 * GIB
    schedule = BackupSchedule.objects.get(volume=volume)
    assert (schedule.every_hours, schedule.keep_last, schedule.enabled) == (24, 3, True)
    assert not Workload.objects.exists()

    host_made_volumes_ready()
    second = plan(ready, revision["id"]).json()
    assert changes(second) == [("create", "workload/db")]
    assert apply_inline(ready, second["id"]).state == "succeeded"
    db = Workload.objects.get(name="db")
    assert [(a.volume.name, a.path, a.read_only) for a in VolumeAttachment.objects.filter(workload=db)] == [
        ("db-data", "/var/lib/db", False)
    ]
    assert changes(plan(ready, revision["id"]).json()) == []
    exported = services.export_for(ready.acme)
    assert "  volumes:\n    - name: db-data\n      size_gib: 2\n" in exported
    assert "      backups:\n        every_hours: 24\n        keep_last: 3\n" in exported
    assert "        - volume: db-data\n          path: /var/lib/db\n          read_only: false\n" in exported
    # What was exported applies as it is: nothing to do.
    assert changes(plan(ready, save(ready, exported).json()["id"]).json()) == []


def test_a_volume_left_out_of_the_document_is_kept_unless_prune_and_prune_volumes_both_say_so(
    ready: World,
) -> None:
    applied(ready)
    dropped = plan(ready, save(ready, EMPTY.format(prune="false", volumes="false")).json()["id"]).json()
    assert steps_of(dropped) == [
        ("delete", "workload/db", "managed, no longer in the document"),
        (
            "keep",
            "volume/db-data",
            "kept: volume db-data would be deleted with all its data; "
            "set prune: true and prune_volumes: true to allow it",
        ),
    ]
    op = apply_inline(ready, dropped["id"])
    assert op.state == "succeeded", op.error
    kept = [s for s in op.result["steps"] if s["key"] == "volume/db-data"]
    assert [(s["action"], s["outcome"]) for s in kept] == [("keep", "done")]
    assert "kept: volume db-data would be deleted" in kept[0]["detail"]
    volume = Volume.objects.get(name="db-data")
    assert (volume.state, volume.managed_revision) == ("ready", None)  # kept, no longer managed
    Workload.objects.filter(name="db").delete()  # the host finished deleting it

    prune_only = plan(ready, save(ready, EMPTY.format(prune="true", volumes="false")).json()["id"]).json()
    assert steps_of(prune_only) == [
        (
            "keep",
            "volume/db-data",
            "kept: volume db-data would be deleted with all its data; set prune_volumes: true to allow it",
        )
    ]
    assert apply_inline(ready, prune_only["id"]).state == "succeeded"
    assert Volume.objects.get(name="db-data").state == "ready"

    both = plan(ready, save(ready, EMPTY.format(prune="true", volumes="true")).json()["id"]).json()
    assert steps_of(both) == [
        (
            "delete",
            "volume/db-data",
            "prune: unmanaged, not in the document; prune_volumes: its data is deleted",
        )
    ]
    op = apply_inline(ready, both["id"])
    assert op.state == "succeeded", op.error
    assert Volume.objects.get(name="db-data").state == "deleting"
    assert AuditEntry.objects.filter(action="volume.delete", tenant=ready.acme, outcome="ok").exists()


def test_a_managed_volume_dropped_with_both_prunes_is_deleted_after_its_workload(ready: World) -> None:
    applied(ready)
    both = plan(ready, save(ready, EMPTY.format(prune="true", volumes="true")).json()["id"]).json()
    assert changes(both) == [("delete", "workload/db"), ("delete", "volume/db-data")]
    op = apply_inline(ready, both["id"])
    # The workload's host has not deleted it yet, so its attachment holds the volume: the volume waits.
    assert op.state == "failed" and "volume/db-data: waiting for its workloads' deletion" in op.error
    assert Volume.objects.get(name="db-data").state == "ready"
    Workload.objects.filter(name="db").delete()  # the host finished
    again = plan(ready, save(ready, EMPTY.format(prune="true", volumes="true")).json()["id"]).json()
    assert changes(again) == [("delete", "volume/db-data")]
    assert apply_inline(ready, again["id"]).state == "succeeded"
    assert Volume.objects.get(name="db-data").state == "deleting"


def test_prune_volumes_without_prune_is_refused_at_its_line(ready: World) -> None:
    assert issues(ready, EMPTY.format(prune="false", volumes="true")) == [
        (
            "spec.prune_volumes",
            5,
            "prune_volumes only takes effect with prune: true; set both to allow deleting volumes",
        )
    ]


def test_a_volume_grows_in_place_and_a_shrink_is_a_clear_error_in_the_plan(ready: World) -> None:
    applied(ready)
    grown = plan(ready, save(ready, DOC.replace("size_gib: 2", "size_gib: 5")).json()["id"]).json()
    assert steps_of(grown) == [("update", "volume/db-data", "size_gib changed")]
    op = apply_inline(ready, grown["id"])
    assert op.state == "succeeded", op.error
    volume = Volume.objects.get(name="db-data")
    assert (volume.size_bytes, volume.state) == (5 * GIB, "resizing")
    assert Quota.objects.get(tenant=ready.acme).used_volume_bytes == 5 * GIB
    host_made_volumes_ready()

    shrunk = save(ready, DOC.replace("size_gib: 2", "size_gib: 1")).json()
    response = plan(ready, shrunk["id"])
    assert response.status_code == 409, response.json()
    assert (
        "volume db-data cannot shrink from 5 GiB to 1 GiB: a volume only grows"
        in (response.json()["error"]["message"])
    )
    assert Volume.objects.get(name="db-data").size_bytes == 5 * GIB


def test_backup_schedules_follow_the_document(ready: World) -> None:
    applied(ready)
    weekly = DOC.replace("{every_hours: 24, keep_last: 3}", "{every_hours: 168, keep_last: 4}")
    planned = plan(ready, save(ready, weekly).json()["id"]).json()
    assert [(c["path"], c["after"]) for s in planned["plan"]["steps"] for c in s["changes"]] == [
        ("backups", {"every_hours": 168, "keep_last": 4})
    ]
    assert apply_inline(ready, planned["id"]).state == "succeeded"
    schedule = BackupSchedule.objects.get(volume__name="db-data")
    assert (schedule.every_hours, schedule.keep_last) == (168, 4)
    none = weekly.replace("      backups: {every_hours: 168, keep_last: 4}\n", "")
    assert apply_inline(ready, plan(ready, save(ready, none).json()["id"]).json()["id"]).state == "succeeded"
    assert not BackupSchedule.objects.exists()
    assert AuditEntry.objects.filter(action="backup.schedule.delete", tenant=ready.acme).exists()


def test_changing_a_running_workloads_volumes_stops_it_remounts_and_starts_it(ready: World) -> None:
    running = DOC.replace("      state: stopped\n", "")
    applied(ready, running.replace("state: stopped", ""))
    Workload.objects.filter(name="db").update(state="running")  # the host started it
    Operation.objects.update(state="succeeded")
    with_logs = running.replace(
        "  workloads:",
        "    - name: logs\n      size_gib: 1\n  workloads:",
    ).replace(
        "        - {volume: db-data, path: /var/lib/db}\n",
        DB_MOUNT + "        - {volume: logs, path: /srv/logs, read_only: true}\n",
    )
    apply_text(ready, with_logs)  # creates the volume; the workload waits for it
    host_made_volumes_ready()
    planned = plan(ready, save(ready, with_logs).json()["id"]).json()
    assert [(s["action"], s["key"], [c["path"] for c in s["changes"]]) for s in planned["plan"]["steps"]] == [
        ("noop", "volume/db-data", []),
        ("noop", "volume/logs", []),
        ("update", "workload/db", ["volumes"]),
    ]

    op = apply_inline(ready, planned["id"])

    # Attachments change only on a stopped workload: the apply stops it and waits for its host.
    assert op.state == "failed" and "workload/db: stopping it to change its volumes" in op.error
    db = Workload.objects.get(name="db")
    assert not db.desired_running
    assert Operation.objects.filter(kind="workload.stop", target_id=str(db.pk)).count() == 1
    assert VolumeAttachment.objects.filter(workload=db).count() == 1
    Workload.objects.filter(pk=db.pk).update(state="stopped")  # the host stopped it

    again = plan(ready, save(ready, with_logs).json()["id"]).json()
    op = apply_inline(ready, again["id"])
    assert op.state == "succeeded", op.error
    assert sorted(
        VolumeAttachment.objects.filter(workload=db).values_list("volume__name", "path", "read_only")
    ) == [("db-data", "/var/lib/db", False), ("logs", "/srv/logs", True)]
    assert Operation.objects.filter(kind="workload.start", target_id=str(db.pk)).exists()
    assert Workload.objects.get(pk=db.pk).desired_running
    assert AuditEntry.objects.filter(action="volume.attach", tenant=ready.acme, outcome="ok").count() == 2


# ------------------------------------------------------------------------------------------ drift


def test_drift_of_volumes_and_mounts_is_reported_and_corrected(ready: World) -> None:
    applied(ready)
    Operation.objects.update(state="succeeded")  # the host did its part
    services.set_mode(actor=Actor(user=ready.user("alice")), tenant=ready.acme, mode="monitor")
    VolumeAttachment.objects.all().delete()  # detached by hand
    BackupSchedule.objects.all().delete()
    reconciler.reconcile_tenant(ready.acme.pk)
    drifted = DesiredState.objects.get(tenant=ready.acme).condition("Drifted")
    assert drifted is not None and drifted["status"] == "True"
    assert drifted["message"] == "volume/db-data changed; workload/db changed"

    services.set_mode(actor=Actor(user=ready.user("alice")), tenant=ready.acme, mode="autocorrect")
    result = reconciler.reconcile_tenant(ready.acme.pk)
    assert sorted(c["key"] for c in result["corrected"]) == ["volume/db-data", "workload/db"]
    assert VolumeAttachment.objects.filter(volume__name="db-data", path="/var/lib/db").exists()
    assert BackupSchedule.objects.filter(volume__name="db-data", keep_last=3).exists()
    reconciler.reconcile_tenant(ready.acme.pk)
    assert DesiredState.objects.get(tenant=ready.acme).condition("Drifted")["status"] == "False"  # type: ignore[index]


def test_a_volume_deleted_by_hand_is_missing_and_autocorrect_makes_it_again(ready: World) -> None:
    applied(ready, DOC.replace("  workloads:\n", "  workloads: []\n").split("  workloads: []\n")[0])
    services.set_mode(actor=Actor(user=ready.user("alice")), tenant=ready.acme, mode="autocorrect")
    Volume.objects.all().delete()
    result = reconciler.reconcile_tenant(ready.acme.pk)
    assert result["drift"][0]["key"] == "volume/db-data" and result["drift"][0]["kind"] == "missing"
    volume = Volume.objects.get(name="db-data")
    assert (volume.state, volume.managed_revision, volume.size_bytes) == ("creating", 1, 2 * GIB)


# ------------------------------------------------------------------------------------------ hostile input


def test_a_volume_of_another_tenant_reads_exactly_like_a_missing_one(ready: World) -> None:
    other_host = Host.objects.get()
    Volume.objects.create(tenant=ready.globex, name="secrets", host=other_host, size_bytes=GIB, state="ready")
    mounting = DOC.replace("{volume: db-data, path: /var/lib/db}", "{volume: secrets, path: /var/lib/db}")
    theirs = issues(ready, mounting)
    nowhere = issues(ready, mounting.replace("secrets", "nosuch"))
    assert theirs == [
        ("spec.workloads[0].volumes[0].volume", 14, "unknown volume 'secrets': declare it under spec.volumes")
    ]
    assert [(p, line, m.replace("nosuch", "secrets")) for p, line, m in nowhere] == theirs
    # Declaring one of that name makes a volume of acme's own, never theirs.
    adopted = mounting.replace("name: db-data", "name: secrets")
    applied(ready, adopted)
    ours = Volume.objects.get(tenant=ready.acme, name="secrets")
    assert VolumeAttachment.objects.get().volume == ours
    assert Volume.objects.get(tenant=ready.globex).attachments.count() == 0


def test_bob_cannot_plan_against_acmes_volumes(ready: World) -> None:
    applied(ready)
    response = client_for(ready, "bob").post(
        "/api/v1/desired/revisions/",
        {"tenant": str(ready.acme.pk), "text": EMPTY.format(prune="true", volumes="true")},
        format="json",
    )
    assert response.status_code == 400 and response.json()["error"]["message"] == "No such tenant."
    assert Volume.objects.get(name="db-data").state == "ready"


@pytest.mark.parametrize(
    ("original", "replacement", "path", "message"),
    [
        ("name: db-data", "name: db-data;rm", "spec.volumes[0].name", "is not a DNS label"),
        ("name: db-data", "name: ../../etc", "spec.volumes[0].name", "is not a DNS label"),
        ("name: db-data", "name: DB", "spec.volumes[0].name", "is not a DNS label"),
        ("size_gib: 2", "size_gib: 0", "spec.volumes[0].size_gib", "must be at least 1"),
        ("size_gib: 2", "size_gib: 99999999", "spec.volumes[0].size_gib", "must be at most 16384"),
        ("size_gib: 2", 'size_gib: "2"', "spec.volumes[0].size_gib", "must be an integer"),
        ("size_gib: 2", "size_gib: 2\n      host_path: /", "spec.volumes[0].host_path", "unknown field"),
        ("size_gib: 2", "size_gib: 2\n      pool_name: vol-x", "spec.volumes[0].pool_name", "unknown field"),
        ("keep_last: 3}", "keep_last: 0}", "spec.volumes[0].backups.keep_last", "must be at least 1"),
        ("every_hours: 24", "every_hours: 24, cron: x", "spec.volumes[0].backups.cron", "unknown field"),
        ("path: /var/lib/db}", "path: /var/lib/db, rw: true}", "spec.workloads[0].volumes[0].rw", "unknown"),
        (
            "path: /var/lib/db}",
            "path: /etc}",
            "spec.workloads[0].volumes[0].path",
            "cannot be mounted at /etc",
        ),
        ("path: /var/lib/db}", "path: /data/../etc}", "spec.workloads[0].volumes[0].path", "normalised"),
        ("path: /var/lib/db}", "path: var/lib/db}", "spec.workloads[0].volumes[0].path", "absolute path"),
        ("path: /var/lib/db}", 'path: "/a:/b"}', "spec.workloads[0].volumes[0].path", "absolute path"),
        ("path: /var/lib/db}", 'path: "/a,rw"}', "spec.workloads[0].volumes[0].path", "absolute path"),
        ("path: /var/lib/db}", 'path: "/a\\nb"}', "spec.workloads[0].volumes[0].path", "absolute path"),
        ("path: /var/lib/db}", "path: /proc/1}", "spec.workloads[0].volumes[0].path", "cannot be mounted"),
        ("{volume: db-data,", "{volume: 'x;y',", "spec.workloads[0].volumes[0].volume", "is not a DNS label"),
    ],
)
def test_hostile_volumes_and_mounts_are_refused_with_path_and_nothing_is_stored(
    ready: World, original: str, replacement: str, path: str, message: str
) -> None:
    assert original in DOC
    found = issues(ready, DOC.replace(original, replacement, 1))
    assert any(p == path and message in m for p, _, m in found), found
    assert not Volume.objects.exists()


def test_a_volume_is_mounted_read_write_once_or_read_only_many_times(ready: World) -> None:
    second = DOC + (
        "    - name: reader\n      image: busybox:1\n      state: stopped\n"
        "      volumes: [{volume: db-data, path: /data, read_only: true}]\n"
    )
    assert issues(ready, second) == [
        (
            "spec.workloads[1].volumes[0].volume",
            18,
            "volume 'db-data' is mounted read-write by 'db'; a volume has one read-write workload or "
            "any number of read-only ones",
        )
    ]
    readers = second.replace(
        "{volume: db-data, path: /var/lib/db}", "{volume: db-data, path: /d, read_only: true}"
    )
    assert save(ready, readers).status_code == 201
    twice = DOC.replace(
        "        - {volume: db-data, path: /var/lib/db}\n",
        "        - {volume: db-data, path: /var/lib/db}\n        - {volume: db-data, path: /other}\n",
    )
    assert ("spec.workloads[0].volumes[1].volume", 15, "volume 'db-data' is mounted twice") in issues(
        ready, twice
    )


def test_volumes_over_the_quota_are_refused_at_their_line_and_nothing_is_created(ready: World) -> None:
    Quota.objects.filter(tenant=ready.acme).update(volume_bytes=3 * GIB)
    two = DOC.replace("  workloads:", "    - name: logs\n      size_gib: 2\n  workloads:")
    assert issues(ready, two) == [
        (
            "spec.volumes[1].size_gib",
            9,
            "over the tenant's volume quota: this document's new and grown volumes need 4 GiB up to here, "
            "3 GiB of 3 GiB are free; nothing is applied",
        )
    ]


def test_an_apply_whose_volumes_no_longer_fit_the_quota_applies_nothing(ready: World) -> None:
    with_web = DOC + "    - name: web\n      image: busybox:1\n      state: stopped\n"
    planned = plan(ready, save(ready, with_web).json()["id"]).json()
    assert changes(planned) == [
        ("create", "volume/db-data"),
        ("create", "workload/db"),
        ("create", "workload/web"),
    ]
    Quota.objects.filter(tenant=ready.acme).update(volume_bytes=1 * GIB)  # lowered by an operator meanwhile

    op = apply_inline(ready, planned["id"])

    assert op.state == "failed"
    assert "Over the tenant's volume quota: this plan's new and grown volumes need 2 GiB, 1 GiB of 1 GiB" in (
        op.error
    )
    assert not Volume.objects.exists() and not Workload.objects.exists()
    assert Quota.objects.get(tenant=ready.acme).used_volume_bytes == 0


# ------------------------------------------------------------------------------------------ pure planning


def resources(text: str) -> Any:
    return parse_document(text, known_volumes=["db-data"]).resources()


def test_the_planner_never_deletes_a_volume_without_both_flags() -> None:
    from compute.desired.planning import ObservedResource

    managed = ObservedResource("volume", "volume/db-data", {"name": "db-data", "size_gib": 2}, managed=True)
    by_hand = ObservedResource("volume", "volume/scratch", {"name": "scratch", "size_gib": 1})
    for prune, prune_volumes in ((False, False), (False, True), (True, False)):
        plan_ = compute_plan([], [managed, by_hand], prune, prune_volumes=prune_volumes)
        assert {s.action for s in plan_.steps if s.key == "volume/db-data"} == {"keep"}
        assert {s.action for s in plan_.steps if s.key == "volume/scratch"} == (
            {"keep"} if prune else {"noop"}
        )
        assert plan_.is_empty
    plan_ = compute_plan([], [managed, by_hand], True, prune_volumes=True)
    assert [(s.action, s.key) for s in plan_.changes] == [
        ("delete", "volume/db-data"),
        ("delete", "volume/scratch"),
    ]


def test_a_declared_workload_mounting_a_volume_the_plan_deletes_is_a_conflict() -> None:
    from compute.desired.document import DesiredResource
    from compute.desired.planning import ObservedResource

    # The document's own checks refuse this earlier; the planner refuses it too, whatever its input.
    db = DesiredResource.from_spec(
        "workload",
        {"name": "db", "networks": [], "volumes": [{"volume": "db-data", "path": "/d", "read_only": False}]},
    )
    volume = ObservedResource("volume", "volume/db-data", {"name": "db-data", "size_gib": 2})
    with pytest.raises(PlanConflict, match="workload/db mounts volume 'db-data', which the plan deletes"):
        compute_plan([db], [volume], True, prune_volumes=True)


def test_the_order_of_mounts_in_the_document_changes_nothing() -> None:
    logs = "        - {volume: logs, path: /a, read_only: true}\n"
    one = DOC.replace(DB_MOUNT, DB_MOUNT + logs).replace(
        "  workloads:", "    - name: logs\n      size_gib: 1\n  workloads:"
    )
    other = one.replace(DB_MOUNT + logs, logs + DB_MOUNT)
    assert one != other
    assert [r.spec_hash for r in resources(one)] == [r.spec_hash for r in resources(other)]


def test_a_workload_without_volumes_keeps_the_spec_it_had_before_volumes_existed() -> None:
    text = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec:\n  workloads:\n"
    text += "    - {name: web, image: busybox:1}\n"
    (web,) = resources(text)
    assert "volumes" not in web.spec
    with pytest.raises(DocumentError):
        parse_document(text.replace("{name: web,", "{name: web, volumes: [{volume: nope, path: /d}],"))


def test_a_volume_grown_by_hand_past_the_document_is_drift_and_degrades_autocorrect_with_why(
    ready: World,
) -> None:
    applied(ready)
    Operation.objects.update(state="succeeded")
    Volume.objects.filter(name="db-data").update(size_bytes=5 * GIB)  # grown through the API
    services.set_mode(actor=Actor(user=ready.user("alice")), tenant=ready.acme, mode="monitor")
    result = reconciler.reconcile_tenant(ready.acme.pk)
    assert [(d["key"], d["kind"], d["changes"]) for d in result["drift"]] == [
        ("volume/db-data", "changed", [{"path": "size_gib", "before": 5, "after": 2}])
    ]
    services.set_mode(actor=Actor(user=ready.user("alice")), tenant=ready.acme, mode="autocorrect")
    with pytest.raises(Exception, match="volume db-data cannot shrink from 5 GiB to 2 GiB"):
        reconciler.reconcile_tenant(ready.acme.pk)
    degraded = DesiredState.objects.get(tenant=ready.acme).condition("Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert "cannot shrink from 5 GiB to 2 GiB" in degraded["message"]
    assert Volume.objects.get(name="db-data").size_bytes == 5 * GIB


def test_a_refused_remount_changes_no_mount_and_its_denial_is_audited(ready: World) -> None:
    from tests.volumes.test_volumes_api import a_volume, a_workload

    applied(ready)
    host = Host.objects.get()
    shared = a_volume(ready, "shared", host)
    VolumeAttachment.objects.create(volume=shared, workload=a_workload(ready, "other", host), path="/d")
    # db would give up db-data for a volume that another workload writes to: the attach is refused.
    swapped = DOC.replace("{volume: db-data, path: /var/lib/db}", "{volume: shared, path: /var/lib/db}")
    planned = plan(ready, save(ready, swapped).json()["id"]).json()
    assert changes(planned) == [("update", "workload/db")]

    op = apply_inline(ready, planned["id"])

    assert op.state == "failed" and "The volume shared is attached read-write to other." in op.error
    db = Workload.objects.get(name="db")
    assert list(VolumeAttachment.objects.filter(workload=db).values_list("volume__name", "path")) == [
        ("db-data", "/var/lib/db")
    ]
    assert AuditEntry.objects.filter(action="volume.attach", outcome="denied", tenant=ready.acme).exists()
    assert not AuditEntry.objects.filter(action="volume.detach", tenant=ready.acme).exists()
