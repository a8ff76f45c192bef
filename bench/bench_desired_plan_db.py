"""Plan of a 1,000-resource document against 1,000 existing resources, end to end on PostgreSQL (issue 8).

``bench_desired_plan.py`` measures parse, validation and planning in memory. This one measures what an API
call pays: ``compute.desired.services.create_plan(actor, tenant, revision)``, which parses and validates
the revision for the tenant (images resolved against the database, the tenant's compartments read for the
subnet checks), observes the tenant's rows (``compute/desired/observe.py``), computes the plan and stores
a ``DesiredPlan`` row with its audit entry.

Setup: one tenant with 1,000 resources made with ``bulk_create`` (5% networks, 60% workloads on one host
with 20 images, the rest published ports; every workload on one network). The tenant is exported
(``services.export_for``) and saved as revision 1, and the rows are stamped managed with that revision's
spec hashes, as an apply would leave them (a plan of revision 1 is then all noop; checked). Revision 2 is
the export with realistic edits: memory, env and image changes, 12 workloads (and their ports) removed,
10 added with a port each, a few pinned host ports moved. The figure is the plan of revision 2.

Baseline, side by side (``floor``): what any DB-backed planner pays at least, reading the same rows with
plain SQL (one ``SELECT`` per table: compartments, workloads joined with images, IP allocations, published
ports of the tenant; ``fetchall``) plus libyaml's ``CSafeLoader`` over the same text.

Run: scripts/with-test-services.sh .venv/bin/python bench/bench_desired_plan_db.py [--repeat 7] [--profile]
Prints one JSON line (medians of ``--repeat`` runs, milliseconds); ``--profile`` adds a cProfile of one
run on stderr. ``DEBUG`` is off (``BULKHEAD_DEBUG=0`` unless set), as in production: Django's debug cursor
would otherwise log every query.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import ipaddress
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ.setdefault("BULKHEAD_DEBUG", "0")

GOAL_MS = 500.0
TENANT = "bench-plan-db"
RESOURCES = 1000
IMAGES = [(f"library/app{n}", f"1.{n}") for n in range(20)]
PORT_BASE = 20000  # inside the default published port range (20000-29999)


def counts(resources: int) -> tuple[int, int, int]:
    networks = min(200, max(1, resources * 5 // 100))  # the schema allows 256 networks
    workloads = resources * 60 // 100
    return networks, workloads, resources - networks - workloads


def kept_workloads(workloads: int) -> list[int]:
    """Workloads revision 2 keeps (n % 50 == 7 are removed); ports belong to these, so none dangles."""
    return [n for n in range(workloads) if n % 50 != 7]


# --------------------------------------------------------------------------------------------------------
# Setup


def setup_django() -> None:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def remove_previous(tenant_name: str) -> None:
    """A database kept from an earlier run: remove that run's tenant (protected rows first)."""
    from compute.compartments import Compartment, IPAllocation, PublishedPort
    from compute.models import Workload
    from tenants.models import Tenant

    tenant = Tenant.objects.filter(name=tenant_name).first()
    if tenant is None:
        return
    PublishedPort.objects.filter(tenant=tenant).delete()
    IPAllocation.objects.filter(compartment__tenant=tenant).delete()
    Workload.objects.filter(tenant=tenant).delete()
    Compartment.objects.filter(tenant=tenant).delete()
    tenant.delete()


