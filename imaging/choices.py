"""Media types, platforms and limits of the image formats Bulkhead reads."""

from __future__ import annotations

from django.db import models

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP})
# Accept header for registry manifests, preferred first.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

DEFAULT_OS = "linux"
DEFAULT_ARCHITECTURE = "amd64"
DEFAULT_PLATFORM = f"{DEFAULT_OS}/{DEFAULT_ARCHITECTURE}"

# Hostile-input bounds: real manifests and configs are a few KiB; images have tens of layers.
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 128
MAX_ARCHIVE_MEMBERS = 100_000
MAX_INDEX_DEPTH = 2


class ImageSource(models.TextChoices):
    IMPORT = "import", "Imported archive"
    DIRECTORY = "directory", "Imported directory"
    PULL = "pull", "Pulled from a registry"
    TAG = "tag", "Tagged"
    PUBLISH = "publish", "Published"
    PUSH = "push", "Pushed to the built-in registry"


class ImageState(models.TextChoices):
    READY = "ready", "Ready"
    # A pushed image is an Image from its manifest's 201 on; its layers are unpacked by its operation.
    UNPACKING = "unpacking", "Unpacking layers"
