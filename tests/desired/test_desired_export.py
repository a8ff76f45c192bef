"""Export of the current resources as a document that parses back to the same resources."""

from __future__ import annotations

import yaml
from desired_samples import EXAMPLE, desired, observed_after_apply, parse

from compute.desired.document import export_document
from compute.desired.planning import ObservedResource, compare_specs, compute_plan


def unmanaged(observed: list[ObservedResource]) -> list[ObservedResource]:
    return [ObservedResource(o.kind, o.key, o.spec) for o in observed]


def test_it_exports_a_document_that_parses_back_to_the_observed_fields() -> None:
    observed = observed_after_apply(desired())
    exported = parse(export_document(observed, name="acme"))
    resources = {resource.key: resource for resource in exported.resources()}
    assert set(resources) == {o.key for o in observed}
    for resource in observed:
        assert compare_specs(resource.kind, resources[resource.key].spec, resource.spec) == []
    assert exported.name == "acme"


def test_it_pins_assigned_subnets_and_host_ports() -> None:
    exported = parse(export_document(observed_after_apply(desired())))
    assert {network.name: network.subnet for network in exported.networks}["frontend"] == "10.200.0.0/24"
    assert {port.port: port.host_port for port in exported.ports}[443] == 30000


def test_it_lets_a_tenant_adopt_what_exists_and_then_plans_nothing() -> None:
    existing = unmanaged(observed_after_apply(desired()))
    adopted = parse(export_document(existing)).resources()
    plan = compute_plan(adopted, existing, prune=True)
    assert {step.action for step in plan.steps} == {"update"}
    assert all(step.reason.startswith("adopt") and step.changes == () for step in plan.steps)
    assert compute_plan(adopted, observed_after_apply(adopted), prune=True).is_empty


def test_it_exports_the_same_text_whatever_the_order_of_resources() -> None:
    observed = observed_after_apply(desired())
    assert export_document(observed) == export_document(list(reversed(observed)))


def test_it_writes_no_anchors_even_when_values_are_shared_objects() -> None:
    shared_env = {"A": "1"}
    observed = [
        ObservedResource(
            "workload",
            f"workload/w{n}",
            {**desired()[3].spec, "name": f"w{n}", "env": shared_env, "networks": []},
        )
        for n in range(2)
    ]
    text = export_document(observed)
    assert "&" not in text and "*" not in text
    assert [w.env for w in parse(text).workloads] == [{"A": "1"}, {"A": "1"}]


def test_it_quotes_strings_that_yaml_would_read_as_numbers_or_booleans() -> None:
    observed = [
        ObservedResource(
            "workload",
            "workload/w",
            {
                **desired()[3].spec,
                "name": "w",
                "user": "1000",
                "env": {"FLAG": "yes", "N": "010"},
                "networks": [],
            },
        )
    ]
    workload = parse(export_document(observed)).workloads[0]
    assert (workload.user, dict(workload.env)) == ("1000", {"FLAG": "yes", "N": "010"})


def test_it_round_trips_the_example_document_through_export() -> None:
    first = parse(EXAMPLE)
    again = parse(export_document(observed_after_apply(first.resources())))
    assert [w.to_spec() for w in again.workloads] == sorted(
        (w.to_spec() for w in first.workloads), key=lambda spec: spec["name"]
    )
    assert yaml.safe_load(export_document([]))["spec"] == {"prune": False}


def test_it_round_trips_awkward_strings_in_one_line_lists() -> None:
    awkward = ["a, b", "[x]", "#c", "", "yes", "{k: v}", "- dash", "'q'", "1e3", "~"]
    observed = [
        ObservedResource(
            "workload", "workload/w", {**desired()[3].spec, "name": "w", "args": awkward, "networks": []}
        )
    ]
    assert parse(export_document(observed)).workloads[0].args == tuple(awkward)
