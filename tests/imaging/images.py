"""Builders of test images: real layer tars written as OCI layouts, OCI archives and docker archives.

Everything is deterministic (fixed mtimes, sorted entries), so building twice gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "true", "sleep", "env")


@dataclass
class Entry:
    data: bytes = b""
    symlink: str = ""
    mode: int = 0o644


@dataclass
class BuiltLayer:
    tar: bytes  # uncompressed
    blob: bytes  # as stored (gzip or plain)
    media_type: str

    @property
    def digest(self) -> str:
        return digest_of(self.blob)

    @property
    def diff_id(self) -> str:
        return digest_of(self.tar)


@dataclass
class BuiltImage:
    layers: list[BuiltLayer]
    config: bytes
    manifest: bytes
    index: bytes
    extra_blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def manifest_digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def config_digest(self) -> str:
        return digest_of(self.config)

    def blobs(self) -> dict[str, bytes]:
        out = {self.config_digest: self.config, self.manifest_digest: self.manifest}
        out.update({layer.digest: layer.blob for layer in self.layers})
        out.update(self.extra_blobs)
        return out


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: dict[str, Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(entries):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            entry = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if entry.symlink:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.symlink, 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(entry.data), entry.mode
                tar.addfile(info, io.BytesIO(entry.data))
    return buf.getvalue()


def make_layer(entries: dict[str, Entry], compress: bool = True) -> BuiltLayer:
    tar = layer_tar(entries)
    if compress:
        blob = gzip.compress(tar, mtime=0)
        return BuiltLayer(tar, blob, "application/vnd.oci.image.layer.v1.tar+gzip")
    return BuiltLayer(tar, tar, "application/vnd.oci.image.layer.v1.tar")


def busybox_layers(marker: str = "bulkhead") -> list[BuiltLayer]:
    """A busybox-static rootfs (binary + applet symlinks) and a small layer on top."""
    base = {"bin/busybox": Entry(BUSYBOX.read_bytes(), mode=0o755)}
    base.update({f"bin/{applet}": Entry(symlink="busybox") for applet in APPLETS})
    top = {"etc/hostname": Entry(f"{marker}\n".encode()), "etc/motd": Entry(b"hello from a test image\n")}
    return [make_layer(base), make_layer(top)]


def many_files_layers(files: int = 3000) -> list[BuiltLayer]:
    """A larger image: many small files spread over directories, in three layers."""
    layers = []
    for n in range(3):
        entries = {
            f"data/l{n}/d{i % 50:02d}/f{i:05d}.txt": Entry(f"layer {n} file {i}\n".encode() * (1 + i % 7))
            for i in range(files // 3)
        }
        layers.append(make_layer(entries))
    return layers


def build_image(
    layers: list[BuiltLayer],
    *,
    cmd: tuple[str, ...] = ("/bin/sh",),
    env: tuple[str, ...] = ("PATH=/bin",),
    architecture: str = "amd64",
    diff_ids: list[str] | None = None,
) -> BuiltImage:
    config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Cmd": list(cmd),
                "Env": list(env),
                "WorkingDir": "/",
                "ExposedPorts": {"8080/tcp": {}},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [layer.diff_id for layer in layers]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.blob)}
                for layer in layers
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest_of(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
    ).encode()
    return BuiltImage(layers=layers, config=config, manifest=manifest, index=index)


def write_layout(image: BuiltImage, directory: Path) -> Path:
    """An OCI image layout directory (what `skopeo copy ... oci:` writes)."""
    (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_bytes(image.index)
    for digest, data in image.blobs().items():
        (directory / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return directory


def tar_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def oci_archive_members(image: BuiltImage) -> list[tuple[str, bytes]]:
    members = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", image.index)]
    members += [(f"blobs/sha256/{d.removeprefix('sha256:')}", data) for d, data in image.blobs().items()]
    return members


def write_oci_archive(image: BuiltImage, path: Path) -> Path:
    """An OCI layout as a tar (what `skopeo copy ... oci-archive:` writes)."""
    return tar_members(path, oci_archive_members(image))


def write_docker_archive(image: BuiltImage, path: Path, repo_tag: str = "test/busybox:1") -> Path:
    """A legacy `docker save` archive: <id>/layer.tar (uncompressed), <config>.json, manifest.json."""
    config_name = image.config_digest.removeprefix("sha256:") + ".json"
    layer_names = [f"{layer.diff_id.removeprefix('sha256:')[:32]}/layer.tar" for layer in image.layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]).encode()
    members = [(config_name, image.config)]
    members += [(name, layer.tar) for name, layer in zip(layer_names, image.layers, strict=True)]
    members.append(("manifest.json", manifest))
    return tar_members(path, members)


# --- fixtures and helpers shared by tests/imaging/test_images_*.py -----------------------------------

import pytest  # noqa: E402


@pytest.fixture
def store_dir(settings: object, tmp_path: Path) -> Path:
    """A private layer store for the test (the API, in-process tasks and the worker all use it)."""
    directory = tmp_path / "store"
    settings.BULKHEAD_STORE_DIR = directory  # type: ignore[attr-defined]
    return directory


def post_archive(client: object, path: Path, *, name: str, tag: str, tenant: object = None) -> object:
    data: dict[str, object] = {"name": name, "tag": tag}
    if tenant is not None:
        data["tenant"] = str(tenant.pk)  # type: ignore[attr-defined]
    with open(path, "rb") as f:
        data["archive"] = f
        return client.post("/api/v1/images/import/", data, format="multipart")  # type: ignore[attr-defined]


def run_inline(op_id: str) -> object:
    """Run an operation's task in this process (its on-commit send never fires inside a test)."""
    from imaging import tasks
    from portal.models import Operation

    op = Operation.objects.get(pk=op_id)
    task = {
        "image.import": tasks.import_image,
        "image.pull": tasks.pull_image,
        "store.gc": tasks.gc_store,
        "image.push": tasks.push_image,
    }
    task[op.kind].apply(args=[op_id])
    op.refresh_from_db()
    return op


