"""A tenant's repositories as the built-in registry serves them: tags, sizes, and shared layers.

A repository is a name under `<tenant>/`: what its images are called (imported, pulled, pushed) and
what was pushed into it (tags of manifests, also artifacts that are no Image). Read-only; callers pass
a tenant the user may view (the permission layer), and every query here stays inside that tenant:
that another tenant stores the same layer is never told.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from imaging import choices as c
from imaging.models import Image, ImageLayer, Layer, RegistryBlob, RegistryTag
from tenants.models import Tenant


@dataclass
class TagRow:
    tag: str
    digest: str
    size: int  # bytes of its layers (blobs as stored)
    image: Image | None  # the Image it is (None: an artifact or index, or a tag no Image follows)
    pull: str


@dataclass
class RepositoryRow:
    name: str
    pull_prefix: str
    tags: list[TagRow] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)  # digest -> size, each layer once
    # digest -> the tenant's other repositories that hold it too
    shared_with: dict[str, list[str]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes its layers take, each counted once however many tags use it."""
        return sum(self.layers.values())

    @property
    def shared_size(self) -> int:
        return sum(self.layers[digest] for digest in self.shared_with)

    @property
    def shared_repositories(self) -> list[str]:
        return sorted({name for names in self.shared_with.values() for name in names})


def tenant_repositories(tenant: Tenant, registry_host: str) -> list[RepositoryRow]:
    """The tenant's repositories by name, each with its tags and which of its layers others share."""
    repos: dict[str, RepositoryRow] = {}

    def repo(name: str) -> RepositoryRow:
        if name not in repos:
            repos[name] = RepositoryRow(name=name, pull_prefix=f"{registry_host}/{tenant.name}/{name}")
        return repos[name]

    images = list(Image.objects.filter(tenant=tenant).select_related("operation").order_by("name", "tag"))
    layers_of: dict[Any, list[tuple[str, int]]] = defaultdict(list)
    for image_id, digest, size in (
        ImageLayer.objects.filter(image__tenant=tenant)
        .order_by("image_id", "position")
        .values_list("image_id", "layer__digest", "layer__size")
    ):
        layers_of[image_id].append((digest, size))
    tagged: set[tuple[str, str]] = set()
    for image in images:
        row = repo(image.name)
        own = layers_of.get(image.pk, [])
        # A pushed image still unpacking has no layer rows yet: its manifest's size stands in.
        size = sum(s for _, s in own) if own else image.size
        row.tags.append(
            TagRow(image.tag, image.manifest_digest, size, image, f"{row.pull_prefix}:{image.tag}")
        )
        row.layers.update(own)
        tagged.add((image.name, image.tag))
    # Pushed tags no Image follows (artifacts, indexes, an image still refused): their blobs as proved.
    blob_sizes = dict(RegistryBlob.objects.filter(tenant=tenant).values_list("digest", "size"))
    blob_sizes.update(
        Layer.objects.filter(tenant_layers__tenant=tenant).values_list("digest", "size")  # type: ignore[arg-type]
    )
    for tag in (
        RegistryTag.objects.filter(tenant=tenant).select_related("manifest").order_by("repository", "tag")
    ):
        if (tag.repository, tag.tag) in tagged:
            continue
        row = repo(tag.repository)
        manifest = tag.manifest
        layer_digests = manifest.references[1:] if manifest.media_type in c.MANIFEST_TYPES else []
        own = [(digest, blob_sizes[digest]) for digest in layer_digests if digest in blob_sizes]
        row.tags.append(
            TagRow(tag.tag, manifest.digest, sum(s for _, s in own), None, f"{row.pull_prefix}:{tag.tag}")
        )
        row.layers.update(own)
    holders: dict[str, set[str]] = defaultdict(set)
    for row in repos.values():
        for digest in row.layers:
            holders[digest].add(row.name)
    for row in repos.values():
        for digest in row.layers:
            others = sorted(holders[digest] - {row.name})
            if others:
                row.shared_with[digest] = others
    for row in repos.values():
        row.tags.sort(key=lambda t: t.tag)
    return [repos[name] for name in sorted(repos)]
