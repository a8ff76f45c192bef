"""Plans: create/update/replace/delete/noop, ordering, determinism, prune, fingerprints, storage."""

from __future__ import annotations

import json
import random

import pytest
from desired_samples import EXAMPLE, by_key, desired, observed_after_apply, with_spec

from compute.desired.document import DesiredResource, diff_documents
from compute.desired.planning import (
    FieldChange,
    ObservedResource,
    Plan,
    PlanConflict,
    PlanStep,
    StalePlanError,
    compute_plan,
    ensure_plan_is_current,
    observed_fingerprint,
    observed_run_state,
    structural_diff,
)


def actions(plan: Plan) -> dict[str, str]:
    return {step.key: step.action for step in plan.steps}


def step_of(plan: Plan, key: str) -> PlanStep:
    return next(step for step in plan.steps if step.key == key)


def plan_after_change(**changes: object) -> Plan:
    """Plan the example against its applied state with some of workload/web's observed fields changed."""
    observed = observed_after_apply(desired())
    observed = [with_spec(o, **changes) if o.key == "workload/web" else o for o in observed]
    return compute_plan(desired(), observed, prune=False)


# --- creating and applying twice ------------------------------------------------------------------------


def test_it_creates_everything_when_nothing_exists() -> None:
    plan = compute_plan(desired(), [], prune=False)
    assert [(step.action, step.key) for step in plan.steps] == [
        ("create", "network/backend"),
        ("create", "network/frontend"),
        ("create", "workload/db"),
        ("create", "workload/web"),
        ("create", "port/web/443/tcp"),
        ("create", "port/web/80/tcp"),
    ]
    assert not plan.is_empty


def test_it_carries_the_desired_spec_so_apply_needs_only_the_plan() -> None:
    resources = {resource.key: resource for resource in desired()}
    step = step_of(compute_plan(desired(), [], prune=False), "workload/web")
    assert step.spec == resources["workload/web"].spec
    assert step.spec_hash == resources["workload/web"].spec_hash
    assert FieldChange("memory_mib", None, 256) in step.changes


def test_it_plans_nothing_after_apply() -> None:
    plan = compute_plan(desired(), observed_after_apply(desired()), prune=False)
    assert plan.is_empty
    assert set(actions(plan).values()) == {"noop"}
    assert plan.changes == ()


def test_it_plans_nothing_after_apply_even_with_prune() -> None:
    assert compute_plan(desired(), observed_after_apply(desired()), prune=True).is_empty


def test_it_does_not_treat_assigned_subnets_and_host_ports_as_changes() -> None:
    observed = by_key(observed_after_apply(desired()))
    assert observed["network/frontend"].spec["subnet"] == "10.200.0.0/24"
    assert observed["port/web/443/tcp"].spec["host_port"] == 30000
    assert compute_plan(desired(), list(observed.values()), prune=False).is_empty


# --- determinism ----------------------------------------------------------------------------------------


def test_it_gives_the_same_plan_whatever_the_order_of_its_inputs() -> None:
    wanted = desired(EXAMPLE.replace("memory_mib: 256", "memory_mib: 512"))
    observed = observed_after_apply(desired())[1:]
    reference = compute_plan(wanted, observed, prune=False).to_dict()
    shuffler = random.Random(7)
    for _ in range(20):
        shuffled_observed = shuffler.sample(observed, len(observed))
        shuffled_desired = shuffler.sample(wanted, len(wanted))
        assert compute_plan(shuffled_desired, shuffled_observed, prune=False).to_dict() == reference


def test_it_sorts_steps_by_key_within_a_kind() -> None:
    keys = [step.key for step in compute_plan(desired(), observed_after_apply(desired()), False).steps]
    assert keys == [
        "network/backend",
        "network/frontend",
        "workload/db",
        "workload/web",
        "port/web/443/tcp",
        "port/web/80/tcp",
    ]


# --- update in place or replace -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "observed_value"),
    [
        ("vcpus", 4),
        ("memory_mib", 128),
        ("restart", "never"),
        ("state", "stopped"),
        ("command", None),
        ("args", ["--debug"]),
        ("workdir", "/srv"),
        ("user", "root"),
    ],
)
def test_it_updates_process_settings_and_limits_in_place(field: str, observed_value: object) -> None:
    step = step_of(plan_after_change(**{field: observed_value}), "workload/web")
    assert step.action == "update"
    assert [change.path for change in step.changes] == [field]
    assert step.changes[0].before == observed_value