def db_image(tenant: object, name: str, tag: str = "1", layer_seeds: tuple[str, ...] = ("a", "b")) -> object:
    """Image rows without store content (for API and permission tests)."""
    from imaging.models import Image, ImageLayer, Layer, TenantLayer

    image = Image.objects.create(
        tenant=tenant,
        name=name,
        tag=tag,
        manifest_digest=digest_of(f"m-{name}-{tag}".encode()),
        config_digest=digest_of(f"c-{name}-{tag}".encode()),
        config={"cmd": ["/bin/sh"]},
        size=100 * len(layer_seeds),
    )
    for position, seed in enumerate(layer_seeds):
        layer, _ = Layer.objects.get_or_create(
            digest=digest_of(f"layer-{seed}".encode()),
            defaults={"diff_id": digest_of(f"diff-{seed}".encode()), "size": 100, "media_type": "x"},
        )
        ImageLayer.objects.create(image=image, layer=layer, position=position)
        if tenant is not None:
            TenantLayer.objects.get_or_create(tenant=tenant, layer=layer)
    return image


def write_multiarch_layout(images: dict[str, BuiltImage], directory: Path) -> tuple[Path, str]:
    """An OCI layout whose index.json names an image index of several platforms ("os/arch")."""
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": image.manifest_digest,
                    "size": len(image.manifest),
                    "platform": {"os": platform.split("/")[0], "architecture": platform.split("/")[1]},
                }
                for platform, image in images.items()
            ],
        }
    ).encode()
    top = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": digest_of(index),
                    "size": len(index),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
    ).encode()
    (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_bytes(top)
    for image in images.values():
        for digest, data in image.blobs().items():
            (directory / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    (directory / "blobs" / "sha256" / digest_of(index).removeprefix("sha256:")).write_bytes(index)
    return directory, digest_of(index)
