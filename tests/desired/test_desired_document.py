"""Parsing, validation (path + line) and normalisation of the desired-state document."""

from __future__ import annotations

import pytest
from desired_samples import EXAMPLE, parse

from compute.desired.document import (
    DocumentError,
    ValidationIssue,
    canonical_json,
    parse_document,
    spec_hash,
)


def issues_of(text: str, **options: object) -> list[ValidationIssue]:
    with pytest.raises(DocumentError) as raised:
        parse(text, **options)
    return raised.value.issues


def only_issue(text: str, **options: object) -> ValidationIssue:
    issues = issues_of(text, **options)
    assert len(issues) == 1, issues
    return issues[0]


# --- valid documents ------------------------------------------------------------------------------------


def test_it_parses_the_example_document() -> None:
    config = parse()
    assert config.name == "acme"
    assert [network.name for network in config.networks] == ["backend", "frontend"]
    assert [workload.name for workload in config.workloads] == ["web", "db"]
    assert [(port.workload, port.port, port.host_port) for port in config.ports] == [
        ("web", 80, 8080),
        ("web", 443, None),
    ]


def test_it_orders_resources_networks_then_workloads_then_ports() -> None:
    keys = [resource.key for resource in parse().resources()]
    assert keys == [
        "network/backend",
        "network/frontend",
        "workload/web",
        "workload/db",
        "port/web/80/tcp",
        "port/web/443/tcp",
    ]


def test_it_fills_defaults_in_the_normalised_spec() -> None:
    resources = {resource.key: resource for resource in parse().resources()}
    assert resources["network/frontend"].spec == {"name": "frontend", "subnet": None, "nat": True}
    assert resources["workload/db"].spec == {
        "name": "db",
        "image": "library/postgres:16",
        "image_id": "img-postgres-16",
        "isolation": "microvm",
        "command": None,
        "args": None,
        "env": {},
        "workdir": None,
        "user": None,
        "vcpus": 2,
        "memory_mib": 1024,
        "restart": "on-failure",
        "state": "running",
        "networks": ["backend"],
    }
    assert resources["port/web/443/tcp"].spec == {
        "workload": "web",
        "port": 443,
        "protocol": "tcp",
        "host_port": None,
    }


def test_it_hashes_the_canonical_json_of_the_spec() -> None:
    for resource in parse().resources():
        assert resource.spec_hash == spec_hash(resource.spec)
        assert len(resource.spec_hash) == 64
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


def test_it_gives_the_same_hash_whatever_the_field_and_env_order() -> None:
    reordered = EXAMPLE.replace('env: {KEY: value, OTHER: "2"}', 'env: {OTHER: "2", KEY: value}').replace(
        "      vcpus: 1\n      memory_mib: 256\n", "      memory_mib: 256\n      vcpus: 1.0\n"
    )
    assert [r.spec_hash for r in parse(reordered).resources()] == [r.spec_hash for r in parse().resources()]


def test_it_gives_a_different_hash_when_a_declared_field_changes() -> None:
    changed = EXAMPLE.replace("memory_mib: 256", "memory_mib: 512")
    before = {r.key: r.spec_hash for r in parse().resources()}
    after = {r.key: r.spec_hash for r in parse(changed).resources()}
    assert [key for key in before if before[key] != after[key]] == ["workload/web"]


def test_it_records_where_each_resource_is_declared() -> None:
    lines = {resource.key: resource.line for resource in parse().resources()}
    assert lines == {
        "network/backend": 7,
        "network/frontend": 10,
        "workload/web": 12,
        "workload/db": 25,
        "port/web/80/tcp": 32,
        "port/web/443/tcp": 36,
    }


def test_it_accepts_a_minimal_document() -> None:
    config = parse("apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: {}\n")
    assert config.resources() == []
    assert config.prune is False


