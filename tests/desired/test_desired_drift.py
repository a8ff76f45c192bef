"""Drift: managed resources compared with what the applied revision declared."""

from __future__ import annotations

from desired_samples import desired, observed_after_apply, with_spec

from compute.desired.planning import DriftItem, FieldChange, ObservedResource, detect_drift


def test_it_finds_no_drift_right_after_apply() -> None:
    assert detect_drift(desired(), observed_after_apply(desired())) == []


def test_it_does_not_count_system_filled_values_as_drift() -> None:
    observed = observed_after_apply(desired())
    refilled = [
        with_spec(o, subnet="10.201.7.0/24")
        if o.key == "network/frontend"
        else with_spec(o, host_port=31999)
        if o.key == "port/web/443/tcp"
        else with_spec(o, id="new-id", addresses=["10.42.0.99"], started_at="later")
        for o in observed
    ]
    assert detect_drift(desired(), refilled) == []


def test_it_reports_a_missing_resource() -> None:
    observed = [o for o in observed_after_apply(desired()) if o.key != "workload/db"]
    assert detect_drift(desired(), observed) == [DriftItem("workload/db", "missing", (), "workload")]


def test_it_reports_a_changed_field() -> None:
    observed = [
        with_spec(o, memory_mib=64) if o.key == "workload/db" else o for o in observed_after_apply(desired())
    ]
    assert detect_drift(desired(), observed) == [
        DriftItem("workload/db", "changed", (FieldChange("memory_mib", 64, 1024),), "workload")
    ]


def test_it_reports_a_declared_subnet_that_changed() -> None:
    observed = [
        with_spec(o, subnet="10.99.0.0/24") if o.key == "network/backend" else o
        for o in observed_after_apply(desired())
    ]
    assert [item.kind for item in detect_drift(desired(), observed)] == ["changed"]


def test_it_reports_a_stopped_workload_declared_running() -> None:
    observed = [
        with_spec(o, state="stopped") if o.key == "workload/web" else o
        for o in observed_after_apply(desired())
    ]
    [item] = detect_drift(desired(), observed)
    assert (item.key, item.kind) == ("workload/web", "stopped")


def test_it_reports_a_run_state_change_together_with_other_changes_as_changed() -> None:
    observed = [
        with_spec(o, state="stopped", vcpus=8) if o.key == "workload/web" else o
        for o in observed_after_apply(desired())
    ]
    [item] = detect_drift(desired(), observed)
    assert item.kind == "changed"
    assert {change.path for change in item.changes} == {"vcpus", "state"}


def test_it_reports_a_managed_resource_the_revision_no_longer_declares() -> None:
    leftover = ObservedResource(
        "network", "network/old", {"name": "old", "subnet": None, "nat": True}, managed=True
    )
    assert detect_drift(desired(), [*observed_after_apply(desired()), leftover]) == [
        DriftItem("network/old", "orphaned", (), "network")
    ]


def test_it_never_reports_unmanaged_resources() -> None:
    hand_made = ObservedResource("workload", "workload/tool", {"name": "tool", "memory_mib": 5})
    assert detect_drift(desired(), [*observed_after_apply(desired()), hand_made]) == []


def test_it_sorts_drift_by_kind_then_key() -> None:
    observed = [
        o for o in observed_after_apply(desired()) if o.kind != "network" and o.key != "port/web/80/tcp"
    ]
    assert [item.key for item in detect_drift(desired(), observed)] == [
        "network/backend",
        "network/frontend",
        "port/web/80/tcp",
    ]
    assert detect_drift(desired(), observed)[0].to_dict() == {
        "key": "network/backend",
        "kind": "missing",
        "resource_kind": "network",
        "changes": [],
    }
