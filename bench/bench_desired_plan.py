"""Benchmark: parse + validate + plan a 1,000-resource desired-state document against 1,000 existing ones.

Prints one JSON line. Figures are medians of ``--repeat`` runs, in milliseconds.

Baselines, side by side:

* ``floor``: libyaml ``CSafeLoader`` + one prebuilt ``jsonschema`` validator over the same text. It is the
  least any schema-validated YAML pipeline must spend (no positions, no semantic checks, no plan), so
  ``ratio_total_vs_floor`` says what line numbers, semantics, normalisation and planning cost on top.
* ``naive``: the obvious first implementation: ``yaml.safe_load`` (pure-Python loader, what most code
  calls) + ``jsonschema.validate`` (rebuilds and re-checks the validator per call) + a planner that finds
  each observed resource by scanning the list and compares whole spec dicts (quadratic, and wrong about
  system-filled fields, which is why it reports more changes than the real plan).

Run: ``.venv/bin/python bench/bench_desired_plan.py [--resources 1000] [--repeat 7]``
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute.desired.document import (
    DesiredResource,
    load_yaml_with_positions,
    parse_document,
)
from compute.desired.planning import ObservedResource, compute_plan, observed_fingerprint
from compute.desired.schema import SCHEMA

GOAL_MS = 500.0
IMAGES = [f"library/app{n}:1.{n}" for n in range(20)]


def build_document(resources: int, variant: int) -> str:
    """A document of ``resources`` resources: 5% networks, 60% workloads, the rest ports.

    ``variant`` 1 differs from variant 0 the way a real revision does: some memory, image and env edits,
    a few workloads (and their ports) removed and a few added.
    """
    networks = min(200, max(1, resources * 5 // 100))  # the schema allows 256 networks
    workloads = resources * 60 // 100
    ports = resources - networks - workloads
    subnets = ipaddress.IPv4Network("10.64.0.0/12").subnets(new_prefix=24)
    lines = [
        "apiVersion: bulkhead/v1",
        "kind: TenantConfig",
        "metadata: {name: bench}",
        "spec:",
        "  prune: false",
    ]
    lines.append("  networks:")
    for n in range(networks):
        lines.append(f"    - name: net{n}")
        if n % 2 == 0:
            lines.append(f"      subnet: {next(subnets)}")
        lines.append("      nat: true")
    lines.append("  workloads:")
    numbers = list(range(workloads))
    if variant:
        # 2% of the workloads removed (their ports too), 10 new ones.
        numbers = [n for n in numbers if n % 50 != 7] + list(range(workloads, workloads + 10))
    for n in numbers:
        # Each workload's fields derive from its number, so that removing one does not shift the others.
        memory = 512 if variant and n % 10 == 3 else 256
        image = IMAGES[(n + 1) % len(IMAGES)] if variant and n % 25 == 4 else IMAGES[n % len(IMAGES)]
        extra_env = ", EXTRA: x" if variant and n % 20 == 5 else ""
        lines += [
            f"    - name: w{n}",
            f"      image: {image}",
            f"      isolation: {'microvm' if n % 4 == 0 else 'namespace'}",
            f'      env: {{MODE: prod, SHARD: "{n}"{extra_env}}}',
            f"      vcpus: {1 + n % 4}",
            f"      memory_mib: {memory}",
            "      restart: always",
            f"      networks: [net{n % networks}]",
        ]
    lines.append("  ports:")
    # Ports belong to the first workloads of variant 0 that every variant keeps (n % 50 != 7).
    kept = [n for n in range(workloads) if n % 50 != 7]
    for p in range(ports):
        n = kept[p % len(kept)]
        lines += [f"    - workload: w{n}", f"      port: {1000 + p // len(kept)}"]
        if p % 3 == 0:
            moved = 5000 if variant and p % 30 == 0 else 0  # a few pinned host ports change: replaces
            lines.append(f"      host_port: {20000 + p + moved}")
    return "\n".join(lines) + "\n"


def resolve_image(reference: str) -> str | None:
    return "img-" + reference.rsplit(":", 1)[1] if reference in IMAGES else None


def applied(resources: list[DesiredResource]) -> list[ObservedResource]:
    """The observed state after applying ``resources``: assigned fields filled, bookkeeping added."""
    subnets = ipaddress.IPv4Network("10.128.0.0/12").subnets(new_prefix=24)
    observed = []
    for position, resource in enumerate(resources):
        spec = dict(resource.spec)
        if resource.kind == "network" and spec["subnet"] is None:
            spec["subnet"] = str(next(subnets))
        if resource.kind == "port" and spec["host_port"] is None:
            spec["host_port"] = 40000 + position
        spec["id"] = position
        observed.append(
            ObservedResource(
                resource.kind, resource.key, spec, True, 1, resource.spec_hash, {"state": "running"}
            )
        )
    return observed


def naive_plan(desired: list[DesiredResource], observed: list[ObservedResource]) -> list[tuple[str, str]]:
    steps = []
    for resource in desired:
        match = next((o for o in observed if o.key == resource.key), None)  # linear scan per resource
        if match is None:
            steps.append(("create", resource.key))
        elif {k: v for k, v in match.spec.items() if k != "id"} != resource.spec:
            steps.append(("update", resource.key))
    wanted = [resource.key for resource in desired]
    steps += [("delete", o.key) for o in observed if o.key not in wanted]  # another quadratic scan
    return steps


class Timing:
    """Medians of CPU time (robust when other jobs share the machine) and wall time, in milliseconds."""

    def __init__(self, function: Callable[[], Any], repeat: int) -> None:
        cpu, wall = [], []
        for _ in range(repeat):
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            self.result = function()
            cpu.append((time.process_time() - cpu_started) * 1000)
            wall.append((time.perf_counter() - wall_started) * 1000)
        self.cpu_ms = round(statistics.median(cpu), 2)
        self.wall_ms = round(statistics.median(wall), 2)


def main() -> None:
    arguments = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    arguments.add_argument("--resources", type=int, default=1000)
    arguments.add_argument("--repeat", type=int, default=7)
    options = arguments.parse_args()

    current_text = build_document(options.resources, variant=0)
    new_text = build_document(options.resources, variant=1)
    observed = applied(parse_document(current_text, resolve_image).resources())
    parse_document(new_text, resolve_image)  # warm the schema validator cache, as a long-running server would

    def pipeline() -> Any:
        return compute_plan(parse_document(new_text, resolve_image).resources(), observed, prune=False)

    repeat = options.repeat
    parse = Timing(lambda: load_yaml_with_positions(new_text), repeat)
    parse_and_validate = Timing(lambda: parse_document(new_text, resolve_image), repeat)
    normalise = Timing(parse_and_validate.result.resources, repeat)
    desired = normalise.result
    plan = Timing(lambda: compute_plan(desired, observed, prune=False), repeat)
    fingerprint = Timing(lambda: observed_fingerprint(observed), repeat)
    total = Timing(pipeline, repeat)

    validator = jsonschema.Draft202012Validator(SCHEMA)
    floor = Timing(lambda: list(validator.iter_errors(yaml.load(new_text, Loader=yaml.CSafeLoader))), repeat)
    naive_validate = Timing(lambda: jsonschema.validate(yaml.safe_load(new_text), SCHEMA), repeat)
    naive_planner = Timing(lambda: naive_plan(desired, observed), repeat)
    naive_ms = round(naive_validate.cpu_ms + naive_planner.cpu_ms, 2)

    summary = plan.result.summary()
    figures = {
        "bench": "desired_plan",
        "python": platform.python_version(),
        "libyaml": bool(getattr(yaml, "__with_libyaml__", False)),
        "clock": "cpu ms (process_time), median",
        "resources_desired": len(desired),
        "resources_observed": len(observed),
        "document_bytes": len(new_text.encode()),
        "parse_ms": parse.cpu_ms,
        "validate_ms": round(parse_and_validate.cpu_ms - parse.cpu_ms, 2),
        "normalise_ms": normalise.cpu_ms,
        "plan_ms": plan.cpu_ms,
        "fingerprint_ms": fingerprint.cpu_ms,
        "total_ms": total.cpu_ms,
        "total_wall_ms": total.wall_ms,
        "goal_ms": GOAL_MS,
        "within_goal": total.cpu_ms < GOAL_MS,
        "plan_steps": {action: count for action, count in summary.items() if count},
        "baseline_floor_ms": floor.cpu_ms,
        "ratio_total_vs_floor": round(total.cpu_ms / floor.cpu_ms, 2),
        "baseline_naive_ms": naive_ms,
        "baseline_naive_validate_ms": naive_validate.cpu_ms,
        "baseline_naive_plan_ms": naive_planner.cpu_ms,
        "baseline_naive_plan_changes": len(naive_planner.result),
        "speedup_total_vs_naive": round(naive_ms / total.cpu_ms, 2),
        "speedup_plan_vs_naive_plan": round(naive_planner.cpu_ms / plan.cpu_ms, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