def test_it_accepts_an_image_by_digest() -> None:
    text = EXAMPLE.replace("library/nginx:1.27", "library/nginx@sha256:" + "a" * 64)
    web = parse(text).workloads[0]
    assert web.image_id == "img-nginx-127"


def test_it_leaves_image_ids_unresolved_without_a_resolver() -> None:
    config = parse_document(EXAMPLE)
    assert {workload.image_id for workload in config.workloads} == {None}


def test_it_resolves_each_image_reference_once() -> None:
    text = EXAMPLE.replace("library/postgres:16", "library/nginx:1.27")
    calls: list[str] = []

    def counting_resolver(reference: str) -> str:
        calls.append(reference)
        return "img-1"

    parse_document(text, counting_resolver)
    assert calls == ["library/nginx:1.27"]


# --- schema issues: path and line -----------------------------------------------------------------------


def test_it_rejects_an_unknown_workload_field_with_its_path_and_line() -> None:
    issue = only_issue(
        EXAMPLE.replace("      isolation: microvm\n", "      isolation: microvm\n      gpu: 1\n")
    )
    assert (issue.path, issue.line) == ("spec.workloads[1].gpu", 28)
    assert "unknown field 'gpu'" in issue.message


def test_it_suggests_the_closest_field_name() -> None:
    issue = only_issue(EXAMPLE.replace("memory_mib: 1024", "memory: 1024"))
    assert (issue.path, issue.line) == ("spec.workloads[1].memory", 29)
    assert "did you mean 'memory_mib'?" in issue.message


@pytest.mark.parametrize(
    ("original", "replacement", "path", "line"),
    [
        ("kind: TenantConfig\n", "kind: TenantConfig\nstatus: {}\n", "status", 3),
        ("  prune: false\n", "  prune: false\n  secrets: []\n", "spec.secrets", 6),
        ("      nat: true\n", "      nat: true\n      mtu: 9000\n", "spec.networks[0].mtu", 10),
        (
            "      host_port: 8080\n",
            "      host_port: 8080\n      hostIP: 0.0.0.0\n",
            "spec.ports[0].hostIP",
            36,
        ),
        ("metadata: {name: acme}", "metadata: {name: acme, labels: {}}", "metadata.labels", 3),
    ],
)
def test_it_rejects_unknown_fields_everywhere(original: str, replacement: str, path: str, line: int) -> None:
    issue = only_issue(EXAMPLE.replace(original, replacement))
    assert (issue.path, issue.line) == (path, line)
    assert issue.message.startswith("unknown field")


def test_it_reports_a_missing_required_field_at_its_parents_line() -> None:
    issue = only_issue(EXAMPLE.replace("      image: library/postgres:16\n", ""))
    assert (issue.path, issue.line, issue.message) == (
        "spec.workloads[1].image",
        25,
        "required field is missing",
    )


def test_it_reports_a_value_out_of_range() -> None:
    issue = only_issue(EXAMPLE.replace("memory_mib: 1024", "memory_mib: 8"))
    assert (issue.path, issue.line) == ("spec.workloads[1].memory_mib", 29)
    assert issue.message == "must be at least 16, not 8"


def test_it_reports_a_bad_dns_label_in_words() -> None:
    issue = only_issue(EXAMPLE.replace("- name: db", "- name: DB_1"))
    assert (issue.path, issue.line) == ("spec.workloads[1].name", 25)
    assert "is not a DNS label" in issue.message


def test_it_reports_a_value_outside_an_enum() -> None:
    issue = only_issue(EXAMPLE.replace("restart: always", "restart: sometimes"))
    assert (issue.path, issue.line) == ("spec.workloads[0].restart", 22)
    assert issue.message == "must be one of never, on-failure, always, not the string 'sometimes'"


def test_it_asks_to_quote_a_number_where_a_string_is_expected() -> None:
    issue = only_issue(EXAMPLE.replace('user: "1000:1000"', "user: 1000"))
    assert (issue.path, issue.line) == ("spec.workloads[0].user", 19)
    assert issue.message == "must be a string, not the number 1000 (quote it)"


