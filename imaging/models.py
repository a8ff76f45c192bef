"""Images of tenants (and public ones), and the storage-level layers they are made of.

`Layer` rows describe blobs in the layer store and are not tenant data: two tenants importing the
same bytes share one row and one copy on disk. Who may *see* an image is decided only by `Image`
rows through the permission layer; `TenantLayer` records which layers a tenant has paid for.
"""

from __future__ import annotations

import uuid
from typing import Any, Self

from django.conf import settings
from django.db import models
from django.db.models import Q

from imaging.choices import DEFAULT_PLATFORM, ImageSource, ImageState
from portal.permissions import Action, TenantOwnedQuerySet, acts_as_operator


class Layer(models.Model):
    digest = models.CharField(max_length=80, unique=True, help_text="Digest of the (compressed) blob.")
    diff_id = models.CharField(max_length=80, db_index=True, help_text="Digest of the uncompressed tar.")
    size = models.PositiveBigIntegerField(help_text="Bytes of the blob.")
    unpacked_size = models.PositiveBigIntegerField(default=0)
    media_type = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["digest"]

    def __str__(self) -> str:
        return self.digest[:19]


class ImageQuerySet(TenantOwnedQuerySet):
    def for_user(self, user: Any, action: Action = "view") -> Self:
        """The tenant permission layer, plus public images readable by every signed-in user."""
        own = super().for_user(user, action)
        if action != "view" or user is None or not user.is_authenticated or acts_as_operator(user):
            return own
        return self.filter(Q(pk__in=own.values("pk")) | Q(tenant__isnull=True))


class Image(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Null: a public image, published by an operator, readable by everybody signed in.
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="images"
    )
    name = models.CharField(max_length=200)
    tag = models.CharField(max_length=128)
    manifest_digest = models.CharField(max_length=80)
    config_digest = models.CharField(max_length=80)
    platform = models.CharField(max_length=64, default=DEFAULT_PLATFORM)
    config = models.JSONField(default=dict, blank=True)
    layers: models.ManyToManyField[Layer, ImageLayer] = models.ManyToManyField(
        Layer, through="ImageLayer", related_name="images"
    )
    size = models.PositiveBigIntegerField(default=0)
    source = models.CharField(max_length=16, choices=ImageSource.choices, default=ImageSource.IMPORT)
    source_reference = models.CharField(max_length=500, blank=True)
    # `unpacking`: listed, but no workload may use it until its operation unpacked the layers.
    state = models.CharField(max_length=16, choices=ImageState.choices, default=ImageState.READY)
    # The operation that unpacks a pushed image's layers (its progress is the image's).
    operation = models.ForeignKey(
        "portal.Operation", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ImageQuerySet.as_manager()

    class Meta:
        ordering = ["name", "tag"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name", "tag"], name="image_unique_name_tag"),
            # NULLs are distinct in a unique index: public images need their own.
            models.UniqueConstraint(
                fields=["name", "tag"], condition=Q(tenant__isnull=True), name="public_image_unique_name_tag"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def ready(self) -> bool:
        return self.state == ImageState.READY

    @property
    def unpack_failed(self) -> bool:
        """An unpacking image whose operation ended without it (a lost worker, a cancel)."""
        op = self.operation
        return not self.ready and (op is None or op.finished)


class ImageLayer(models.Model):
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="image_layers")
    layer = models.ForeignKey(Layer, on_delete=models.PROTECT, related_name="image_layers")
    position = models.PositiveIntegerField()

    class Meta:
        ordering = ["image", "position"]
        constraints = [
            models.UniqueConstraint(fields=["image", "position"], name="image_layer_position"),
        ]

    def __str__(self) -> str:
        return f"{self.image} #{self.position}: {self.layer}"


class TenantLayer(models.Model):
    """A layer a tenant holds: its image_bytes quota counts each one once."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="held_layers")
    layer = models.ForeignKey(Layer, on_delete=models.PROTECT, related_name="tenant_layers")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "layer"]
        constraints = [models.UniqueConstraint(fields=["tenant", "layer"], name="tenant_layer_once")]

    def __str__(self) -> str:
        return f"{self.layer} of {self.tenant}"


# --- the built-in registry's own metadata -------------------------------------------------------------
# Names here are repositories within a tenant (`<tenant>/<repository>` on the wire; tenant null: the
# public `library/` namespace). Queries reach these rows only after `imaging.distribution.access` granted
# the caller the repository's action, through the same role rules as the permission layer.


class RegistryBlob(models.Model):
    """A blob a tenant proved it has, by uploading its bytes into (or mounting it within) a repository.

    What lets the tenant's manifests reference the blob and the repository serve it; gc keeps it. Until
    an image of the tenant holds it as a layer (`TenantLayer`), its size counts against what is left of
    the tenant's `image_bytes` for further uploads, so pushes cannot outgrow the quota before a tag.
    """

    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="registry_blobs"
    )
    repository = models.CharField(max_length=255)
    digest = models.CharField(max_length=80)
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "repository", "digest"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "repository", "digest"], name="registry_blob_once"),
        ]

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest[:19]}"


class RegistryManifest(models.Model):
    """A manifest or index pushed to a repository: pullable by digest at once, whatever it describes."""

    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="registry_manifests"
    )
    repository = models.CharField(max_length=255)
    digest = models.CharField(max_length=80)
    media_type = models.CharField(max_length=200)
    size = models.PositiveBigIntegerField()
    # Digests of the blobs (config, layers) or manifests (an index's) it references.
    references = models.JSONField(default=list, blank=True)
    # The referrers API: the manifest this one is about (a signature's or an SBOM's image), its artifact
    # type and annotations, as the manifest says them.
    subject = models.CharField(max_length=80, blank=True, db_index=True)
    artifact_type = models.CharField(max_length=255, blank=True)
    annotations = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "repository", "digest"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "repository", "digest"], name="registry_manifest_once"),
        ]

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest[:19]}"


class RegistryTag(models.Model):
    """A tag of a repository naming a pushed manifest (moved by the next push of the same tag)."""

    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="registry_tags"
    )
    repository = models.CharField(max_length=255)
    tag = models.CharField(max_length=128)
    manifest = models.ForeignKey(RegistryManifest, on_delete=models.CASCADE, related_name="tags")
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "repository", "tag"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "repository", "tag"], name="registry_tag_once"),
        ]

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}"


class RegistryUpload(models.Model):
    """An upload session: its bytes grow in the store's ingest area (gc keeps files touched within a
    day); abandoned sessions expire (`imaging.distribution.services.expire_uploads`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="registry_uploads"
    )
    repository = models.CharField(max_length=255)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Bytes of the quota's room this session holds while a request writes into it (reserved under the
    # quota row lock before the first byte, so parallel requests cannot each take the whole room).
    reserved = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"upload {self.id} to {self.repository}"


def repository_name(image: Image) -> str:
    """The image's repository in the built-in registry: `<tenant>/<name>` (`library/` for public images)."""
    from imaging.distribution.access import PUBLIC_NAMESPACE

    namespace = image.tenant.name if image.tenant is not None else PUBLIC_NAMESPACE
    return f"{namespace}/{image.name}"


def pull_reference(image: Image, registry_host: str) -> str:
    """Where OCI clients pull an image from the built-in registry: `<host>/<tenant>/<name>:<tag>`."""
    return f"{registry_host}/{repository_name(image)}:{image.tag}"