def seed(resources: int) -> tuple[Any, Any, str]:
    """The operator acting, the tenant and its host; the tenant's 1,000 rows exist, unmanaged for now."""
    from django.contrib.auth import get_user_model

    from compute.compartments import Compartment, IPAllocation, PublishedPort
    from compute.models import Host, Workload
    from imaging.models import Image
    from tenants import services as tenant_services
    from tenants.actors import Actor

    remove_previous(TENANT)
    user_model = get_user_model()
    operator = user_model.objects.filter(username="bench-op").first() or user_model.objects.create_user(
        "bench-op", password="bench-password-123", is_staff=True
    )
    actor = Actor(user=operator)
    host, _ = Host.objects.get_or_create(
        name="bench-plan-host",
        defaults={"cpus": 4096, "memory_mib": 1 << 30, "facts": {"oci_runtimes": ["runc"]}},
    )
    tenant = tenant_services.create_tenant(actor=actor, name=TENANT, owner=operator)

    # Images as tests/imaging/images.py db_image makes them, without layers (planning never reads them).
    images = Image.objects.bulk_create(
        Image(
            tenant=tenant,
            name=name,
            tag=tag,
            manifest_digest="sha256:" + f"{n:064x}",
            config_digest="sha256:" + f"{n + 1000:064x}",
            config={"cmd": ["/bin/sh"]},
            size=200,
        )
        for n, (name, tag) in enumerate(IMAGES)
    )
    network_count, workload_count, port_count = counts(resources)
    subnets = ipaddress.IPv4Network("10.64.0.0/12").subnets(new_prefix=24)
    first_vni = 1_000_000 + (Compartment.objects.count() * 1000)  # away from IPAM's (4096 up)
    compartments = []
    for n in range(network_count):
        subnet = next(subnets)
        compartments.append(
            Compartment(
                tenant=tenant,
                name=f"net{n}",
                subnet=str(subnet),
                gateway=str(subnet.network_address + 1),
                nat=n % 7 != 3,
                vni=first_vni + n,
            )
        )
    Compartment.objects.bulk_create(compartments)
    workloads = [
        Workload(
            tenant=tenant,
            name=f"w{n}",
            image=images[n % len(images)],
            isolation="microvm" if n % 4 == 0 else "namespace",
            command=["/bin/app", "--serve"] if n % 3 == 0 else None,
            env={"MODE": "prod", "SHARD": str(n)},
            vcpus=1 + n % 4,
            memory_mib=256,
            restart_policy="always",
            host=host,
            state="running",
            desired_running=True,
        )
        for n in range(workload_count)
    ]
    Workload.objects.bulk_create(workloads)
    allocations = []
    for n, workload in enumerate(workloads):
        compartment = compartments[n % network_count]
        address = compartment.network.network_address + 2 + n // network_count
        allocations.append(
            IPAllocation(
                compartment=compartment,
                workload=workload,
                address=str(address),
                mac="02:00:" + ":".join(f"{(n >> s) & 0xFF:02x}" for s in (24, 16, 8, 0)),
            )
        )
    IPAllocation.objects.bulk_create(allocations)
    kept = kept_workloads(workload_count)
    PublishedPort.objects.bulk_create(
        PublishedPort(
            tenant=tenant,
            workload=workloads[kept[p % len(kept)]],
            host=host,
            protocol="tcp",
            host_port=PORT_BASE + p,
            workload_port=1000 + p // len(kept),
        )
        for p in range(port_count)
    )
    return actor, tenant, str(host.pk)


def stamp_managed(tenant: Any, revision: Any) -> None:
    """Mark every row managed by ``revision``, with its spec hash, as an apply of it would have."""
    from compute.compartments import Compartment, PublishedPort
    from compute.desired import services
    from compute.models import Workload

    resources = {r.key: r for r in services.parse_for_tenant(tenant, revision.text).resources()}
    compartments = list(Compartment.objects.filter(tenant=tenant))
    for compartment in compartments:
        compartment.managed_revision = revision.number
        compartment.managed_spec_hash = resources[f"network/{compartment.name}"].spec_hash
    Compartment.objects.bulk_update(compartments, ["managed_revision", "managed_spec_hash"])
    workloads = list(Workload.objects.filter(tenant=tenant))
    for workload in workloads:
        resource = resources[f"workload/{workload.name}"]
        workload.managed_revision = revision.number
        workload.managed_spec_hash = resource.spec_hash
        workload.managed_image_reference = resource.spec["image"]
    Workload.objects.bulk_update(
        workloads, ["managed_revision", "managed_spec_hash", "managed_image_reference"], batch_size=500
    )
    ports = list(PublishedPort.objects.filter(tenant=tenant).select_related("workload"))
    for port in ports:
        port.managed_revision = revision.number
        port.managed_spec_hash = resources[
            f"port/{port.workload.name}/{port.workload_port}/{port.protocol}"
        ].spec_hash
    PublishedPort.objects.bulk_update(ports, ["managed_revision", "managed_spec_hash"], batch_size=500)


def edited(text: str, workloads: int, networks: int) -> str:
    """Revision 2: the export with the edits a real revision makes."""
    import yaml

    from compute.desired.document import _ExportDumper

    document = yaml.load(text, Loader=yaml.CSafeLoader)
    spec = document["spec"]
    image_refs = [f"{name}:{tag}" for name, tag in IMAGES]
    items = []
    for item in spec["workloads"]:
        n = int(item["name"][1:])
        if n % 50 == 7:
            continue  # removed (no port belongs to it)
        if n % 10 == 3:
            item["memory_mib"] = 512
        if n % 20 == 5:
            item["env"] = {**item["env"], "EXTRA": "x"}
        if n % 25 == 4:
            item["image"] = image_refs[(n + 1) % len(image_refs)]
        items.append(item)
    added = range(workloads, workloads + 10)
    for n in added:
        items.append(
            {
                "name": f"w{n}",
                "image": image_refs[n % len(image_refs)],
                "env": {"MODE": "prod", "SHARD": str(n)},
                "memory_mib": 256,
                "restart": "always",
                "networks": [f"net{n % networks}"],
            }
        )
    spec["workloads"] = items
    for index, port in enumerate(spec["ports"]):
        if index % 30 == 0:
            port["host_port"] += 5000  # a pinned host port moved: a replace
    spec["ports"] += [{"workload": f"w{n}", "port": 8080, "protocol": "tcp"} for n in added]
    body = yaml.dump(document, Dumper=_ExportDumper, sort_keys=False, allow_unicode=True, width=110)
    return "# Edited from the export.\n" + body


