"""Images of tenants (and public ones), and the storage-level layers they are made of.

`Layer` rows describe blobs in the layer store and are not tenant data: two tenants importing the
same bytes share one row and one copy on disk. Who may *see* an image is decided only by `Image`
rows through the permission layer; `TenantLayer` records which layers a tenant has paid for.
"""

from __future__ import annotations

import uuid
from typing import Any, Self

from django.db import models
from django.db.models import Q

from imaging.choices import DEFAULT_PLATFORM, ImageSource
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
