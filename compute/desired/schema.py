"""The published JSON Schema (draft 2020-12) of the tenant desired-state document.

This dict is the one source of truth. ``tenantconfig.schema.json`` next to this module is a generated copy
for people and tools outside Python (editors, CI of tenants); regenerate it with
``python -m compute.desired.schema`` and a test fails when the two disagree.

Keywords starting with ``x-`` are annotations that validators ignore; ``x-pattern-description`` turns a
regular expression into the words an error message uses ("a DNS label ..." instead of a regex).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

SCHEMA_ID: Final = "https://bulkhead.invalid/schemas/tenantconfig/v1.json"
SCHEMA_FILE: Final = Path(__file__).with_name("tenantconfig.schema.json")

API_VERSION: Final = "bulkhead/v1"
KIND: Final = "TenantConfig"

# RFC 1123 label: what a network, workload and tenant may be called (they become DNS names and ifnames).
DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# OCI distribution reference: [registry[:port]/]path[:tag][@sha256:digest]; the portal resolves it.
IMAGE_REFERENCE_PATTERN: Final = (
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
IPV4_CIDR_PATTERN: Final = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"
ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
USER_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$"

MAX_NETWORKS: Final = 256
MAX_WORKLOADS: Final = 10_000
MAX_PORTS: Final = 20_000
MAX_VOLUMES: Final = 1_000
MAX_VOLUME_GIB: Final = 16 * 1024  # volumes.services.MAX_VOLUME_GIB
MAX_MOUNTS: Final = 16
# A volume's path inside a workload: absolute; volumes.services.check_mount_path says the rest (normalised,
# not a system directory) at the semantic stage, in its own words.
MOUNT_PATH_PATTERN: Final = r"^/[^\x00-\x1f\x7f ,:\\]*$"
MAX_BACKUP_EVERY_HOURS: Final = 720
MAX_BACKUP_KEEP: Final = 1000  # backups.services.MAX_KEEP

ISOLATIONS: Final = ("namespace", "microvm")
RESTART_POLICIES: Final = ("never", "on-failure", "always")
RUN_STATES: Final = ("running", "stopped")
PROTOCOLS: Final = ("tcp", "udp")

# Defaults the normaliser fills in; the schema advertises the same values through "default".
DEFAULT_NAT: Final = True
DEFAULT_ISOLATION: Final = "namespace"
DEFAULT_VCPUS: Final = 1
DEFAULT_MEMORY_MIB: Final = 256
DEFAULT_DISK_GIB: Final = 1
DEFAULT_RESTART: Final = "on-failure"
DEFAULT_STATE: Final = "running"
DEFAULT_PROTOCOL: Final = "tcp"


def _dns_label(description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "description": description,
        "pattern": DNS_LABEL_PATTERN,
        "maxLength": 63,
        "x-pattern-description": "a DNS label (lower-case letters, digits and '-', 1 to 63 characters, "
        "starting and ending with a letter or digit)",
    }


def _string_list(description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "description": description,
        "items": {"type": "string", "maxLength": 4096},
        "maxItems": 256,
    }


SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "Bulkhead tenant desired-state document",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "spec"],
    "properties": {
        "apiVersion": {"const": API_VERSION, "description": "Document format version."},
        "kind": {"const": KIND},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "name": _dns_label("The tenant's name; informative, the document is stored per tenant."),
                "description": {"type": "string", "maxLength": 1024},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "prune": {
                    "type": "boolean",
                    "default": False,
                    "description": "Delete the tenant's resources the document does not declare, "
                    "including ones the portal does not manage (created by hand).",
                },
                "prune_volumes": {
                    "type": "boolean",
                    "default": False,
                    "description": "Together with prune: true, allow deleting volumes the document does not "
                    "declare, with all their data. Without it such volumes are kept (and the plan says so).",
                },
                "networks": {"type": "array", "maxItems": MAX_NETWORKS, "items": {"$ref": "#/$defs/network"}},
                "volumes": {"type": "array", "maxItems": MAX_VOLUMES, "items": {"$ref": "#/$defs/volume"}},
                "workloads": {
                    "type": "array",
                    "maxItems": MAX_WORKLOADS,
                    "items": {"$ref": "#/$defs/workload"},
                },
                "ports": {"type": "array", "maxItems": MAX_PORTS, "items": {"$ref": "#/$defs/port"}},
            },
        },
    },
    "$defs": {
        "network": {
            "type": "object",
            "description": "A network compartment: an isolated L2/L3 network of the tenant.",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": _dns_label("Unique among the document's networks."),
                "subnet": {
                    "type": "string",
                    "description": "IPv4 subnet in CIDR notation; allocated by IPAM when absent.",
                    "pattern": IPV4_CIDR_PATTERN,
                    "x-pattern-description": "an IPv4 subnet in CIDR notation such as 10.42.0.0/24",
                },
                "nat": {
                    "type": "boolean",
                    "default": DEFAULT_NAT,
                    "description": "Masquerade outgoing traffic to the host's uplink.",
                },
            },
        },
        "workload": {
            "type": "object",
            "description": "One OCI image run as a namespace container or a micro-VM.",
            "additionalProperties": False,
            "required": ["name", "image"],
            "properties": {
                "name": _dns_label("Unique among the document's workloads."),
                "image": {
                    "type": "string",
                    "maxLength": 512,
                    "description": "An image the tenant can see: name:tag or name@sha256:digest.",
                    "pattern": IMAGE_REFERENCE_PATTERN,
                    "x-pattern-description": "an image reference such as library/nginx:1.27 or "
                    "library/nginx@sha256:<64 hex digits>",
                },
                "isolation": {"enum": list(ISOLATIONS), "default": DEFAULT_ISOLATION},
                "command": _string_list("Entrypoint override; the image's entrypoint when absent."),
                "args": _string_list("Arguments (the image's cmd) override; the image's cmd when absent."),
                "env": {
                    "type": "object",
                    "description": "Environment variables added to the image's.",
                    "propertyNames": {
                        "pattern": ENV_NAME_PATTERN,
                        "maxLength": 256,
                        "x-pattern-description": "an environment variable name (letters, digits, '_', "
                        "not starting with a digit)",
                    },
                    "additionalProperties": {"type": "string", "maxLength": 32768},
                    "maxProperties": 1024,
                },
                "secret_env": {
                    "type": "object",
                    "description": "Environment variables whose values are the tenant's secrets, by the "
                    "secret's name (set through the API or UI; the document never holds a value).",
                    "propertyNames": {
                        "pattern": ENV_NAME_PATTERN,
                        "maxLength": 256,
                        "x-pattern-description": "an environment variable name (letters, digits, '_', "
                        "not starting with a digit)",
                    },
                    "additionalProperties": {
                        "type": "string",
                        "pattern": DNS_LABEL_PATTERN,
                        "maxLength": 63,
                        "x-pattern-description": "a secret's name (lowercase letters, digits, '-')",
                    },
                    "maxProperties": 256,
                },
                "workdir": {
                    "type": "string",
                    "pattern": "^/",
                    "maxLength": 4096,
                    "x-pattern-description": "an absolute path",
                },
                "user": {
                    "type": "string",
                    "pattern": USER_PATTERN,
                    "maxLength": 256,
                    "description": 'user[:group], names or numeric ids; quote numbers: "1000:1000".',
                    "x-pattern-description": "user or user:group (names or numeric ids)",
                },
                "vcpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 256, "default": DEFAULT_VCPUS},
                "memory_mib": {
                    "type": "integer",
                    "minimum": 16,
                    "maximum": 4_194_304,
                    "default": DEFAULT_MEMORY_MIB,
                },
                "disk_gib": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 16384,
                    "default": DEFAULT_DISK_GIB,
                    "description": "Size of the writable layer (container) or disk (micro-VM), GiB.",
                },
                "restart": {"enum": list(RESTART_POLICIES), "default": DEFAULT_RESTART},
                "on_host_lost": {
                    "enum": ["wait", "reschedule"],
                    "default": "wait",
                    "description": "reschedule: when its host is lost, run it on another host.",
                },
                "state": {
                    "enum": list(RUN_STATES),
                    "default": DEFAULT_STATE,
                    "description": "Desired run state.",
                },
                "networks": {
                    "type": "array",
                    "maxItems": 16,
                    "uniqueItems": True,
                    "items": _dns_label("A network of this document (or an existing one of the tenant)."),
                    "description": "Networks to attach, in interface order (the first is eth0).",
                },
                "volumes": {
                    "type": "array",
                    "maxItems": MAX_MOUNTS,
                    "items": {"$ref": "#/$defs/mount"},
                    "description": "Volumes mounted into the workload. Changing them stops the workload, "
                    "detaches and attaches, and starts it again (its writable layer is kept).",
                },
            },
        },
        "volume": {
            "type": "object",
            "description": "A persistent volume on one host's volume pool; its data outlives workloads.",
            "additionalProperties": False,
            "required": ["name", "size_gib"],
            "properties": {
                "name": _dns_label("Unique among the tenant's volumes."),
                "size_gib": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_VOLUME_GIB,
                    "description": "Size limit in GiB; it can grow, never shrink.",
                },
                "backups": {
                    "type": "object",
                    "description": "A backup schedule: every every_hours hours (24: daily), keeping the "
                    "last keep_last backups. Absent: no schedule.",
                    "additionalProperties": False,
                    "required": ["keep_last"],
                    "properties": {
                        "every_hours": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_BACKUP_EVERY_HOURS,
                            "default": 24,
                        },
                        "keep_last": {"type": "integer", "minimum": 1, "maximum": MAX_BACKUP_KEEP},
                    },
                },
            },
        },
        "mount": {
            "type": "object",
            "description": "A volume of the tenant mounted into the workload at an absolute path.",
            "additionalProperties": False,
            "required": ["volume", "path"],
            "properties": {
                "volume": _dns_label("A volume of this document (or an existing one of the tenant)."),
                "path": {
                    "type": "string",
                    "maxLength": 255,
                    "pattern": MOUNT_PATH_PATTERN,
                    "x-pattern-description": "an absolute path without spaces, commas, colons, backslashes "
                    "or control characters",
                },
                "read_only": {"type": "boolean", "default": False},
            },
        },
        "port": {
            "type": "object",
            "description": "A workload port published on the hosts.",
            "additionalProperties": False,
            "required": ["workload", "port"],
            "properties": {
                "workload": _dns_label("The workload whose port is published."),
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "protocol": {"enum": list(PROTOCOLS), "default": DEFAULT_PROTOCOL},
                "host_port": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 65535,
                    "description": "Assigned from the operator's range when absent.",
                },
            },
        },
    },
}


def schema_json() -> str:
    """Return the schema as the canonical JSON text written to ``tenantconfig.schema.json``."""
    return json.dumps(SCHEMA, indent=2, sort_keys=True) + "\n"


def write_schema_file(path: Path = SCHEMA_FILE) -> None:
    """Regenerate the published copy of the schema from :data:`SCHEMA`."""
    path.write_text(schema_json(), encoding="utf-8")


if __name__ == "__main__":
    write_schema_file()
    sys.stdout.write(f"wrote {SCHEMA_FILE}\n")