# --------------------------------------------------------------------------------------------------------
# Measurement


def floor_reader(tenant_id: Any, text: str, *, sql: bool = True, parse: bool = True) -> Callable[[], int]:
    """Plain SQL, one SELECT per table, plus CSafeLoader: the least a DB-backed planner can do."""
    import yaml
    from django.db import connection

    from compute.compartments import Compartment, IPAllocation, PublishedPort
    from compute.models import Workload
    from imaging.models import Image

    c, w, i, a, p = (
        model._meta.db_table for model in (Compartment, Workload, Image, IPAllocation, PublishedPort)
    )
    statements = [
        f"SELECT id, name, subnet, gateway, nat, managed_revision, managed_spec_hash FROM {c} "  # noqa: S608
        "WHERE tenant_id = %s",
        f"SELECT w.id, w.name, w.isolation, w.command, w.args, w.env, w.workdir, w.user, w.vcpus, "  # noqa: S608
        f"w.memory_mib, w.restart_policy, w.state, w.desired_running, w.managed_revision, "
        f"w.managed_spec_hash, w.managed_image_reference, i.id, i.name, i.tag "
        f"FROM {w} w JOIN {i} i ON i.id = w.image_id WHERE w.tenant_id = %s AND w.state <> 'deleting'",
        f"SELECT a.workload_id, c.name FROM {a} a JOIN {c} c ON c.id = a.compartment_id "  # noqa: S608
        "WHERE c.tenant_id = %s",
        f"SELECT p.id, w.name, p.workload_port, p.protocol, p.host_port, p.managed_revision, "  # noqa: S608
        f"p.managed_spec_hash FROM {p} p JOIN {w} w ON w.id = p.workload_id "
        "WHERE p.tenant_id = %s AND w.state <> 'deleting'",
    ]

    def read() -> int:
        rows = 0
        if sql:
            with connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement, [tenant_id])
                    rows += len(cursor.fetchall())
        if parse:
            yaml.load(text, Loader=yaml.CSafeLoader)
        return rows

    return read


class Timing:
    """Medians of wall and CPU time (this process only; the database server is another process), ms."""

    def __init__(self, function: Callable[[], Any], repeat: int) -> None:
        wall, cpu = [], []
        for _ in range(repeat):
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            self.result = function()
            wall.append((time.perf_counter() - wall_started) * 1000)
            cpu.append((time.process_time() - cpu_started) * 1000)
        self.wall_ms = round(statistics.median(wall), 1)
        self.cpu_ms = round(statistics.median(cpu), 1)
        self.runs_ms = [round(value, 1) for value in wall]