def test_it_lists_environment_changes_variable_by_variable() -> None:
    step = step_of(plan_after_change(env={"KEY": "old", "GONE": "x", "OTHER": "2"}), "workload/web")
    assert step.action == "update"
    assert step.changes == (
        FieldChange("env.GONE", "x", None),
        FieldChange("env.KEY", "old", "value"),
    )


@pytest.mark.parametrize(
    ("field", "observed_value"),
    [
        ("image_id", "img-nginx-126"),
        ("isolation", "microvm"),
        ("networks", ["backend", "frontend"]),
    ],
)
def test_it_replaces_a_workload_for_a_new_root_or_runtime_or_interfaces(
    field: str, observed_value: object
) -> None:
    step = step_of(plan_after_change(**{field: observed_value}), "workload/web")
    assert step.action == "replace"
    assert field in step.reason


def test_it_replaces_a_workload_whose_image_reference_points_elsewhere() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("library/nginx:1.27", "library/nginx:1.28")),
        observed_after_apply(desired()),
        prune=False,
    )
    step = step_of(plan, "workload/web")
    assert step.action == "replace"
    assert FieldChange("image_id", "img-nginx-127", "img-nginx-128") in step.changes


def test_it_only_updates_when_a_new_reference_names_the_same_image() -> None:
    by_digest = EXAMPLE.replace("library/nginx:1.27", "library/nginx@sha256:" + "a" * 64)
    step = step_of(
        compute_plan(desired(by_digest), observed_after_apply(desired()), prune=False), "workload/web"
    )
    assert step.action == "update"
    assert [change.path for change in step.changes] == ["image"]


def test_it_replaces_a_network_whose_subnet_or_nat_changes() -> None:
    for changed in (
        EXAMPLE.replace("10.42.0.0/24", "10.43.0.0/24"),
        EXAMPLE.replace("nat: true", "nat: false"),
    ):
        plan = compute_plan(desired(changed), observed_after_apply(desired()), prune=False)
        assert step_of(plan, "network/backend").action == "replace"


def test_it_replaces_a_port_whose_declared_host_port_changes() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("host_port: 8080", "host_port: 8081")), observed_after_apply(desired()), False
    )
    step = step_of(plan, "port/web/80/tcp")
    assert (step.action, step.changes) == ("replace", (FieldChange("host_port", 8080, 8081),))


def test_it_replaces_what_hangs_off_a_replaced_resource() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("10.42.0.0/24", "10.43.0.0/24")), observed_after_apply(desired()), False
    )
    assert actions(plan) == {
        "network/backend": "replace",
        "network/frontend": "noop",
        "workload/db": "replace",
        "workload/web": "replace",
        "port/web/443/tcp": "replace",
        "port/web/80/tcp": "replace",
    }
    assert step_of(plan, "workload/db").reason == "network 'backend' is replaced"
    assert step_of(plan, "port/web/80/tcp").spec is not None


def test_it_reverts_an_override_removed_from_the_document() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("      workdir: /app\n", "")), observed_after_apply(desired()), prune=False
    )
    assert step_of(plan, "workload/web").changes == (FieldChange("workdir", "/app", None),)


def test_it_restarts_a_failed_workload_declared_running() -> None:
    step = step_of(plan_after_change(state=observed_run_state("failed")), "workload/web")
    assert (step.action, step.changes) == ("update", (FieldChange("state", "stopped", "running"),))


def test_it_does_not_compare_a_run_state_it_cannot_know() -> None:
    assert observed_run_state("unknown") is None
    assert plan_after_change(state=observed_run_state("unknown")).is_empty
    assert observed_run_state("creating") == "running"


def test_it_ignores_fields_outside_the_document() -> None:
    assert plan_after_change(id="other", addresses=[], host="h2", started_at="2025").is_empty


def test_it_tells_a_number_from_a_boolean() -> None:
    observed = [
        with_spec(o, nat=1) if o.key == "network/backend" else o for o in observed_after_apply(desired())
    ]
    assert step_of(compute_plan(desired(), observed, False), "network/backend").action == "replace"


# --- managed state, adoption, deletes and prune ---------------------------------------------------------


def test_it_adopts_a_declared_resource_that_exists_unmanaged() -> None:
    unmanaged = [
        ObservedResource(o.kind, o.key, o.spec, managed=False) if o.key == "workload/db" else o
        for o in observed_after_apply(desired())
    ]
    plan = compute_plan(desired(), unmanaged, prune=False)
    step = step_of(plan, "workload/db")
    assert (step.action, step.changes) == ("update", ())
    assert step.reason.startswith("adopt")
    assert [s.key for s in plan.changes] == ["workload/db"]


