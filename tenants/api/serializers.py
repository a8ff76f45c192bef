from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework import serializers

from portal.models import Operation, OperationLogEntry
from tenants.choices import Role
from tenants.models import ApiToken, AuditEntry, Membership, Quota, Tenant, dns_label


class TenantSerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=63, validators=[dns_label])

    class Meta:
        model = Tenant
        fields = ["id", "name", "display_name", "allow_privileged_containers", "created_at"]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {
            "allow_privileged_containers": {
                "help_text": "Operators only: the tenant's containers may ask `privileged: true` "
                "(no user namespace: container root is host root)."
            }
        }


class TenantCreateSerializer(TenantSerializer):
    owner = serializers.SlugRelatedField(
        slug_field="username", queryset=get_user_model().objects.all(), required=False, allow_null=True
    )

    class Meta(TenantSerializer.Meta):
        fields = [*TenantSerializer.Meta.fields, "owner"]


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")
    tenant_name = serializers.CharField(source="tenant.name", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "tenant", "tenant_name", "username", "role", "created_at"]
        read_only_fields = ["id", "tenant_name", "created_at"]


class MembershipCreateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField()
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)


class MembershipUpdateSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)


class ApiTokenSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "username",
            "prefix",
            "tenant",
            "read_only",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "created_at",
        ]
        read_only_fields = ["id", "username", "prefix", "last_used_at", "revoked_at", "created_at"]


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    secret = serializers.SerializerMethodField(help_text="Shown once; only its hash is stored.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "secret"]

    def get_secret(self, obj: Any) -> str:
        return str(self.context["secret"])


class QuotaSerializer(serializers.ModelSerializer):
    tenant_name = serializers.CharField(source="tenant.name", read_only=True)

    class Meta:
        model = Quota
        fields = [
            "id",
            "tenant",
            "tenant_name",
            *Quota.RESOURCES,
            *(f"used_{r}" for r in Quota.RESOURCES),
        ]
        read_only_fields = ["id", "tenant", "tenant_name", *(f"used_{r}" for r in Quota.RESOURCES)]


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "time",
            "actor",
            "actor_label",
            "actor_token",
            "tenant",
            "action",
            "object_type",
            "object_id",
            "outcome",
            "request_id",
            "source_address",
            "details",
        ]
        read_only_fields = fields


class OperationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Operation
        fields = [
            "id",
            "kind",
            "tenant",
            "target_type",
            "target_id",
            "target_label",
            "state",
            "progress",
            "message",
            "error",
            "result",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class UserSerializer(serializers.ModelSerializer):
    password = serializers.CharField(write_only=True, min_length=10, style={"input_type": "password"})

    class Meta:
        model = get_user_model()
        fields = ["id", "username", "email", "is_staff", "is_active", "password"]
        read_only_fields = ["id", "is_active"]


class PasswordChangeSerializer(serializers.Serializer):
    old_password = serializers.CharField(write_only=True, style={"input_type": "password"})
    new_password = serializers.CharField(write_only=True, min_length=10, style={"input_type": "password"})


class OperationLogEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = OperationLogEntry
        fields = ["at", "event", "progress", "message"]


class OperationLogSerializer(serializers.Serializer):
    operation = OperationSerializer()
    entries = OperationLogEntrySerializer(many=True)


class UserUpdateSerializer(serializers.Serializer):
    email = serializers.EmailField(required=False, allow_blank=True)
    is_staff = serializers.BooleanField(required=False)
    is_active = serializers.BooleanField(required=False)
    password = serializers.CharField(write_only=True, required=False, min_length=10)