def captured(function: Callable[[], Any]) -> tuple[Any, int, float]:
    """One run with the queries captured: (result, number of queries, their summed time in ms)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    connection.queries_log.clear()
    with CaptureQueriesContext(connection) as queries:
        result = function()
    return result, len(queries), sum(float(query["time"]) for query in queries.captured_queries) * 1000


def profile(function: Callable[[], Any], top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    function()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    arguments = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    arguments.add_argument("--resources", type=int, default=RESOURCES)
    arguments.add_argument("--repeat", type=int, default=7)
    arguments.add_argument("--profile", action="store_true", help="cProfile of one run, on stderr")
    options = arguments.parse_args()

    load_start = os.getloadavg()
    setup_started = time.perf_counter()
    setup_django()
    import yaml
    from django.conf import settings
    from django.db import connection

    from compute.compartments import Compartment
    from compute.desired import observe, services
    from compute.desired.models import DesiredPlan
    from compute.desired.planning import compute_plan

    actor, tenant, _ = seed(options.resources)
    first_text = services.export_for(tenant)
    first, _ = services.save_revision(actor=actor, tenant=tenant, text=first_text, message="export")
    stamp_managed(tenant, first)
    check = services.create_plan(actor=actor, tenant=tenant, revision=first)
    changes = {action: n for action, n in check.plan["summary"].items() if n and action != "noop"}
    assert not changes, f"revision 1 should plan to nothing, got {changes}"
    networks, workloads, _ = counts(options.resources)
    text = edited(first_text, workloads, networks)
    revision, _ = services.save_revision(actor=actor, tenant=tenant, text=text, message="edits")
    setup_s = time.perf_counter() - setup_started

    def plan() -> Any:
        return services.create_plan(actor=actor, tenant=tenant, revision=revision)

    # The first plan after a process start pays the schema validator's build (cached per process).
    first_run = Timing(plan, 1)
    repeat = options.repeat
    total = Timing(plan, repeat)
    row, queries, db_ms = captured(plan)
    # The same with the startup heap frozen out of the collector (gc.freeze(), as a server may do after
    # loading Django): the full collections that scan ~150k long-lived objects are most of the spread.
    gc.collect()
    gc.freeze()
    frozen = Timing(plan, repeat)
    gc.unfreeze()
    # Where the time goes, part by part (each measured alone, same medians).
    parse = Timing(lambda: services.parse_for_tenant(tenant, revision.text), repeat)
    config = parse.result
    compartments = list(Compartment.objects.filter(tenant=tenant).order_by("name"))
    state_checks = Timing(lambda: services._state_issues(config, compartments), repeat)
    images = Timing(lambda: [services.resolve_image(tenant, f"{n}:{t}") for n, t in IMAGES], repeat)
    observed = Timing(lambda: observe.observed_resources(tenant), repeat)
    normalise = Timing(config.resources, repeat)
    planned = Timing(lambda: compute_plan(normalise.result, observed.result, prune=config.prune), repeat)
    floor = Timing(floor_reader(tenant.pk, revision.text), repeat)
    floor_sql = Timing(floor_reader(tenant.pk, revision.text, parse=False), repeat)
    floor_yaml = Timing(floor_reader(tenant.pk, revision.text, sql=False), repeat)
    _, floor_queries, floor_db_ms = captured(floor_reader(tenant.pk, revision.text))
    profile_text = profile(plan) if options.profile else ""

    summary = {action: count for action, count in row.plan["summary"].items() if count}
    load = os.getloadavg()
    figures = {
        "bench": "desired_plan_db",
        "database": connection.vendor,
        "server_version": getattr(connection, "pg_version", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "libyaml": bool(getattr(yaml, "__with_libyaml__", False)),
        "debug": settings.DEBUG,
        "clock": "wall ms, median",
        "repeat": repeat,
        "resources_observed": len(observed.result),
        "resources_desired": len(parse.result.resources()),
        "document_bytes": len(revision.text.encode()),
        "plan_steps": summary,
        "create_plan_ms": total.wall_ms,
        "create_plan_cpu_ms": total.cpu_ms,
        "create_plan_runs_ms": total.runs_ms,
        "create_plan_max_ms": max(total.runs_ms),
        "create_plan_first_run_ms": first_run.wall_ms,
        "create_plan_gc_frozen_ms": frozen.wall_ms,
        "create_plan_gc_frozen_max_ms": max(frozen.runs_ms),
        "queries": queries,
        "queries_db_ms": round(db_ms, 1),
        "part_parse_for_tenant_ms": parse.wall_ms,
        "part_of_which_state_checks_ms": state_checks.wall_ms,
        "part_of_which_image_resolution_ms": images.wall_ms,
        "part_observe_ms": observed.wall_ms,
        "part_normalise_ms": normalise.wall_ms,
        "part_compute_plan_ms": planned.wall_ms,
        "goal_ms": GOAL_MS,
        "met": total.wall_ms < GOAL_MS,
        "baseline": "plain SQL, one SELECT per table (4), fetchall, + yaml CSafeLoader of the same text",
        "baseline_floor_ms": floor.wall_ms,
        "baseline_floor_sql_ms": floor_sql.wall_ms,
        "baseline_floor_yaml_ms": floor_yaml.wall_ms,
        "baseline_floor_queries": floor_queries,
        "baseline_floor_db_ms": round(floor_db_ms, 1),
        "ratio_vs_floor": round(total.wall_ms / floor.wall_ms, 2),
        "plans_stored": DesiredPlan.objects.filter(tenant=tenant).count(),
        "setup_s": round(setup_s, 1),
        "load_avg_start": [round(value, 2) for value in load_start],
        "load_avg_end": [round(value, 2) for value in load],
    }
    print(json.dumps(figures))
    if profile_text:
        print(profile_text, file=sys.stderr)


if __name__ == "__main__":
    main()