def test_it_records_a_new_spec_hash_when_only_assigned_fields_left_the_document() -> None:
    applied = observed_after_apply(desired())
    pinned_port_removed = desired(EXAMPLE.replace("      host_port: 8080\n", ""))
    plan = compute_plan(pinned_port_removed, applied, prune=False)
    step = step_of(plan, "port/web/80/tcp")
    assert (step.action, step.changes) == ("update", ())
    assert compute_plan(pinned_port_removed, observed_after_apply(pinned_port_removed), False).is_empty


def test_it_deletes_managed_resources_the_document_dropped_dependents_first() -> None:
    without_web = (
        EXAMPLE.split("    - name: web\n")[0] + EXAMPLE.split("      networks: [frontend, backend]\n")[1]
    )
    without_web = without_web.split("  ports:\n")[0]
    plan = compute_plan(desired(without_web), observed_after_apply(desired()), prune=False)
    assert [(step.action, step.key) for step in plan.changes] == [
        ("delete", "port/web/443/tcp"),
        ("delete", "port/web/80/tcp"),
        ("delete", "workload/web"),
    ]


def test_it_puts_deletes_before_creates_so_freed_host_ports_can_be_reused() -> None:
    moved = EXAMPLE.replace("    - workload: web\n      port: 80\n", "    - workload: db\n      port: 5432\n")
    plan = compute_plan(desired(moved), observed_after_apply(desired()), prune=False)
    assert [(step.action, step.key) for step in plan.changes] == [
        ("delete", "port/web/80/tcp"),
        ("create", "port/db/5432/tcp"),
    ]


def test_it_leaves_unmanaged_resources_alone_without_prune() -> None:
    hand_made = ObservedResource(
        "network", "network/lab", {"name": "lab", "subnet": "10.9.0.0/24", "nat": False}
    )
    plan = compute_plan(desired(), [*observed_after_apply(desired()), hand_made], prune=False)
    assert plan.is_empty
    assert step_of(plan, "network/lab").reason == "unmanaged, not in the document (prune is off)"


def test_it_deletes_unmanaged_resources_with_prune() -> None:
    hand_made = ObservedResource(
        "network", "network/lab", {"name": "lab", "subnet": "10.9.0.0/24", "nat": False}
    )
    plan = compute_plan(desired(), [*observed_after_apply(desired()), hand_made], prune=True)
    assert [(step.action, step.key) for step in plan.changes] == [("delete", "network/lab")]
    assert plan.changes[0].reason.startswith("prune")


def test_it_deletes_an_unmanaged_port_whose_workload_goes_away() -> None:
    without_db = EXAMPLE.split("    - name: db\n")[0] + "  ports:\n" + EXAMPLE.split("  ports:\n")[1]
    hand_port = ObservedResource(
        "port", "port/db/5432/tcp", {"workload": "db", "port": 5432, "protocol": "tcp", "host_port": 25432}
    )
    plan = compute_plan(desired(without_db), [*observed_after_apply(desired()), hand_port], prune=False)
    assert [(step.action, step.key) for step in plan.changes] == [
        ("delete", "port/db/5432/tcp"),
        ("delete", "workload/db"),
    ]
    assert plan.changes[0].reason == "its workload 'db' is deleted"


def test_it_refuses_to_delete_a_network_an_unmanaged_workload_still_uses() -> None:
    without_frontend = EXAMPLE.replace("    - name: frontend\n", "").replace(
        "[frontend, backend]", "[backend]"
    )
    hand_made = ObservedResource("workload", "workload/tool", {"name": "tool", "networks": ["frontend"]})
    with pytest.raises(PlanConflict, match="unmanaged workload/tool is attached to network 'frontend'"):
        compute_plan(desired(without_frontend), [*observed_after_apply(desired()), hand_made], prune=False)


def test_it_refuses_a_workload_on_a_network_that_neither_exists_nor_is_declared() -> None:
    orphan = DesiredResource.from_spec(
        "workload", {**desired()[3].spec, "name": "lonely", "networks": ["nowhere"]}
    )
    with pytest.raises(PlanConflict, match="workload/lonely attaches to network 'nowhere'"):
        compute_plan([*desired(), orphan], [], prune=False)


