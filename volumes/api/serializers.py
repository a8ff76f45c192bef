"""Volumes API: shapes in and out."""

from __future__ import annotations

from rest_framework import serializers

from tenants.models import dns_label
from volumes.models import Snapshot, Volume, VolumeAttachment


class AttachmentSerializer(serializers.ModelSerializer):
    workload_name = serializers.CharField(source="workload.name", read_only=True)

    class Meta:
        model = VolumeAttachment
        fields = ["id", "workload", "workload_name", "path", "read_only", "created_at"]
        read_only_fields = fields


class SnapshotSerializer(serializers.ModelSerializer):
    volume_name = serializers.CharField(source="volume.name", read_only=True)

    class Meta:
        model = Snapshot
        fields = [
            "id",
            "volume",
            "volume_name",
            "name",
            "state",
            "status_message",
            "used_bytes",
            "created_at",
        ]
        read_only_fields = fields


class VolumeSerializer(serializers.ModelSerializer):
    host_name = serializers.CharField(source="host.name", read_only=True)
    size_gib = serializers.IntegerField(read_only=True)
    attachments = AttachmentSerializer(many=True, read_only=True)
    snapshots = SnapshotSerializer(many=True, read_only=True)

    class Meta:
        model = Volume
        fields = [
            "id",
            "tenant",
            "name",
            "host",
            "host_name",
            "size_bytes",
            "size_gib",
            "used_bytes",
            "used_at",
            "state",
            "status_message",
            "cloned_from",
            "attachments",
            "snapshots",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class VolumeCreateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField(required=False)
    name = serializers.CharField(max_length=63, validators=[dns_label])
    size_gib = serializers.IntegerField(min_value=1)
    host = serializers.UUIDField(required=False, help_text="Operators only: the host whose pool holds it.")


class VolumeResizeSerializer(serializers.Serializer):
    size_gib = serializers.IntegerField(min_value=1, help_text="The new size; volumes only grow.")


class AttachSerializer(serializers.Serializer):
    workload = serializers.UUIDField()
    path = serializers.CharField(max_length=255)
    read_only = serializers.BooleanField(default=False)  # type: ignore[assignment]  # a field named like DRF's own attribute


class DetachSerializer(serializers.Serializer):
    workload = serializers.UUIDField()


class SnapshotCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, validators=[dns_label])


class CloneSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, validators=[dns_label])
    size_gib = serializers.IntegerField(min_value=1, required=False)
