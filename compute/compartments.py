"""Network compartments, their address allocations and published ports (issue 7).

A compartment is a tenant's isolated L2/L3 network; an IPAllocation is one workload's address in one
compartment (unique per compartment, enforced by the database); a PublishedPort maps a port on a host's
uplink to a workload's port (unique per host and protocol, enforced by the database). Rows change only
through compute.network_services; hosts realise them through compute.network_agent.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from django.db import models
from django.db.models import Q

from compute.network.names import bridge_name_for
from portal.permissions import TenantOwnedQuerySet
from tenants.models import dns_label


class CompartmentQuerySet(TenantOwnedQuerySet):
    pass


class Compartment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="compartments")
    name = models.CharField(max_length=63, validators=[dns_label])
    # CIDR text ("10.200.3.0/24"): portable across SQLite and PostgreSQL; parsed by `network`.
    subnet = models.CharField(max_length=18)
    gateway = models.GenericIPAddressField(protocol="IPv4")
    nat = models.BooleanField(default=True, help_text="Masquerade traffic to the host's uplink.")
    # VXLAN network identifier, used when the compartment spans more than one host.
    vni = models.PositiveIntegerField(unique=True)
    managed_revision = models.PositiveIntegerField(null=True, blank=True)
    managed_spec_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = CompartmentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="compartment_unique_name_in_tenant"),
            # Two pool allocations racing for the same block: one wins, the other retries.
            models.UniqueConstraint(fields=["subnet"], name="compartment_unique_subnet"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    @property
    def gateway_address(self) -> IPv4Address:
        return IPv4Address(self.gateway)

    @property
    def network_id(self) -> str:
        """The id the host driver knows it by: a DNS label unique across tenants (names are not)."""
        return "c" + self.pk.hex

    @property
    def bridge(self) -> str:
        return bridge_name_for(self.network_id)


class IPAllocationQuerySet(TenantOwnedQuerySet):
    tenant_path = "compartment__tenant__"


class IPAllocation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # PROTECT: a compartment with members cannot disappear under them (the service answers 409 first).
    compartment = models.ForeignKey(Compartment, on_delete=models.PROTECT, related_name="allocations")
    workload = models.ForeignKey("compute.Workload", on_delete=models.CASCADE, related_name="ip_allocations")
    address = models.GenericIPAddressField(protocol="IPv4")
    mac = models.CharField(max_length=17)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = IPAllocationQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["compartment", "address"], name="ipallocation_unique_address"),
            models.UniqueConstraint(fields=["compartment", "workload"], name="ipallocation_one_per_workload"),
        ]

    def __str__(self) -> str:
        return f"{self.address} in {self.compartment_id}"


class Protocol(models.TextChoices):
    TCP = "tcp", "TCP"
    UDP = "udp", "UDP"


class PublishedPortQuerySet(TenantOwnedQuerySet):
    pass


class PublishedPort(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="published_ports")
    workload = models.ForeignKey("compute.Workload", on_delete=models.CASCADE, related_name="published_ports")
    # The workload's host, copied so that the database can keep host ports unique per host.
    host = models.ForeignKey("compute.Host", on_delete=models.PROTECT, related_name="published_ports")
    protocol = models.CharField(max_length=3, choices=Protocol.choices, default=Protocol.TCP)
    host_port = models.PositiveIntegerField()
    workload_port = models.PositiveIntegerField()
    managed_revision = models.PositiveIntegerField(null=True, blank=True)
    managed_spec_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = PublishedPortQuerySet.as_manager()

    class Meta:
        ordering = ["host_port", "protocol"]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "protocol", "host_port"], name="publishedport_unique_per_host"
            ),
            models.CheckConstraint(condition=Q(protocol__in=["tcp", "udp"]), name="publishedport_protocol"),
            models.CheckConstraint(
                condition=Q(host_port__gte=1, host_port__lte=65535), name="publishedport_host_port_range"
            ),
            models.CheckConstraint(
                condition=Q(workload_port__gte=1, workload_port__lte=65535),
                name="publishedport_workload_port_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.protocol}/{self.host_port} -> {self.workload_id}:{self.workload_port}"

    @property
    def connect_address(self) -> str:
        """Where clients connect: the host's address (its name when it registered none) and the port."""
        return f"{self.host.address or self.host.name}:{self.host_port}"

    def as_event(self) -> dict[str, Any]:
        return {
            "type": "published_port",
            "id": str(self.pk),
            "protocol": self.protocol,
            "host_port": self.host_port,
            "workload": str(self.workload_id),
        }


class NetworkRepairQuerySet(TenantOwnedQuerySet):
    tenant_path = "compartment__tenant__"


class NetworkRepair(models.Model):
    """A host agent found part of a compartment's network changed outside Bulkhead and restored it.

    Written by the agent's periodic re-apply (compute.management.commands.agent.repair_network); the
    desired-state reconciler reports the repairs of managed networks as drift of the tenant.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    compartment = models.ForeignKey(Compartment, on_delete=models.CASCADE, related_name="repairs")
    host = models.ForeignKey("compute.Host", on_delete=models.CASCADE, related_name="+")
    details = models.JSONField(default=list)
    at = models.DateTimeField(db_index=True)

    objects = NetworkRepairQuerySet.as_manager()

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"repair of {self.compartment_id} on {self.host_id} at {self.at}"


class EgressAllowanceQuerySet(TenantOwnedQuerySet):
    pass


class EgressAllowance(models.Model):
    """An operator's exception to the egress policy: the tenant's workloads may reach `network` although
    it is protected (an infrastructure service the tenant needs). Rows change only through
    compute.network_services.allow_egress / revoke_egress; link-local networks are never allowed."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="egress_allowances")
    # CIDR text ("192.0.2.10/32"), parsed by `ipv4_network`; never reaches a host as text.
    network = models.CharField(max_length=18)
    # Why the operator allowed it (shown to operators and the tenant; never reaches a host).
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = EgressAllowanceQuerySet.as_manager()

    class Meta:
        ordering = ["network"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "network"], name="egressallowance_unique_per_tenant"),
        ]

    def __str__(self) -> str:
        return self.network

    @property
    def ipv4_network(self) -> IPv4Network:
        return IPv4Network(self.network)
