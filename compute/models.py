"""Hosts and workloads. A workload's state changes only by conditional updates (see compute.agent)."""

from __future__ import annotations

import secrets
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q

from compute.choices import HostLostPolicy, HostState, Isolation, RestartPolicy, WorkloadState
from portal.permissions import TenantOwnedQuerySet, acts_as_operator
from tenants.models import dns_label


class HostQuerySet(models.QuerySet):
    def for_user(self, user: Any, action: str = "view") -> HostQuerySet:
        """Hosts are infrastructure: operators only (a token scoped to a tenant is no operator)."""
        return self if acts_as_operator(user, write=action != "view") else self.none()


class Host(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63, unique=True, validators=[dns_label])
    address = models.GenericIPAddressField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=HostState.choices, default=HostState.READY)
    facts = models.JSONField(default=dict, blank=True)
    cpus = models.PositiveIntegerField(default=0)
    memory_mib = models.PositiveBigIntegerField(default=0)
    cpu_overcommit = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal("4"))
    memory_overcommit = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal("1"))
    labels = models.JSONField(default=dict, blank=True)
    oci_runtime_override = models.CharField(max_length=16, blank=True)
    domain_type_override = models.CharField(max_length=8, blank=True)
    pinned_only = models.BooleanField(default=False, help_text="Only workloads pinned to it by an operator.")
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # When the heartbeat sweep marked it lost (None while it answers): reschedules wait a grace after it.
    lost_at = models.DateTimeField(null=True, blank=True)
    removed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = HostQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"host.{self.pk}"

    @property
    def vcpu_capacity(self) -> Decimal:
        return Decimal(self.cpus) * self.cpu_overcommit

    @property
    def memory_capacity_mib(self) -> int:
        return int(Decimal(self.memory_mib) * self.memory_overcommit)

    @property
    def oci_runtime(self) -> str:
        working = self.facts.get("oci_runtimes") or ["runc"]
        return self.oci_runtime_override or working[0]

    @property
    def domain_type(self) -> str:
        return self.domain_type_override or ("kvm" if self.facts.get("kvm") else "qemu")


class JoinTokenQuerySet(HostQuerySet):
    pass


class JoinToken(models.Model):
    """A short-lived, single-use secret a new host presents to register itself, with its host profile."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    secret_hash = models.CharField(max_length=64, unique=True)
    host_name = models.CharField(max_length=63, validators=[dns_label])
    profile = models.JSONField(default=dict, blank=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = JoinTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"join token for {self.host_name}"


class HostCredential(models.Model):
    """A host's own secret (issued at join, rotatable, revocable): what the host presents to the portal.
    Only its sha256 is kept; it is shown once. A host has at most one that is not revoked."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="credentials")
    secret_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = HostQuerySet.as_manager()

    def __str__(self) -> str:
        return f"credential of {self.host_id}"


def new_runtime_id() -> str:
    return "bh-" + secrets.token_hex(16)


class Workload(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="workloads")
    name = models.CharField(max_length=63, validators=[dns_label])
    image = models.ForeignKey("imaging.Image", on_delete=models.PROTECT, related_name="workloads")
    isolation = models.CharField(max_length=16, choices=Isolation.choices, default=Isolation.NAMESPACE)
    command = models.JSONField(null=True, blank=True, help_text="Entrypoint override")
    args = models.JSONField(null=True, blank=True, help_text="Cmd override")
    env = models.JSONField(default=dict, blank=True)
    # Environment variables whose values are the tenant's secrets: {"DB_PASSWORD": "<secret name>"}.
    # Names only; the values are resolved on the host when the workload starts (agent.process_env).
    secret_env = models.JSONField(default=dict, blank=True)
    workdir = models.CharField(max_length=4096, blank=True)
    user = models.CharField(max_length=64, blank=True)
    vcpus = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal(1))
    memory_mib = models.PositiveIntegerField(default=256)
    # Writable layer (container) or writable disk (micro-VM) size: a filesystem of this size holds it.
    disk_gib = models.PositiveIntegerField(default=1)
    restart_policy = models.CharField(
        max_length=16, choices=RestartPolicy.choices, default=RestartPolicy.NEVER
    )
    on_host_lost = models.CharField(
        max_length=16, choices=HostLostPolicy.choices, default=HostLostPolicy.WAIT
    )
    # No user namespace: container root is host root. Only where an operator allowed it for the tenant.
    privileged = models.BooleanField(default=False)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.PROTECT, related_name="workloads")
    pinned = models.BooleanField(default=False)
    # Server-generated name of the container or domain on the host: never user text.
    runtime_id = models.CharField(max_length=40, default=new_runtime_id, unique=True, editable=False)
    state = models.CharField(max_length=16, choices=WorkloadState.choices, default=WorkloadState.PENDING)
    desired_running = models.BooleanField(default=True)
    exit_code = models.IntegerField(null=True, blank=True)
    status_message = models.CharField(max_length=500, blank=True)
    restart_count = models.PositiveIntegerField(default=0)
    managed_revision = models.PositiveIntegerField(null=True, blank=True)
    managed_spec_hash = models.CharField(max_length=64, blank=True)
    # The image reference the document declared ("nginx", "nginx:1.27", "name@sha256:..."): the row keeps
    # the image id, and the document's spelling of the same image must not look like drift.
    managed_image_reference = models.CharField(max_length=400, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="workload_unique_name_in_tenant"),
            models.CheckConstraint(condition=Q(vcpus__gt=0), name="workload_vcpus_positive"),
            models.CheckConstraint(condition=Q(memory_mib__gte=16), name="workload_memory_minimum"),
            models.CheckConstraint(condition=Q(disk_gib__gte=1), name="workload_disk_minimum"),
        ]

    def __str__(self) -> str:
        return self.name

    def as_event(self) -> dict[str, Any]:
        return {
            "type": "workload",
            "id": str(self.pk),
            "name": self.name,
            "state": self.state,
            "exit_code": self.exit_code,
            "host": self.host.name if self.host_id and self.host else None,
        }


from compute.compartments import Compartment, IPAllocation, PublishedPort  # noqa: E402, F401
from compute.desired.models import DesiredPlan, DesiredRevision, DesiredState, ResourceCorrection  # noqa: E402, F401