def test_it_accepts_a_workload_on_an_existing_unmanaged_network() -> None:
    lab = ObservedResource("network", "network/lab", {"name": "lab", "subnet": "10.9.0.0/24", "nat": False})
    on_lab = DesiredResource.from_spec(
        "workload", {**desired()[3].spec, "name": "probe", "networks": ["lab"]}
    )
    plan = compute_plan([*desired(), on_lab], [lab], prune=False)
    assert step_of(plan, "workload/probe").action == "create"


def test_it_refuses_resources_listed_twice() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        compute_plan([*desired(), desired()[0]], [], prune=False)


# --- storage and staleness ------------------------------------------------------------------------------


def test_it_round_trips_a_plan_through_json() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("10.42.0.0/24", "10.43.0.0/24")), observed_after_apply(desired()), True
    )
    stored = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(stored) == plan
    assert stored["summary"] == {"create": 0, "update": 0, "replace": 5, "delete": 0, "keep": 0, "noop": 1}


def test_it_refuses_a_stored_plan_of_another_format() -> None:
    stored = compute_plan(desired(), [], False).to_dict()
    with pytest.raises(ValueError, match="unsupported plan format"):
        Plan.from_dict({**stored, "format": 99})
    stored["steps"][0]["action"] = "explode"
    with pytest.raises(ValueError, match="unknown plan action"):
        Plan.from_dict(stored)


def test_it_changes_the_fingerprint_when_the_observed_state_changes() -> None:
    observed = observed_after_apply(desired())
    plan = compute_plan(desired(), observed, prune=False)
    assert not plan.is_stale(observed)
    changed = [with_spec(o, memory_mib=999) if o.key == "workload/db" else o for o in observed]
    assert plan.is_stale(changed)
    assert plan.is_stale(observed[:-1])
    with pytest.raises(StalePlanError):
        ensure_plan_is_current(plan, changed)


def test_it_keeps_the_fingerprint_when_only_status_or_bookkeeping_changes() -> None:
    observed = observed_after_apply(desired())
    touched = [
        ObservedResource(
            o.kind,
            o.key,
            {**o.spec, "addresses": ["10.1.1.1"]},
            o.managed,
            7,
            o.managed_spec_hash,
            {"heartbeat": "now"},
        )
        for o in reversed(observed)
    ]
    assert observed_fingerprint(touched) == observed_fingerprint(observed)
    ensure_plan_is_current(compute_plan(desired(), observed, False), touched)


def test_it_changes_the_fingerprint_when_a_resource_is_adopted() -> None:
    observed = observed_after_apply(desired())
    unmanaged = [ObservedResource(o.kind, o.key, o.spec) for o in observed]
    assert observed_fingerprint(unmanaged) != observed_fingerprint(observed)


# --- revisions ------------------------------------------------------------------------------------------


def test_it_diffs_two_revisions_as_text() -> None:
    diff = diff_documents(
        EXAMPLE,
        EXAMPLE.replace("memory_mib: 1024", "memory_mib: 2048"),
        old_label="revision 1",
        new_label="revision 2",
    )
    assert diff.splitlines()[:2] == ["--- revision 1", "+++ revision 2"]
    assert "-      memory_mib: 1024" in diff.splitlines()
    assert "+      memory_mib: 2048" in diff.splitlines()
    assert diff_documents(EXAMPLE, EXAMPLE) == ""


def test_it_diffs_two_revisions_resource_by_resource() -> None:
    new = EXAMPLE.replace("memory_mib: 1024", "memory_mib: 2048").replace("    - name: frontend\n", "")
    new = new.replace("[frontend, backend]", "[backend]")
    steps = structural_diff(desired(), desired(new))
    assert [(step.action, step.key) for step in steps] == [
        ("delete", "network/frontend"),
        ("update", "workload/db"),
        ("replace", "workload/web"),
        ("replace", "port/web/443/tcp"),
        ("replace", "port/web/80/tcp"),
    ]


def test_it_splits_a_plan_into_teardown_then_build_passes() -> None:
    plan = compute_plan(
        desired(EXAMPLE.replace("10.42.0.0/24", "10.43.0.0/24")), observed_after_apply(desired()), False
    )
    assert [s.key for s in plan.teardown_steps()] == [
        "port/web/443/tcp",
        "port/web/80/tcp",
        "workload/db",
        "workload/web",
        "network/backend",
    ]
    assert [s.key for s in plan.build_steps()] == [
        "network/backend",
        "workload/db",
        "workload/web",
        "port/web/443/tcp",
        "port/web/80/tcp",
    ]
