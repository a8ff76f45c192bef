"""Reading OCI image layouts, docker-save archives and manifests: pure functions over hostile input.

Nothing here writes to disk or touches the database. An archive is read in place (tar members are
streamed, never extracted); every name, size and digest is checked before anyone trusts it, and
every failure is an `ImageFormatError` with a message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imaging import choices as c
from portal.errors import Explained

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1024 * 1024


class ImageFormatError(Explained):
    """The archive, layout or manifest is malformed, incomplete or unsafe."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: str = ""
    ref_name: str = ""


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: tuple[str, ...]
    os: str
    architecture: str
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def platform(self) -> str:
        return f"{self.os}/{self.architecture}"


@dataclass(frozen=True)
class ImagePlan:
    """What an archive or registry says an image is, checked for consistency, before any byte is kept."""

    manifest_digest: str
    manifest_bytes: bytes
    manifest: Manifest
    config_bytes: bytes
    config: ImageConfig

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.manifest.layers)


def check_digest(value: Any, what: str = "digest") -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ImageFormatError(f"Invalid {what} {str(value)[:100]!r}: only sha256 digests are supported.")
    return value


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_json(data: bytes, what: str) -> Any:
    if len(data) > c.MAX_JSON_BYTES:
        raise ImageFormatError(f"The {what} is {len(data)} bytes; at most {c.MAX_JSON_BYTES} are accepted.")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"The {what} is not valid JSON: {exc}") from None


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ImageFormatError(f"A {what} descriptor is not an object.")
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageFormatError(f"A {what} descriptor has an invalid size.")
    media_type = raw.get("mediaType", "")
    if not isinstance(media_type, str):
        raise ImageFormatError(f"A {what} descriptor has an invalid media type.")
    platform = raw.get("platform") or {}
    plat = ""
    if isinstance(platform, dict) and platform.get("os"):
        plat = f"{platform.get('os')}/{platform.get('architecture', '')}"
        if platform.get("variant"):
            plat += f"/{platform['variant']}"
    annotations = raw.get("annotations") or {}
    ref_name = (
        annotations.get("org.opencontainers.image.ref.name", "") if isinstance(annotations, dict) else ""
    )
    return Descriptor(
        media_type=media_type,
        digest=check_digest(raw.get("digest"), f"{what} digest"),
        size=size,
        platform=plat,
        ref_name=str(ref_name),
    )


def descriptor(raw: Any, what: str) -> Descriptor:
    """A content descriptor ({mediaType, digest, size}), checked."""
    return _descriptor(raw, what)


def media_type_of(doc: Any) -> str:
    """The media type a manifest or index declares (old indexes omit it; schema 1 is refused)."""
    if not isinstance(doc, dict):
        raise ImageFormatError("A manifest is not a JSON object.")
    if doc.get("schemaVersion") != 2:
        raise ImageFormatError("Only schema version 2 manifests (OCI or Docker v2.2) are supported.")
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if "manifests" in doc:
        return c.OCI_INDEX
    if "config" in doc and "layers" in doc:
        return c.OCI_MANIFEST
    raise ImageFormatError("The document is neither an image manifest nor an index.")


def parse_index(doc: Any) -> list[Descriptor]:
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageFormatError("The image index lists no manifests.")
    if len(manifests) > 1024:
        raise ImageFormatError("The image index lists too many manifests.")
    return [_descriptor(m, "manifest") for m in manifests]


def select_platform(
    descriptors: list[Descriptor], os_name: str = c.DEFAULT_OS, arch: str = c.DEFAULT_ARCHITECTURE
) -> Descriptor:
    """The linux/amd64 entry of an index; an index of one entry without a platform is that entry."""
    wanted = f"{os_name}/{arch}"
    for d in descriptors:
        if d.platform == wanted or d.platform.startswith(wanted + "/"):
            return d
    unlabelled = [d for d in descriptors if not d.platform]
    if len(descriptors) == 1 and unlabelled:
        return descriptors[0]
    found = ", ".join(sorted({d.platform or "unknown" for d in descriptors}))
    raise ImageFormatError(f"The image has no {wanted} variant (found: {found}).")


