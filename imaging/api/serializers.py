"""Image API shapes. Request serializers only parse; services decide."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from imaging.models import Image, ImageLayer, pull_reference


class ImageLayerSerializer(serializers.ModelSerializer):
    digest = serializers.CharField(source="layer.digest")
    diff_id = serializers.CharField(source="layer.diff_id")
    size = serializers.IntegerField(source="layer.size")
    unpacked_size = serializers.IntegerField(source="layer.unpacked_size")
    media_type = serializers.CharField(source="layer.media_type")
    shared = serializers.SerializerMethodField(help_text="Another image you can see uses this layer too.")

    class Meta:
        model = ImageLayer
        fields = ["position", "digest", "diff_id", "size", "unpacked_size", "media_type", "shared"]

    def get_shared(self, obj: ImageLayer) -> bool:
        return obj.layer_id in self.context.get("shared_layers", set())


class ImageSerializer(serializers.ModelSerializer):
    tenant_name = serializers.SerializerMethodField()
    public = serializers.SerializerMethodField()
    pull_reference = serializers.SerializerMethodField(
        help_text="Where podman or skopeo pull it from the built-in registry (an API token is the password)."
    )
    layers = ImageLayerSerializer(source="image_layers", many=True, read_only=True)
    state = serializers.SerializerMethodField(
        help_text="ready; unpacking (a pushed image whose layers its operation is unpacking: workloads "
        "cannot use it yet); failed (its unpacking ended without it)."
    )
    progress = serializers.SerializerMethodField(help_text="Percent of the unpacking done (100 when ready).")

    class Meta:
        model = Image
        fields = [
            "id",
            "tenant",
            "tenant_name",
            "public",
            "name",
            "tag",
            "reference",
            "pull_reference",
            "manifest_digest",
            "config_digest",
            "platform",
            "size",
            "source",
            "source_reference",
            "state",
            "operation",
            "progress",
            "config",
            "layers",
            "created_at",
        ]
        read_only_fields = fields

    def get_pull_reference(self, obj: Image) -> str | None:
        request = self.context.get("request")
        return pull_reference(obj, request.get_host()) if request is not None else None

    def get_state(self, obj: Image) -> str:
        return "failed" if obj.unpack_failed else obj.state

    def get_progress(self, obj: Image) -> int:
        if obj.ready:
            return 100
        return obj.operation.progress if obj.operation is not None else 0

    def get_tenant_name(self, obj: Image) -> str | None:
        return obj.tenant.name if obj.tenant is not None else None

    def get_public(self, obj: Image) -> bool:
        return obj.tenant_id is None


class ImportSerializer(serializers.Serializer):
    archive = serializers.FileField(
        required=False,
        help_text="An OCI image layout as a tar (skopeo oci-archive) or a docker-save archive.",
    )
    directory = serializers.CharField(
        required=False, help_text="Operators: an OCI layout directory on the server."
    )
    name = serializers.CharField(max_length=200)
    tag = serializers.CharField(max_length=128, default="latest")
    tenant = serializers.UUIDField(
        required=False, allow_null=True, help_text="Omit (operators) for a public image."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs.get("archive")) == bool(attrs.get("directory")):
            raise serializers.ValidationError(
                {"archive": ["Upload an archive (or, operators, name a directory)."]}
            )
        return attrs


class PullSerializer(serializers.Serializer):
    reference = serializers.CharField(max_length=500, help_text="host[:port]/repository[:tag|@sha256:...]")
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    tag = serializers.CharField(max_length=128, required=False, allow_blank=True)
    tenant = serializers.UUIDField(required=False, allow_null=True)
    username = serializers.CharField(max_length=200, required=False, allow_blank=True)
    password = serializers.CharField(
        max_length=2000, required=False, allow_blank=True, write_only=True, style={"input_type": "password"}
    )


class TagSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    tag = serializers.CharField(max_length=128)


class StoreUsageSerializer(serializers.Serializer):
    tenants = serializers.ListField(child=serializers.DictField())
    store = serializers.DictField(required=False)
    database = serializers.DictField(required=False)
