from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from compute.choices import HostLostPolicy, Isolation, RestartPolicy
from compute.compartments import Compartment, EgressAllowance, IPAllocation, Protocol, PublishedPort
from compute.models import Host, Workload
from tenants.models import dns_label


class HostSerializer(serializers.ModelSerializer):
    queue = serializers.CharField(read_only=True)
    vcpu_capacity = serializers.DecimalField(max_digits=8, decimal_places=2, read_only=True)
    memory_capacity_mib = serializers.IntegerField(read_only=True)
    usage = serializers.SerializerMethodField()

    class Meta:
        model = Host
        fields = [
            "id",
            "name",
            "address",
            "state",
            "facts",
            "cpus",
            "memory_mib",
            "cpu_overcommit",
            "memory_overcommit",
            "labels",
            "oci_runtime_override",
            "domain_type_override",
            "pinned_only",
            "last_heartbeat",
            "removed_at",
            "queue",
            "vcpu_capacity",
            "memory_capacity_mib",
            "usage",
            "created_at",
        ]
        read_only_fields = [
            "id",
            "name",
            "address",
            "facts",
            "cpus",
            "memory_mib",
            "last_heartbeat",
            "removed_at",
            "created_at",
        ]

    def get_usage(self, host: Host) -> dict[str, Any]:
        usage = self.context.get("usage", {}).get(host.pk)
        if usage is None:
            return {"vcpus": "0", "memory_mib": 0, "disk_gib": 0, "workloads": 0}
        return usage


class HostStateSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["ready", "draining", "maintenance"])


class JoinTokenRequestSerializer(serializers.Serializer):
    host_name = serializers.CharField(max_length=63, validators=[dns_label])
    labels = serializers.DictField(child=serializers.CharField(max_length=200), required=False)
    cpu_overcommit = serializers.DecimalField(
        max_digits=5, decimal_places=2, required=False, min_value=Decimal("0.1")
    )
    memory_overcommit = serializers.DecimalField(
        max_digits=5, decimal_places=2, required=False, min_value=Decimal("0.1")
    )
    oci_runtime_override = serializers.ChoiceField(choices=["", "runc", "crun"], required=False)
    domain_type_override = serializers.ChoiceField(choices=["", "kvm", "qemu"], required=False)


class JoinSerializer(serializers.Serializer):
    token = serializers.CharField(max_length=200)
    facts = serializers.DictField()


class VolumeMountRequestSerializer(serializers.Serializer):
    volume = serializers.CharField(max_length=63, help_text="The volume's name or id.")
    path = serializers.CharField(max_length=255, help_text="Absolute path inside the workload.")
    read_only = serializers.BooleanField(default=False)  # type: ignore[assignment]  # a field named like DRF's own attribute