def parse_manifest(doc: Any) -> Manifest:
    media_type = media_type_of(doc)
    if media_type not in c.MANIFEST_TYPES:
        raise ImageFormatError(f"Unsupported manifest media type {media_type[:100]!r}.")
    config = _descriptor(doc.get("config"), "config")
    if config.size > c.MAX_JSON_BYTES:
        raise ImageFormatError("The image config is too large.")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageFormatError("The manifest has no layer list.")
    if len(raw_layers) > c.MAX_LAYERS:
        raise ImageFormatError(
            f"The image has {len(raw_layers)} layers; at most {c.MAX_LAYERS} are accepted."
        )
    layers = tuple(_descriptor(layer, "layer") for layer in raw_layers)
    for layer in layers:
        if layer.media_type not in c.LAYER_TYPES:
            raise ImageFormatError(f"Unsupported layer media type {layer.media_type[:100]!r}.")
    return Manifest(config=config, layers=layers)


def _string_list(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageFormatError("The image config has a malformed string list.")
    return list(value)


def parse_config(data: bytes) -> ImageConfig:
    doc = load_json(data, "image config")
    if not isinstance(doc, dict):
        raise ImageFormatError("The image config is not a JSON object.")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageFormatError("The image config has no layer rootfs.")
    diff_ids = tuple(check_digest(d, "diff_id") for d in _string_list(rootfs.get("diff_ids")))
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise ImageFormatError("The image config's runtime section is not an object.")
    ports = cfg.get("ExposedPorts") or {}
    runtime = {
        "entrypoint": _string_list(cfg.get("Entrypoint")),
        "cmd": _string_list(cfg.get("Cmd")),
        "env": _string_list(cfg.get("Env")),
        "workdir": str(cfg.get("WorkingDir") or ""),
        "user": str(cfg.get("User") or ""),
        "exposed_ports": sorted(str(p) for p in ports) if isinstance(ports, dict) else [],
    }
    return ImageConfig(
        diff_ids=diff_ids,
        os=str(doc.get("os") or ""),
        architecture=str(doc.get("architecture") or ""),
        runtime=runtime,
    )


def check_plan(plan: ImagePlan) -> ImagePlan:
    """The config must describe exactly the manifest's layers, for the platform we run."""
    if sha256_digest(plan.config_bytes) != plan.manifest.config.digest:
        raise ImageFormatError("The image config does not match its digest.")
    if len(plan.config.diff_ids) != len(plan.manifest.layers):
        raise ImageFormatError(
            f"The config lists {len(plan.config.diff_ids)} diff_ids for {len(plan.manifest.layers)} layers."
        )
    if plan.config.os and plan.config.os != c.DEFAULT_OS:
        raise ImageFormatError(f"The image is for {plan.config.platform}, not {c.DEFAULT_PLATFORM}.")
    if plan.config.architecture and plan.config.architecture != c.DEFAULT_ARCHITECTURE:
        raise ImageFormatError(f"The image is for {plan.config.platform}, not {c.DEFAULT_PLATFORM}.")
    return plan


def synthesize_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    """An OCI manifest for a docker-save image (which has none): its digest names the image."""
    doc = {
        "schemaVersion": 2,
        "mediaType": c.OCI_MANIFEST,
        "config": {"mediaType": c.OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in layers],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


# --- archives --------------------------------------------------------------------------------------


def safe_member_name(name: str) -> str:
    """The normalised name of an archive member; absolute names and `..` are refused outright."""
    if "\x00" in name or name.startswith("/") or len(name) > 4096:
        raise ImageFormatError(f"The archive contains an unsafe member name {name[:200]!r}.")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ImageFormatError(f"The archive contains an unsafe member name {name[:200]!r}.")
    return "/".join(parts)


class BlobSource:
    """Where an importer reads blobs and small files from: an archive or a directory."""

    def read_small(self, name: str, what: str) -> bytes:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def chunks(self, name: str) -> Iterator[bytes]:
        with self.open(name) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def close(self) -> None:
        pass


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest).removeprefix("sha256:")


class TarSource(BlobSource):
    """A tar archive read in place: member headers indexed once, contents streamed on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            raise ImageFormatError(f"The upload is not a tar archive: {exc}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for count, member in enumerate(self._tar):
                if count >= c.MAX_ARCHIVE_MEMBERS:
                    raise ImageFormatError("The archive has too many members.")
                name = safe_member_name(member.name)
                if member.isdir() or not name:
                    continue
                if name in self._members:
                    raise ImageFormatError(f"The archive contains {name!r} twice.")
                self._members[name] = member
        except tarfile.TarError as exc:
            self._tar.close()
            raise ImageFormatError(f"The archive is corrupt: {exc}") from None
        except ImageFormatError:
            self._tar.close()
            raise

    def _member(self, name: str, hops: int = 0) -> tarfile.TarInfo:
        member = self._members.get(name)
        if member is None:
            raise ImageFormatError(f"The archive has no {name!r}.")
        if member.issym() or member.islnk():
            if hops >= 2:
                raise ImageFormatError(f"The archive's link {name!r} goes too deep.")
            if member.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
            else:
                target = member.linkname
            if target.startswith(("/", "../")) or target == "..":
                raise ImageFormatError(f"The archive's link {name!r} points outside the archive.")
            return self._member(safe_member_name(target), hops + 1)
        if not member.isreg():
            raise ImageFormatError(f"The archive member {name!r} is not a regular file.")
        return member

    def has(self, name: str) -> bool:
        return name in self._members

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> IO[bytes]:
        f = self._tar.extractfile(self._member(name))
        if f is None:  # pragma: no cover - regular members always have a file
            raise ImageFormatError(f"Cannot read {name!r} from the archive.")
        return f

    def read_small(self, name: str, what: str) -> bytes:
        if self.size(name) > c.MAX_JSON_BYTES:
            raise ImageFormatError(f"The {what} is larger than {c.MAX_JSON_BYTES} bytes.")
        with self.open(name) as f:
            return f.read()

    def close(self) -> None:
        self._tar.close()


class DirectorySource(BlobSource):
    """An OCI layout directory on the server (operators only); nothing outside it is read."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path).resolve()
        if not self.root.is_dir():
            raise ImageFormatError(f"{os.fspath(path)!r} is not a directory.")

    def _path(self, name: str) -> Path:
        path = (self.root / safe_member_name(name)).resolve()
        if not path.is_relative_to(self.root):
            raise ImageFormatError(f"{name!r} points outside the layout directory.")
        if not path.is_file():
            raise ImageFormatError(f"The layout has no {name!r}.")
        return path

    def has(self, name: str) -> bool:
        try:
            self._path(name)
        except ImageFormatError:
            return False
        return True

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open(self, name: str) -> IO[bytes]:
        return self._path(name).open("rb")

    def read_small(self, name: str, what: str) -> bytes:
        if self.size(name) > c.MAX_JSON_BYTES:
            raise ImageFormatError(f"The {what} is larger than {c.MAX_JSON_BYTES} bytes.")
        return self._path(name).read_bytes()


def _read_blob(source: BlobSource, desc: Descriptor, what: str) -> bytes:
    name = blob_name(desc.digest)
    if not source.has(name):
        raise ImageFormatError(f"The archive is missing the {what} blob {desc.digest}.")
    if desc.size > c.MAX_JSON_BYTES:
        raise ImageFormatError(f"The {what} is larger than {c.MAX_JSON_BYTES} bytes.")
    data = source.read_small(name, what)
    if len(data) != desc.size or sha256_digest(data) != desc.digest:
        raise ImageFormatError(f"The {what} blob does not match its digest {desc.digest}.")
    return data


def plan_oci_layout(source: BlobSource, ref_name: str = "") -> ImagePlan:
    """Resolve index.json -> (nested index ->) linux/amd64 manifest -> config, checking each digest."""
    layout = load_json(source.read_small("oci-layout", "oci-layout file"), "oci-layout file")
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise ImageFormatError("The oci-layout file does not declare a supported layout version.")
    index = load_json(source.read_small("index.json", "index.json"), "index.json")
    if media_type_of(index) not in c.INDEX_TYPES:
        raise ImageFormatError("index.json is not an image index.")
    entries = parse_index(index)
    named = [d for d in entries if ref_name and d.ref_name == ref_name]
    desc = named[0] if named else select_platform(entries) if len(entries) > 1 else entries[0]
    for _depth in range(c.MAX_INDEX_DEPTH + 1):
        data = _read_blob(source, desc, "manifest")
        doc = load_json(data, "manifest")
        media_type = media_type_of(doc)
        if media_type in c.INDEX_TYPES:
            desc = select_platform(parse_index(doc))
            continue
        manifest = parse_manifest(doc)
        config_bytes = _read_blob(source, manifest.config, "image config")
        plan = ImagePlan(
            manifest_digest=desc.digest,
            manifest_bytes=data,
            manifest=manifest,
            config_bytes=config_bytes,
            config=parse_config(config_bytes),
        )
        for layer in manifest.layers:
            name = blob_name(layer.digest)
            if not source.has(name):
                raise ImageFormatError(f"The archive is missing the layer blob {layer.digest}.")
            if source.size(name) != layer.size:
                raise ImageFormatError(f"The layer blob {layer.digest} is not {layer.size} bytes.")
        return check_plan(plan)
    raise ImageFormatError("The image indexes are nested too deeply.")


@dataclass(frozen=True)
class DockerPlan(ImagePlan):
    """A docker archive's plan also says which member holds each layer (by digest)."""

    members: dict[str, str] = field(default_factory=dict)


def plan_docker_archive(source: BlobSource, reference: str = "") -> ImagePlan:
    """A `docker save` archive: manifest.json names a config and uncompressed layer tars.

    Their blob digests are their diff_ids, so the config says what every layer must hash to.
    """
    doc = load_json(source.read_small("manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise ImageFormatError("manifest.json does not list any image.")
    entry = doc[0]
    if len(doc) > 1:
        tagged = [e for e in doc if reference and reference in (e.get("RepoTags") or [])]
        if not tagged:
            raise ImageFormatError(
                f"The archive holds {len(doc)} images; save one image per archive to import it."
            )
        entry = tagged[0]
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageFormatError("manifest.json has no Config or Layers.")
    if len(layer_names) > c.MAX_LAYERS:
        raise ImageFormatError(
            f"The image has {len(layer_names)} layers; at most {c.MAX_LAYERS} are accepted."
        )
    config_name = safe_member_name(config_name)
    config_bytes = source.read_small(config_name, "image config")
    config_desc = Descriptor(c.OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
    config = parse_config(config_bytes)
    if len(config.diff_ids) != len(layer_names):
        raise ImageFormatError(
            f"The config lists {len(config.diff_ids)} diff_ids for {len(layer_names)} layers."
        )
    layers: list[Descriptor] = []
    members: dict[str, str] = {}
    for diff_id, raw in zip(config.diff_ids, layer_names, strict=True):
        if not isinstance(raw, str):
            raise ImageFormatError("manifest.json names a layer that is not a string.")
        name = safe_member_name(raw)
        if not source.has(name):
            raise ImageFormatError(f"The archive is missing the layer {name!r}.")
        layers.append(Descriptor(c.OCI_LAYER_TAR, diff_id, source.size(name)))
        members[diff_id] = name
    manifest_bytes = synthesize_manifest(config_desc, layers)
    plan = ImagePlan(
        manifest_digest=sha256_digest(manifest_bytes),
        manifest_bytes=manifest_bytes,
        manifest=Manifest(config=config_desc, layers=tuple(layers)),
        config_bytes=config_bytes,
        config=config,
    )
    check_plan(plan)
    return DockerPlan(**{f: getattr(plan, f) for f in plan.__dataclass_fields__}, members=members)


def member_for(plan: ImagePlan, digest: str) -> str:
    if isinstance(plan, DockerPlan):
        return plan.members[digest]
    return blob_name(digest)


def plan_archive(source: BlobSource, reference: str = "") -> ImagePlan:
    """An OCI layout (also what newer `docker save` writes) wins over a legacy manifest.json."""
    if source.has("index.json") and source.has("oci-layout"):
        return plan_oci_layout(source, reference.rpartition(":")[2] if reference else "")
    if source.has("manifest.json"):
        return plan_docker_archive(source, reference)
    raise ImageFormatError("The archive is neither an OCI image layout nor a docker-save archive.")


def hash_stream(chunks: Iterator[bytes], limit: int) -> tuple[str, int]:
    """Digest and length of a stream, stopping once it passes `limit` bytes."""
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > limit:
            break
        h.update(chunk)
    return "sha256:" + h.hexdigest(), n