def test_it_reports_an_invalid_environment_variable_name() -> None:
    issue = only_issue(EXAMPLE.replace("KEY: value", "1KEY: value"))
    assert (issue.path, issue.line) == ('spec.workloads[0].env["1KEY"]', 17)
    assert "environment variable name" in issue.message


def test_it_rejects_a_wrong_api_version() -> None:
    issue = only_issue(EXAMPLE.replace("bulkhead/v1", "bulkhead/v2"))
    assert (issue.path, issue.line) == ("apiVersion", 1)


def test_it_reports_every_schema_issue_at_once_sorted_by_line() -> None:
    text = EXAMPLE.replace("memory_mib: 1024", "memory_mib: -1").replace("port: 443", "port: 70000")
    text = text.replace("nat: true", "nat: maybe")
    issues = issues_of(text)
    assert [(issue.path, issue.line) for issue in issues] == [
        ("spec.networks[0].nat", 9),
        ("spec.workloads[1].memory_mib", 29),
        ("spec.ports[1].port", 37),
    ]


def test_it_rejects_an_empty_document() -> None:
    assert only_issue("# nothing\n").message == "the document is empty"


def test_it_rejects_a_document_that_is_not_a_mapping() -> None:
    issue = only_issue("- a\n- b\n")
    assert (issue.path, issue.line) == ("", 1)
    assert issue.message == "must be a mapping, not a list"


def test_it_reports_malformed_yaml_with_its_line() -> None:
    issue = only_issue(EXAMPLE.replace("      workdir: /app\n", "      workdir: [/app\n"))
    assert issue.line is not None and 18 <= issue.line <= 19
    assert issue.message.startswith("invalid YAML")


def test_it_describes_issues_readably() -> None:
    issue = only_issue(EXAMPLE.replace("memory_mib: 1024", "memory_mib: 8"))
    assert str(issue) == "line 29: spec.workloads[1].memory_mib: must be at least 16, not 8"
    assert issue.to_dict() == {
        "path": "spec.workloads[1].memory_mib",
        "line": 29,
        "column": 7,
        "message": "must be at least 16, not 8",
    }


# --- semantic issues ------------------------------------------------------------------------------------


def test_it_reports_a_duplicate_workload_name_with_the_first_line() -> None:
    issue = only_issue(EXAMPLE.replace("- name: db", "- name: web"))
    assert (issue.path, issue.line) == ("spec.workloads[1].name", 25)
    assert issue.message == "duplicate workload name 'web' (first declared on line 12)"


def test_it_reports_a_duplicate_network_name() -> None:
    issue = issues_of(EXAMPLE.replace("- name: frontend", "- name: backend"))[0]
    assert (issue.path, issue.line) == ("spec.networks[1].name", 10)
    assert issue.message == "duplicate network name 'backend' (first declared on line 7)"


def test_it_reports_a_port_of_an_unknown_workload() -> None:
    issue = only_issue(
        EXAMPLE.replace("    - workload: web\n      port: 443", "    - workload: api\n      port: 443")
    )
    assert (issue.path, issue.line) == ("spec.ports[1].workload", 36)
    assert issue.message == "unknown workload 'api': declare it under spec.workloads"


def test_it_reports_a_port_published_twice() -> None:
    issue = only_issue(EXAMPLE.replace("port: 443", "port: 80"))
    assert (issue.path, issue.line) == ("spec.ports[1].port", 37)


def test_it_reports_a_host_port_used_twice_for_one_protocol() -> None:
    issue = only_issue(EXAMPLE.replace("port: 443", "port: 443\n      host_port: 8080"))
    assert (issue.path, issue.line) == ("spec.ports[1].host_port", 38)
    assert issue.message == "host port 8080/tcp is used twice (first declared on line 32)"