class VolumeAttachmentBriefSerializer(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    volume = serializers.UUIDField(source="volume_id", read_only=True)
    volume_name = serializers.CharField(source="volume.name", read_only=True)
    path = serializers.CharField(read_only=True)
    read_only = serializers.BooleanField(read_only=True)  # type: ignore[assignment]  # a field named like DRF's own attribute


class WorkloadSerializer(serializers.ModelSerializer):
    host_name = serializers.CharField(source="host.name", read_only=True, default=None)
    image_reference = serializers.CharField(source="image.__str__", read_only=True)
    volumes = VolumeAttachmentBriefSerializer(source="volume_attachments", many=True, read_only=True)

    class Meta:
        model = Workload
        fields = [
            "id",
            "tenant",
            "name",
            "image",
            "image_reference",
            "isolation",
            "command",
            "args",
            "env",
            "secret_env",
            "workdir",
            "user",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "restart_policy",
            "on_host_lost",
            "privileged",
            "host",
            "host_name",
            "state",
            "desired_running",
            "exit_code",
            "status_message",
            "restart_count",
            "volumes",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class WorkloadProcessSerializer(serializers.Serializer):
    """The process fields a create sets and an update may change."""

    command = serializers.ListField(
        child=serializers.CharField(max_length=4096), required=False, allow_null=True, max_length=256
    )
    args = serializers.ListField(
        child=serializers.CharField(max_length=4096), required=False, allow_null=True, max_length=256
    )
    env = serializers.DictField(
        child=serializers.CharField(max_length=8192, allow_blank=True), required=False
    )
    secret_env = serializers.DictField(
        child=serializers.CharField(max_length=63),
        required=False,
        help_text="Variables whose values are the tenant's secrets: {NAME: secret name}. The workload "
        "gets the value when it starts; nobody reads it back.",
    )
    workdir = serializers.CharField(max_length=4096, required=False, allow_blank=True)
    user = serializers.CharField(max_length=64, required=False, allow_blank=True)

    def validate_secret_env(self, refs: dict[str, str]) -> dict[str, str]:
        if len(refs) > 256:
            raise serializers.ValidationError("At most 256 variables.")
        return refs

    def validate_env(self, env: dict[str, str]) -> dict[str, str]:
        if len(env) > 256:
            raise serializers.ValidationError("At most 256 variables.")
        return env


class WorkloadCreateSerializer(WorkloadProcessSerializer):
    tenant = serializers.UUIDField(required=False)
    name = serializers.CharField(max_length=63, validators=[dns_label])
    image = serializers.UUIDField()
    isolation = serializers.ChoiceField(choices=Isolation.choices, default=Isolation.NAMESPACE)
    vcpus = serializers.DecimalField(max_digits=5, decimal_places=2, default=Decimal(1))
    memory_mib = serializers.IntegerField(default=256)
    disk_gib = serializers.IntegerField(default=1, help_text="Size of the writable layer or disk (GiB).")
    restart_policy = serializers.ChoiceField(choices=RestartPolicy.choices, default=RestartPolicy.NEVER)
    on_host_lost = serializers.ChoiceField(
        choices=HostLostPolicy.choices,
        default=HostLostPolicy.WAIT,
        help_text="reschedule: when its host is lost, run it on another host (fresh from its image).",
    )
    start = serializers.BooleanField(default=True)
    privileged = serializers.BooleanField(
        default=False,
        help_text="Run without a user namespace (container root is host root). Only in tenants an "
        "operator allowed it for; refused (403) otherwise.",
    )
    host = serializers.UUIDField(required=False, help_text="Operators only: pin to a host.")
    # issue 7: compartments to join, by name or id (omitted: "default"; []: no network).
    compartments = serializers.ListField(
        child=serializers.CharField(max_length=63), required=False, allow_null=True, max_length=8
    )
    # issue 17: volumes to attach, by name or id; the workload is placed on their host.
    volumes = serializers.ListField(child=VolumeMountRequestSerializer(), required=False, max_length=16)


class WorkloadUpdateSerializer(WorkloadProcessSerializer):
    """Fields a PATCH may change in place; a running workload picks process changes up when restarted."""

    vcpus = serializers.DecimalField(max_digits=5, decimal_places=2, required=False)
    memory_mib = serializers.IntegerField(required=False)
    restart_policy = serializers.ChoiceField(choices=RestartPolicy.choices, required=False)
    on_host_lost = serializers.ChoiceField(choices=HostLostPolicy.choices, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(self.initial_data) - set(self.fields) if isinstance(self.initial_data, dict) else set()
        if unknown:
            raise serializers.ValidationError(
                {name: ["This field cannot be changed in place."] for name in sorted(unknown)}
            )
        return attrs


class CommitSerializer(serializers.Serializer):
    name = serializers.RegexField(r"^[a-z0-9]+([._/-][a-z0-9]+)*$", max_length=200)
    tag = serializers.RegexField(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class StopSerializer(serializers.Serializer):
    grace_seconds = serializers.IntegerField(default=10, min_value=0, max_value=600)


# --- issue 7: compartments and published ports ---------------------------------------------------


class CompartmentSerializer(serializers.ModelSerializer):
    bridge = serializers.CharField(read_only=True)
    members = serializers.SerializerMethodField()

    class Meta:
        model = Compartment
        fields = [
            "id",
            "tenant",
            "name",
            "subnet",
            "gateway",
            "nat",
            "vni",
            "bridge",
            "members",
            "created_at",
        ]
        read_only_fields = fields

    def get_members(self, compartment: Compartment) -> int:
        return compartment.allocations.count()


class EgressAllowanceSerializer(serializers.ModelSerializer):
    class Meta:
        model = EgressAllowance
        fields = ["id", "tenant", "network", "note", "created_at"]
        read_only_fields = fields
        extra_kwargs = {
            "network": {
                "help_text": "An IPv4 network (CIDR) the tenant's workloads may reach, protected or not."
            }
        }


class EgressAllowanceCreateSerializer(serializers.Serializer):
    """Documentation only: the service validates (after refusing anyone but an operator)."""

    network = serializers.CharField(
        help_text="IPv4 network in CIDR form, e.g. 192.0.2.10/32. Link-local (169.254.0.0/16) never."
    )
    note = serializers.CharField(required=False, allow_blank=True, help_text="Why (at most 200 characters).")


class PublishedPortSerializer(serializers.ModelSerializer):
    workload_name = serializers.CharField(source="workload.name", read_only=True)
    host_name = serializers.CharField(source="host.name", read_only=True)
    host_address = serializers.CharField(source="host.address", read_only=True, default=None)

    class Meta:
        model = PublishedPort
        fields = [
            "id",
            "tenant",
            "workload",
            "workload_name",
            "host",
            "host_name",
            "host_address",
            "protocol",
            "host_port",
            "workload_port",
            "created_at",
        ]
        read_only_fields = fields


class CompartmentMemberSerializer(serializers.ModelSerializer):
    workload_name = serializers.CharField(source="workload.name", read_only=True)
    host_name = serializers.CharField(source="workload.host.name", read_only=True, default=None)
    state = serializers.CharField(source="workload.state", read_only=True)

    class Meta:
        model = IPAllocation
        fields = ["workload", "workload_name", "host_name", "state", "address", "mac"]
        read_only_fields = fields


class CompartmentDetailSerializer(CompartmentSerializer):
    addresses = serializers.SerializerMethodField()
    published_ports = serializers.SerializerMethodField()

    class Meta(CompartmentSerializer.Meta):
        fields = [*CompartmentSerializer.Meta.fields, "addresses", "published_ports"]
        read_only_fields = fields

    def get_addresses(self, compartment: Compartment) -> list[dict[str, Any]]:
        allocations = compartment.allocations.select_related("workload", "workload__host").order_by("address")
        return list(CompartmentMemberSerializer(allocations, many=True).data)

    def get_published_ports(self, compartment: Compartment) -> list[dict[str, Any]]:
        ports = PublishedPort.objects.filter(
            workload__ip_allocations__compartment=compartment
        ).select_related("workload", "host")
        return list(PublishedPortSerializer(ports, many=True).data)


class CompartmentCreateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField(required=False)
    name = serializers.CharField(max_length=63, validators=[dns_label])
    subnet = serializers.CharField(
        max_length=18, required=False, help_text="CIDR, e.g. 10.20.0.0/24; omitted: the next free pool block."
    )
    prefix_length = serializers.IntegerField(required=False, min_value=16, max_value=29)
    nat = serializers.BooleanField(default=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("subnet") and attrs.get("prefix_length"):
            raise serializers.ValidationError(
                {"prefix_length": ["Give a subnet or a prefix length, not both."]}
            )
        return attrs


class PublishedPortCreateSerializer(serializers.Serializer):
    workload = serializers.UUIDField()
    workload_port = serializers.IntegerField(min_value=1, max_value=65535)
    protocol = serializers.ChoiceField(choices=Protocol.choices, default=Protocol.TCP)
    host_port = serializers.IntegerField(required=False, min_value=1, max_value=65535)
