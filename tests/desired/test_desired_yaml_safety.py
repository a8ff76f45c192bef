"""Hostile and sloppy YAML is refused cleanly, quickly and with a line."""

from __future__ import annotations

import time

import pytest
from desired_samples import EXAMPLE

from compute.desired.document import DocumentError, ValidationIssue, load_yaml_with_positions, parse_document

BILLION_LAUGHS = """\
apiVersion: bulkhead/v1
kind: TenantConfig
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
spec: {networks: *i}
"""


def rejection_of(text: str, **options: object) -> ValidationIssue:
    with pytest.raises(DocumentError) as raised:
        parse_document(text, **options)  # type: ignore[arg-type]
    return raised.value.issues[0]


def test_it_rejects_a_billion_laughs_document_at_the_first_anchor_in_milliseconds() -> None:
    started = time.perf_counter()
    issue = rejection_of(BILLION_LAUGHS)
    assert time.perf_counter() - started < 2  # refused before expansion, not after (which takes minutes)
    assert issue.line == 3
    assert "anchors and aliases" in issue.message


def test_it_rejects_a_single_alias() -> None:
    text = EXAMPLE.replace('env: {KEY: value, OTHER: "2"}', "env: &common {KEY: value}").replace(
        "      networks: [backend]\n", "      env: *common\n      networks: [backend]\n"
    )
    issue = rejection_of(text)
    assert issue.line == 17


def test_it_rejects_merge_keys() -> None:
    issue = rejection_of(EXAMPLE.replace("      vcpus: 2\n", "      <<: {vcpus: 2}\n"))
    assert issue.line == 28
    assert "merge keys" in issue.message


def test_it_rejects_an_oversized_document_before_parsing_it() -> None:
    huge = EXAMPLE + "#" + "x" * 5_000_000 + "\n"
    started = time.perf_counter()
    issue = rejection_of(huge)
    assert time.perf_counter() - started < 2  # refused before expansion, not after (which takes minutes)
    assert issue.message == "document is larger than 2097152 bytes"


def test_it_counts_the_size_limit_in_utf8_bytes() -> None:
    text = "# " + "é" * 600 + "\n" + EXAMPLE  # 600 characters, 1,200 bytes of comment
    assert "larger than" in rejection_of(text, max_bytes=len(text) + 100).message


def test_it_rejects_deep_nesting_without_crashing() -> None:
    # libyaml's own composer overflows the C stack on this; the event loader stops at the limit.
    deep = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec: " + "[" * 200_000 + "]" * 200_000 + "\n"
    issue = rejection_of(deep)
    assert issue.message == "nested deeper than 32 levels"
    assert issue.line == 3


def test_it_counts_nesting_across_block_and_flow_and_names_the_column() -> None:
    nested = "apiVersion: bulkhead/v1\nkind: TenantConfig\nspec:\n  x: " + "[" * 40 + "]" * 40 + "\n"
    issue = rejection_of(nested)
    assert issue.message == "nested deeper than 32 levels"
    assert issue.line == 4


def test_it_does_not_count_brackets_in_quotes_comments_or_plain_scalars() -> None:
    brackets = "[" * 40
    text = EXAMPLE.replace("workdir: /app", f"workdir: /app  # {brackets}").replace(
        'env: {KEY: value, OTHER: "2"}',
        f"env: {{KEY: \"{brackets}\", OTHER: '{brackets}'}}",
    )
    text = text.replace("workdir: /app", f"workdir: /app{brackets}")
    data, _ = load_yaml_with_positions(text)
    env = data["spec"]["workloads"][0]["env"]
    assert env == {"KEY": brackets, "OTHER": brackets}
    assert data["spec"]["workloads"][0]["workdir"] == f"/app{brackets}"


def test_it_rejects_python_object_tags() -> None:
    issue = rejection_of(EXAMPLE.replace("workdir: /app", "workdir: !!python/object/apply:os.system [id]"))
    assert issue.line == 18
    assert "unsupported YAML tag" in issue.message


def test_it_rejects_binary_and_set_tags() -> None:
    assert "unsupported YAML tag" in rejection_of(EXAMPLE.replace("/app", "!!binary aGVsbG8=")).message
    assert "unsupported YAML tag" in rejection_of(EXAMPLE.replace("env: {", "env: !!set {")).message


def test_it_reports_a_duplicate_key_with_both_lines() -> None:
    issue = rejection_of(
        EXAMPLE.replace("      memory_mib: 1024\n", "      memory_mib: 1024\n      memory_mib: 16\n")
    )
    assert (issue.path, issue.line) == ("spec.workloads[1].memory_mib", 30)
    assert issue.message == "duplicate key 'memory_mib' (first on line 29)"


def test_it_rejects_keys_that_are_not_strings() -> None:
    issue = rejection_of(EXAMPLE.replace("KEY: value", "1: value"))
    assert issue.line == 17
    assert "keys must be strings" in issue.message
    assert "must be plain strings" in rejection_of(EXAMPLE.replace("KEY: value", "[a]: value")).message


def test_it_rejects_a_second_document_in_the_stream() -> None:
    issue = rejection_of(EXAMPLE + "---\napiVersion: bulkhead/v1\n")
    assert issue.line == 38
    assert "only one YAML document" in issue.message


def test_it_rejects_an_integer_too_long_to_convert() -> None:
    issue = rejection_of(EXAMPLE.replace("memory_mib: 1024", "memory_mib: " + "9" * 10_000))
    assert issue.line == 29
    assert issue.message.startswith("invalid scalar")


def test_it_records_the_position_of_every_node() -> None:
    data, positions = load_yaml_with_positions(EXAMPLE)
    assert data["spec"]["workloads"][0]["env"]["OTHER"] == "2"
    assert positions[("spec", "workloads", 0)].line == 12
    assert positions[("spec", "workloads", 0, "env", "OTHER")].line == 17
    assert positions[("spec", "workloads", 0, "networks", 1)].line == 24
    assert positions[("spec", "workloads", 0, "networks", 1)].column == 28
