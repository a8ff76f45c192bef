"""The published JSON Schema: one source of truth, strict everywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import yaml
from desired_samples import EXAMPLE

from compute.desired.schema import SCHEMA, SCHEMA_FILE, schema_json


def object_schemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from object_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from object_schemas(value)


def test_it_publishes_a_file_identical_to_the_python_schema() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_json(), "run: python -m compute.desired.schema"
    assert json.loads(schema_json()) == SCHEMA


def test_it_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_it_closes_every_object_to_unknown_fields() -> None:
    schemas = list(object_schemas(SCHEMA))
    assert len(schemas) >= 6
    for schema in schemas:
        # env and secret_env map names to strings: their extra properties are their content, strings.
        extra = schema["additionalProperties"]
        assert extra is False or (extra["type"] == "string" and extra["maxLength"] <= 32768)


def test_it_accepts_the_example_with_a_plain_validator() -> None:
    jsonschema.validate(yaml.safe_load(EXAMPLE), SCHEMA, cls=jsonschema.Draft202012Validator)
