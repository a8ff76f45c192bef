"""Backups API: shapes in and out."""

from __future__ import annotations

from rest_framework import serializers

from backups.models import Backup, BackupSchedule


class BackupSerializer(serializers.ModelSerializer):
    dedup_ratio = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = Backup
        fields = [
            "id",
            "tenant",
            "volume",
            "volume_name",
            "volume_size_bytes",
            "snapshot",
            "snapshot_name",
            "schedule",
            "state",
            "status_message",
            "manifest",
            "files",
            "source_bytes",
            "stored_bytes",
            "new_bytes",
            "bytes_read",
            "chunks",
            "dedup_ratio",
            "verified_at",
            "verify_bad_chunks",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields


class BackupCreateSerializer(serializers.Serializer):
    volume = serializers.UUIDField()
    snapshot = serializers.UUIDField(required=False, allow_null=True)


class BackupRestoreSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    size_gib = serializers.IntegerField(required=False, min_value=1)
    host = serializers.UUIDField(required=False, allow_null=True)


class BackupScheduleSerializer(serializers.ModelSerializer):
    volume_name = serializers.CharField(source="volume.name", read_only=True)

    class Meta:
        model = BackupSchedule
        fields = [
            "id",
            "tenant",
            "volume",
            "volume_name",
            "every_hours",
            "keep_last",
            "enabled",
            "last_run_at",
        ]
        read_only_fields = ["id", "tenant", "volume_name", "last_run_at"]
