"""A workload's disk size in the desired state: declared, planned as a replacement, hashes unchanged."""

from __future__ import annotations

import pytest
from desired_samples import EXAMPLE, desired, observed_after_apply, with_spec

from compute.desired.document import DocumentError
from compute.desired.planning import compute_plan

WITH_DISK = EXAMPLE.replace("      memory_mib: 1024\n", "      memory_mib: 1024\n      disk_gib: 20\n")


def spec_of(resources: list, key: str) -> dict:
    return next(resource for resource in resources if resource.key == key).spec


def test_it_reads_the_declared_disk_size() -> None:
    assert spec_of(desired(WITH_DISK), "workload/db")["disk_gib"] == 20


def test_it_keeps_the_spec_and_hash_of_a_workload_with_the_default_disk() -> None:
    explicit = EXAMPLE.replace("      memory_mib: 1024\n", "      memory_mib: 1024\n      disk_gib: 1\n")
    before = {resource.key: resource.spec_hash for resource in desired()}
    after = {resource.key: resource.spec_hash for resource in desired(explicit)}

    assert before == after
    assert "disk_gib" not in spec_of(desired(), "workload/db")


def test_it_replaces_a_workload_whose_disk_size_changes() -> None:
    observed = [
        with_spec(o, disk_gib=5) if o.key == "workload/db" else o
        for o in observed_after_apply(desired(WITH_DISK))
    ]

    step = next(
        s for s in compute_plan(desired(WITH_DISK), observed, prune=False).steps if s.key == "workload/db"
    )

    assert step.action == "replace"
    assert "disk_gib" in step.reason


def test_it_plans_nothing_after_applying_a_disk_size() -> None:
    plan = compute_plan(desired(WITH_DISK), observed_after_apply(desired(WITH_DISK)), prune=False)

    assert plan.is_empty


@pytest.mark.parametrize("value", ["0", "-3", "100000", '"big"'])
def test_it_refuses_a_disk_size_out_of_range(value: str) -> None:
    with pytest.raises(DocumentError):
        desired(
            EXAMPLE.replace("      memory_mib: 1024\n", f"      memory_mib: 1024\n      disk_gib: {value}\n")
        )
