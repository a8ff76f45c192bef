"""Sample documents and a stand-in for apply, shared by the desired-state tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from compute.desired.document import DesiredResource, TenantConfig, parse_document
from compute.desired.planning import ObservedResource

IMAGES = {
    "library/nginx:1.27": "img-nginx-127",
    "library/nginx@sha256:" + "a" * 64: "img-nginx-127",
    "library/nginx:1.28": "img-nginx-128",
    "library/postgres:16": "img-postgres-16",
    "library/redis:7": "img-redis-7",
}

# Line numbers matter: tests point at them.
EXAMPLE = """\
apiVersion: bulkhead/v1
kind: TenantConfig
metadata: {name: acme}
spec:
  prune: false
  networks:
    - name: backend
      subnet: 10.42.0.0/24
      nat: true
    - name: frontend
  workloads:
    - name: web
      image: library/nginx:1.27
      isolation: namespace
      command: [nginx]
      args: ["-g", "daemon off;"]
      env: {KEY: value, OTHER: "2"}
      workdir: /app
      user: "1000:1000"
      vcpus: 1
      memory_mib: 256
      restart: always
      state: running
      networks: [frontend, backend]
    - name: db
      image: library/postgres:16
      isolation: microvm
      vcpus: 2
      memory_mib: 1024
      networks: [backend]
  ports:
    - workload: web
      port: 80
      protocol: tcp
      host_port: 8080
    - workload: web
      port: 443
"""


def resolve_image(reference: str) -> str | None:
    """The images the test tenant can see."""
    return IMAGES.get(reference)


def parse(text: str = EXAMPLE, **options: object) -> TenantConfig:
    """Parse with the test tenant's images."""
    return parse_document(text, resolve_image, **options)  # type: ignore[arg-type]


def desired(text: str = EXAMPLE) -> list[DesiredResource]:
    """The normalised resources of a document."""
    return parse(text).resources()


def observed_after_apply(resources: Sequence[DesiredResource], revision: int = 1) -> list[ObservedResource]:
    """What the database holds after applying ``resources``: system-assigned values filled, extras added."""
    observed: list[ObservedResource] = []
    next_subnet = iter(ipaddress.IPv4Network("10.200.0.0/16").subnets(new_prefix=24))
    next_host_port = iter(range(30000, 40000))
    for position, resource in enumerate(resources):
        spec = dict(resource.spec)
        if resource.kind == "network" and spec["subnet"] is None:
            spec["subnet"] = str(next(next_subnet))
        if resource.kind == "port" and spec["host_port"] is None:
            spec["host_port"] = next(next_host_port)
        spec["id"] = f"{resource.kind}-{position}"  # database ids are not part of the document
        if resource.kind == "workload":
            spec["addresses"] = [f"10.42.0.{position + 2}"]
        observed.append(
            ObservedResource(
                kind=resource.kind,
                key=resource.key,
                spec=spec,
                managed=True,
                managed_revision=revision,
                managed_spec_hash=resource.spec_hash,
                status={"since": "2025-01-01T00:00:00Z", "runtime_state": "running"},
            )
        )
    return observed


def with_spec(resource: ObservedResource, **changes: object) -> ObservedResource:
    """A copy of an observed resource with some spec fields changed."""
    return ObservedResource(
        kind=resource.kind,
        key=resource.key,
        spec={**resource.spec, **changes},
        managed=resource.managed,
        managed_revision=resource.managed_revision,
        managed_spec_hash=resource.managed_spec_hash,
        status=resource.status,
    )


def by_key(resources: Sequence[ObservedResource]) -> dict[str, ObservedResource]:
    """Index observed resources by key."""
    return {resource.key: resource for resource in resources}
