from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from rest_framework import serializers

from portal.models import Operation, OperationLogEntry
from portal.permissions import acts_as_operator
from tenants.choices import Role
from tenants.models import ApiToken, AuditEntry, Membership, Quota, Secret, Tenant, dns_label


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
    """An operation; `operator_details` (the real error, store figures) only for operators."""

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
            "operator_details",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Operation) -> dict[str, Any]:
        data = super().to_representation(instance)
        request = self.context.get("request")
        if request is None or not acts_as_operator(request.user):
            data.pop("operator_details", None)
        return data


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


class SecretSerializer(serializers.ModelSerializer):
    """A secret as every role sees it: its name and that it is set, never its value."""

    value = serializers.SerializerMethodField(
        method_name="value_shown", help_text='Always "set": values are write-only.'
    )
    used_by = serializers.SerializerMethodField(help_text="Workloads whose environment refers to it.")

    class Meta:
        model = Secret
        fields = ["id", "tenant", "name", "value", "used_by", "created_at", "updated_at"]
        read_only_fields = fields

    def value_shown(self, secret: Secret) -> str:
        return "set"

    def get_used_by(self, secret: Secret) -> list[str]:
        from tenants.services import workloads_using

        return workloads_using(secret)


class SecretCreateSerializer(serializers.Serializer):
    tenant = serializers.UUIDField(required=False)
    name = serializers.CharField(max_length=63)
    value = serializers.CharField(write_only=True, trim_whitespace=False, style={"input_type": "password"})


class SecretValueSerializer(serializers.Serializer):
    value = serializers.CharField(write_only=True, trim_whitespace=False, style={"input_type": "password"})