def test_it_allows_one_host_port_for_tcp_and_udp() -> None:
    parse(EXAMPLE.replace("port: 443", "port: 443\n      protocol: udp\n      host_port: 8080"))


def test_it_reports_host_ports_outside_the_operators_range() -> None:
    issue = only_issue(EXAMPLE, host_port_range=(20000, 30000))
    assert (issue.path, issue.line) == ("spec.ports[0].host_port", 35)


def test_it_reports_an_undeclared_network() -> None:
    issue = only_issue(EXAMPLE.replace("networks: [backend]", "networks: [storage]"))
    assert (issue.path, issue.line) == ("spec.workloads[1].networks[0]", 30)
    assert issue.message == "unknown network 'storage': declare it under spec.networks"


def test_it_accepts_an_existing_network_the_document_does_not_manage() -> None:
    config = parse(EXAMPLE.replace("networks: [backend]", "networks: [storage]"), known_networks={"storage"})
    assert config.workloads[1].networks == ("storage",)


def test_it_refuses_an_undeclared_existing_network_when_prune_would_delete_it() -> None:
    text = EXAMPLE.replace("networks: [backend]", "networks: [storage]").replace(
        "prune: false", "prune: true"
    )
    issue = only_issue(text, known_networks={"storage"})
    assert issue.path == "spec.workloads[1].networks[0]"
    assert "prune" in issue.message


def test_it_reports_overlapping_subnets() -> None:
    issue = only_issue(
        EXAMPLE.replace("    - name: frontend\n", "    - name: frontend\n      subnet: 10.42.0.128/25\n")
    )
    assert (issue.path, issue.line) == ("spec.networks[1].subnet", 11)
    assert issue.message == "subnet 10.42.0.128/25 overlaps 10.42.0.0/24 of network 'backend'"


def test_it_reports_a_subnet_with_host_bits_and_suggests_the_network() -> None:
    issue = only_issue(EXAMPLE.replace("10.42.0.0/24", "10.42.0.1/24"))
    assert (issue.path, issue.line) == ("spec.networks[0].subnet", 8)
    assert issue.message.endswith("did you mean 10.42.0.0/24?")


@pytest.mark.parametrize("subnet", ["10.42.0.0/31", "10.0.0.0/4", "300.1.1.0/24"])
def test_it_rejects_unusable_subnets(subnet: str) -> None:
    assert only_issue(EXAMPLE.replace("10.42.0.0/24", subnet)).path == "spec.networks[0].subnet"


def test_it_reports_an_image_the_tenant_cannot_see() -> None:
    issue = only_issue(EXAMPLE.replace("library/postgres:16", "library/mysql:8"))
    assert (issue.path, issue.line) == ("spec.workloads[1].image", 26)
    assert issue.message == "image not found: 'library/mysql:8'"


def test_it_requires_whole_vcpus_for_a_micro_vm() -> None:
    issue = only_issue(EXAMPLE.replace("vcpus: 2", "vcpus: 1.5"))
    assert (issue.path, issue.line) == ("spec.workloads[1].vcpus", 28)


def test_it_accepts_fractional_vcpus_for_a_container() -> None:
    assert parse(EXAMPLE.replace("vcpus: 1\n", "vcpus: 0.5\n")).workloads[0].vcpus == 0.5


def test_it_rejects_a_vcpus_value_that_is_not_a_number() -> None:
    for not_a_number in (".nan", ".inf"):
        issue = only_issue(EXAMPLE.replace("vcpus: 1\n", f"vcpus: {not_a_number}\n"))
        assert (issue.path, issue.line) == ("spec.workloads[0].vcpus", 20)


def test_it_reports_schema_and_semantic_issues_as_one_error_type() -> None:
    with pytest.raises(ValueError, match="invalid desired-state document"):
        parse(EXAMPLE.replace("- name: db", "- name: web"))
