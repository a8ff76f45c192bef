"""Push to the built-in registry: upload sessions, blob mounts, manifests, tags and deletes.

Every function here runs after `imaging.distribution.access` granted the caller the action on the
repository (push, or delete), so the rows it touches belong to a tenant the caller may act on.

One store: an upload's bytes grow in the layer store's ingest area and are verified by digest as the
store takes them in (a blob new to the store is moved into place and hashed there, no copy; one already
present is hashed from the upload and the upload dropped, so naming a digest proves nothing: the bytes
do, the same rule as imports). What a tenant proved is a `RegistryBlob` row; a manifest may reference
only such blobs, the tenant's own layers, or configs of its images. A tag push of a runnable image
queues an `image.push` operation that unpacks the layers (the checks of imports) and registers the
Image; the manifest is pullable by tag and digest from the moment it is accepted.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from imaging import choices as c
from imaging import oci
from imaging.distribution.access import Principal, Repository
from imaging.models import Image, RegistryBlob, RegistryManifest, RegistryTag, RegistryUpload, TenantLayer
from imaging.store import DigestMismatch, SizeMismatch
from portal import operations
from portal.errors import Conflict, ServiceError
from tenants import audit, quota
from tenants.actors import Actor
from tenants.models import Quota, Tenant

# An upload session untouched this long is abandoned (its file goes with gc's ingest temporaries,
# which keep files younger than a day).
UPLOAD_TTL = timedelta(hours=12)
# A proved blob no manifest references is dropped after this long.
BLOB_TTL = timedelta(hours=24)
HASH_CHUNK = 1024 * 1024


class RegistryRefusal(ServiceError):
    """A request the registry refuses, with the distribution spec's status and error code."""

    status_code = 400
    registry_code = "UNSUPPORTED"


class Denied(RegistryRefusal):
    status_code = 403
    registry_code = "DENIED"
    code = "denied"


class DigestInvalid(RegistryRefusal):
    registry_code = "DIGEST_INVALID"


class BlobUnknown(RegistryRefusal):
    status_code = 404
    registry_code = "BLOB_UNKNOWN"


class UploadUnknown(RegistryRefusal):
    status_code = 404
    registry_code = "BLOB_UPLOAD_UNKNOWN"


class ManifestInvalid(RegistryRefusal):
    registry_code = "MANIFEST_INVALID"


class ManifestBlobUnknown(RegistryRefusal):
    registry_code = "MANIFEST_BLOB_UNKNOWN"


class ManifestUnknown(RegistryRefusal):
    status_code = 404
    registry_code = "MANIFEST_UNKNOWN"


class InUse(RegistryRefusal):
    status_code = 409
    registry_code = "DENIED"


def actor_of(principal: Principal) -> Actor:
    return Actor(user=principal.user, token=principal.token)


def tenant_of(repository: Repository) -> Tenant | None:
    """The repository's tenant (None: `library/`); it exists, since the grant was given."""
    if repository.tenant_name is None:
        return None
    return Tenant.objects.get(name=repository.tenant_name)


def _store() -> Any:
    from imaging.services import get_store

    return get_store()


# --- quota -------------------------------------------------------------------------------------------


def _holds(tenant: Tenant | None, digest: str) -> bool:
    """Whether the tenant already has these bytes (proved by a push, or a layer of its images)."""
    return (
        RegistryBlob.objects.filter(tenant=tenant, digest=digest).exists()
        or TenantLayer.objects.filter(tenant=tenant, layer__digest=digest).exists()
    )


def pending_bytes(tenant: Tenant) -> int:
    """Bytes of blobs the tenant pushed that no image of it holds yet (not charged, but counted)."""
    held = TenantLayer.objects.filter(tenant=tenant).values("layer__digest")
    sizes = dict(
        RegistryBlob.objects.filter(tenant=tenant).exclude(digest__in=held).values_list("digest", "size")
    )
    # Manifests and indexes are stored too (any number, up to 4 MiB each): they count as well.
    manifests = dict(RegistryManifest.objects.filter(tenant=tenant).values_list("digest", "size"))
    return sum(sizes.values()) + sum(manifests.values())


def _on_disk(upload: RegistryUpload) -> int:
    try:
        return upload_path(upload).stat().st_size
    except FileNotFoundError:
        return 0


def uploading_bytes(tenant: Tenant | None, *, besides: RegistryUpload | None = None) -> int:
    """What the tenant's open upload sessions hold: each its bytes on disk or its reservation."""
    return sum(max(on_disk, reserved) for on_disk, reserved in _sessions(tenant, besides))


def _sessions(tenant: Tenant | None, besides: RegistryUpload | None) -> list[tuple[int, int]]:
    """(bytes on disk, bytes reserved) of each open upload session of the tenant."""
    sessions = RegistryUpload.objects.filter(tenant=tenant)
    if besides is not None:
        sessions = sessions.exclude(pk=besides.pk)
    return [(_on_disk(upload), upload.reserved) for upload in sessions]


@dataclass(frozen=True)
class RoomReserved:
    granted: int  # what this request may now append
    left: int  # what the tenant had left besides the other sessions
    lent: int  # what other requests reserved and have not written yet (given back when they end)


@transaction.atomic
def reserve_upload_room(upload: RegistryUpload, repository: Repository, wanted: int) -> RoomReserved:
    """Reserve, under the quota row lock, up to `wanted` more bytes for `upload` beyond its file.

    The reservation replaces the session's earlier one; `settle_upload_room` gives back what was not
    written."""
    tenant = tenant_of(repository)
    if tenant is None:
        return RoomReserved(granted=wanted, left=wanted, lent=0)  # the operators' namespace: no quota
    quota.allocate(tenant, image_bytes=0)  # the quota row lock: reservations of one tenant serialize
    room = upload_room(tenant) or 0
    own = _on_disk(upload)
    others = _sessions(tenant, upload)
    left = max(room - sum(max(on_disk, reserved) for on_disk, reserved in others) - own, 0)
    granted = min(wanted, left)
    RegistryUpload.objects.filter(pk=upload.pk).update(reserved=own + granted)
    lent = sum(max(reserved - on_disk, 0) for on_disk, reserved in others)
    return RoomReserved(granted=granted, left=left, lent=lent)


def settle_upload_room(upload: RegistryUpload) -> None:
    """After a request: the session holds what it wrote, not what it reserved."""
    RegistryUpload.objects.filter(pk=upload.pk).update(reserved=0)


def upload_room(tenant: Tenant | None) -> int | None:
    """Bytes the tenant may still upload (None: no limit, the operators' public namespace)."""
    if tenant is None:
        return None
    limits = Quota.objects.get(tenant=tenant)
    return max(limits.image_bytes - limits.used_image_bytes - pending_bytes(tenant), 0)


def _refuse_beyond_room(tenant: Tenant | None, size: int, digest: str = "") -> None:
    if tenant is None or (digest and _holds(tenant, digest)):
        return
    room = upload_room(tenant)
    if room is not None and size > room:
        raise Denied(
            f"The upload needs {size} bytes of image storage; {room} are left in {tenant.name}'s quota.",
            audit_action="registry.push",
        )


# --- upload sessions ---------------------------------------------------------------------------------


def upload_path(upload: RegistryUpload) -> Path:
    from imaging.services import upload_dir

    return upload_dir() / f"registry-{upload.id}"


@transaction.atomic
def start_upload(principal: Principal, repository: Repository) -> RegistryUpload:
    """A new upload session with an empty file in the store's ingest area."""
    expire_uploads()
    upload = RegistryUpload.objects.create(
        tenant=tenant_of(repository), repository=repository.image_name, user=principal.user
    )
    path = upload_path(upload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    return upload


def find_upload(principal: Principal, repository: Repository, upload_id: str) -> RegistryUpload:
    """The caller's session in this repository, or UploadUnknown (anyone else's id reads as none)."""
    try:
        uuid.UUID(upload_id)
    except ValueError:
        raise UploadUnknown("No such upload session in this repository.") from None
    upload = RegistryUpload.objects.filter(
        pk=upload_id, repository=repository.image_name, tenant=tenant_of(repository), user=principal.user
    ).first()
    if upload is None or not upload_path(upload).is_file():
        raise UploadUnknown("No such upload session in this repository.")
    return upload


def touch_upload(upload: RegistryUpload) -> None:
    RegistryUpload.objects.filter(pk=upload.pk).update(updated_at=timezone.now())


def cancel_upload(upload: RegistryUpload) -> None:
    upload_path(upload).unlink(missing_ok=True)
    RegistryUpload.objects.filter(pk=upload.pk).delete()


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


@dataclass
class UploadHash:
    """SHA-256 of an upload's bytes as this process wrote them (`size` of them, from the first)."""

    hasher: Any
    size: int = 0


# What this process hashed of each upload while writing it: a PUT of an upload it received whole
# needs no second read of the bytes. Bounded; a missing or stale entry only means the store hashes
# the file at the PUT.
_HASHED: OrderedDict[str, UploadHash] = OrderedDict()
MAX_HASHED = 256


def upload_hash(upload: RegistryUpload, size_now: int) -> UploadHash | None:
    """The running hash to extend with bytes appended at `size_now`; None when this process did not
    see the bytes before (another process wrote them): the PUT then hashes the file."""
    key = str(upload.pk)
    entry = _HASHED.get(key)
    if entry is not None and entry.size == size_now:
        _HASHED.move_to_end(key)
        return entry
    _HASHED.pop(key, None)
    if size_now != 0:
        return None
    entry = _HASHED[key] = UploadHash(hashlib.sha256())
    while len(_HASHED) > MAX_HASHED:
        _HASHED.popitem(last=False)
    return entry


def forget_upload_hash(upload: RegistryUpload) -> None:
    _HASHED.pop(str(upload.pk), None)


def _hashed_digest(upload: RegistryUpload, size: int) -> str | None:
    entry = _HASHED.pop(str(upload.pk), None)
    if entry is None or entry.size != size:
        return None
    return "sha256:" + entry.hasher.hexdigest()


def finish_upload(principal: Principal, repository: Repository, upload: RegistryUpload, digest: str) -> int:
    """Verify the upload against `digest`, keep the blob, record that the tenant proved it; its size.

    A mismatch keeps nothing (the upload is gone either way, as the spec wants on a failed PUT).
    """
    from imaging.services import LEASE_AFTER_COMMIT, TEMP_MAX_AGE, _store_message

    tenant = tenant_of(repository)
    path = upload_path(upload)
    store = _store()
    lease = store.acquire_lease(f"registry-{upload.pk}", [digest], ttl=TEMP_MAX_AGE)
    committed = False
    try:
        size = path.stat().st_size
        _refuse_beyond_room(tenant, size, digest)
        # Hashed while it was written (this process received every byte): not read a second time.
        hashed = _hashed_digest(upload, size)
        if hashed is not None and hashed != digest:
            raise DigestInvalid("The uploaded content does not match the digest.")
        if store.has_blob(digest):
            # Present already (maybe another tenant's): only the uploaded bytes themselves prove it.
            got = hashed or _hash_file(path)[0]
            if got != digest:
                raise DigestInvalid("The uploaded content does not match the digest.")
        else:
            try:
                if hashed is not None:
                    _, size = store.ingest_hashed(path, digest=digest, size=size)
                else:
                    _, size = store.ingest_path(path, digest=digest, consume=True)
            except (DigestMismatch, SizeMismatch):
                raise DigestInvalid("The uploaded content does not match the digest.") from None
            except ValueError as exc:
                raise DigestInvalid(_store_message(exc)) from None  # type: ignore[arg-type]
        with transaction.atomic():
            if tenant is not None:
                quota.allocate(tenant, image_bytes=0)  # the quota row lock: room checks serialize
            _refuse_beyond_room(tenant, size, digest)
            RegistryBlob.objects.get_or_create(
                tenant=tenant, repository=repository.image_name, digest=digest, defaults={"size": size}
            )
            RegistryUpload.objects.filter(pk=upload.pk).delete()
        committed = True
        return size
    finally:
        path.unlink(missing_ok=True)
        if committed:
            lease.renew(LEASE_AFTER_COMMIT)
        else:
            lease.release()
            RegistryUpload.objects.filter(pk=upload.pk).delete()


@transaction.atomic
def mount_blob(principal: Principal, repository: Repository, source: Repository, digest: str) -> int:
    """Give `repository` a blob `source` serves (the caller may pull `source`: the app checked)."""
    from imaging.distribution.app import blob_path_in

    path = blob_path_in(source, digest)
    if path is None:
        raise BlobUnknown("The source repository has no such blob.")
    size = Path(path).stat().st_size
    tenant = tenant_of(repository)
    if tenant is not None:
        quota.allocate(tenant, image_bytes=0)
    _refuse_beyond_room(tenant, size, digest)
    RegistryBlob.objects.get_or_create(
        tenant=tenant, repository=repository.image_name, digest=digest, defaults={"size": size}
    )
    audit.record(
        actor_of(principal),
        "registry.mount",
        tenant=tenant,
        details={"repository": repository.name, "from": source.name, "digest": digest},
    )
    return size


@transaction.atomic
def delete_blob(principal: Principal, repository: Repository, digest: str) -> None:
    """Forget a proved blob of the repository (what images and manifests use stays theirs)."""
    tenant = tenant_of(repository)
    deleted, _ = RegistryBlob.objects.filter(
        tenant=tenant, repository=repository.image_name, digest=digest
    ).delete()
    if not deleted:
        raise BlobUnknown("No such blob in this repository.")
    audit.record(
        actor_of(principal),
        "registry.blob.delete",
        tenant=tenant,
        details={"repository": repository.name, "digest": digest},
    )


def expire_uploads(now: Any = None) -> int:
    """Drop upload sessions untouched for UPLOAD_TTL (and their files); how many."""
    now = now or timezone.now()
    stale = list(RegistryUpload.objects.filter(updated_at__lt=now - UPLOAD_TTL)[:1000])
    for upload in stale:
        cancel_upload(upload)
    return len(stale)


def expire_abandoned(now: Any = None) -> dict[str, int]:
    """Drop upload sessions untouched for UPLOAD_TTL and proved blobs nothing references after BLOB_TTL."""
    now = now or timezone.now()
    uploads = expire_uploads(now)
    referenced: dict[Any, set[str]] = {}
    for tenant_id, refs in RegistryManifest.objects.values_list("tenant_id", "references"):
        referenced.setdefault(tenant_id, set()).update(refs or [])
    old = RegistryBlob.objects.filter(created_at__lt=now - BLOB_TTL).values_list("pk", "tenant_id", "digest")
    orphans = [pk for pk, tenant_id, digest in old if digest not in referenced.get(tenant_id, set())]
    RegistryBlob.objects.filter(pk__in=orphans).delete()
    return {"uploads": uploads, "blobs": len(orphans)}


# --- manifests and tags ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    digest: str
    operation_id: str | None


def _may_reference(tenant: Tenant | None, repository: Repository, digest: str) -> bool:
    """A manifest may name a blob the tenant proved, a layer it holds, or a config of its images."""
    return (
        RegistryBlob.objects.filter(tenant=tenant, digest=digest).exists()
        or TenantLayer.objects.filter(tenant=tenant, layer__digest=digest).exists()
        or Image.objects.filter(tenant=tenant)
        .filter(Q(config_digest=digest) | Q(manifest_digest=digest))
        .exists()
    )


def _known_manifest(tenant: Tenant | None, repository: Repository, digest: str) -> bool:
    return (
        RegistryManifest.objects.filter(
            tenant=tenant, repository=repository.image_name, digest=digest
        ).exists()
        or Image.objects.filter(tenant=tenant, name=repository.image_name, manifest_digest=digest).exists()
    )


def _references(tenant: Tenant | None, repository: Repository, doc: Any, media_type: str) -> list[str]:
    """What the document references, each checked present and readable by the tenant."""
    store = _store()
    # The media type alone says what the document is; keys of the other kind make it ambiguous, and a
    # reader that trusted those keys (the unpacking of a pushed image) would skip the checks below.
    if media_type in c.INDEX_TYPES:
        if "config" in doc or "layers" in doc:
            raise ManifestInvalid("An index has no config or layers.")
    elif media_type in c.MANIFEST_TYPES:
        if "manifests" in doc:
            raise ManifestInvalid("An image manifest has no manifests list.")
    else:
        raise ManifestInvalid(f"Unsupported manifest media type {media_type[:100]!r}.")
    if media_type in c.INDEX_TYPES:
        raw = doc.get("manifests")
        if not isinstance(raw, list) or len(raw) > 1024:
            raise ManifestInvalid("The index's manifests are not a list of at most 1024 entries.")
        children = [oci.descriptor(entry, "manifest") for entry in raw]
        for child in children:
            if not _known_manifest(tenant, repository, child.digest):
                raise ManifestBlobUnknown(f"The index references an unknown manifest {child.digest}.")
        return [child.digest for child in children]
    config = oci.descriptor(doc.get("config"), "config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or len(raw_layers) > c.MAX_LAYERS:
        raise ManifestInvalid(f"The manifest's layers are not a list of at most {c.MAX_LAYERS} entries.")
    descriptors = [config, *(oci.descriptor(layer, "layer") for layer in raw_layers)]
    for desc in descriptors:
        path = store.blob_path(desc.digest)
        if not _may_reference(tenant, repository, desc.digest) or not path.is_file():
            raise ManifestBlobUnknown(f"The manifest references an unknown blob {desc.digest}.")
        if path.stat().st_size != desc.size:
            raise ManifestInvalid(f"The blob {desc.digest} is not {desc.size} bytes.")
    return [desc.digest for desc in descriptors]


def _runnable_plan(doc: Any, body: bytes, digest: str, checked: list[str]) -> oci.ImagePlan | None:
    """The image plan of a linux/amd64 image manifest whose layers are tars; None for anything else.

    `checked`: the digests `_references` proved the tenant may use; a plan naming anything else is no
    plan (a second guard: only proved blobs are ever unpacked into a tenant's image)."""
    try:
        manifest = oci.parse_manifest(doc)
        if not {manifest.config.digest, *(layer.digest for layer in manifest.layers)} <= set(checked):
            return None
        config_bytes = _store().read_blob(manifest.config.digest)
        return oci.check_plan(
            oci.ImagePlan(
                manifest_digest=digest,
                manifest_bytes=body,
                manifest=manifest,
                config_bytes=config_bytes,
                config=oci.parse_config(config_bytes),
            )
        )
    except (oci.ImageFormatError, OSError):
        return None


MAX_ANNOTATIONS_BYTES = 16 * 1024


def referrer_fields(doc: Any) -> dict[str, Any]:
    """What the referrers API lists of a manifest: its subject, artifact type and annotations.

    The artifact type is the manifest's own, else its config's media type (as the spec says); annotations
    larger than MAX_ANNOTATIONS_BYTES are left out of the listing (the manifest itself keeps them)."""
    subject = doc.get("subject") if isinstance(doc, dict) else None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    if not (isinstance(digest, str) and oci.DIGEST_RE.match(digest)):
        return {"subject": "", "artifact_type": "", "annotations": {}}
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str):
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else ""
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict) or len(json.dumps(annotations)) > MAX_ANNOTATIONS_BYTES:
        annotations = {}
    return {
        "subject": digest,
        "artifact_type": str(artifact_type or "")[:255],
        "annotations": {str(k): str(v) for k, v in annotations.items()},
    }


def referrers(repository: Repository, subject: str, artifact_type: str = "") -> list[dict[str, Any]]:
    """Descriptors of the repository's manifests whose subject is `subject` (optionally of one type)."""
    rows = RegistryManifest.objects.filter(
        tenant=tenant_of(repository), repository=repository.image_name, subject=subject
    )
    if artifact_type:
        rows = rows.filter(artifact_type=artifact_type)
    descriptors = []
    for row in rows.order_by("created_at", "digest"):
        descriptor: dict[str, Any] = {"mediaType": row.media_type, "digest": row.digest, "size": row.size}
        if row.artifact_type:
            descriptor["artifactType"] = row.artifact_type
        if row.annotations:
            descriptor["annotations"] = row.annotations
        descriptors.append(descriptor)
    return descriptors


def put_manifest(
    principal: Principal, repository: Repository, reference: str, body: bytes, content_type: str
) -> Pushed:
    """Store a manifest or index (verified, every reference present and the tenant's) and tag it.

    A tag naming a runnable image queues its unpacking as an operation (Image of the tenant when done),
    charging `image_bytes` for its new layers now: an image the quota cannot hold is refused.
    """
    from imaging.services import LEASE_AFTER_COMMIT, validate_name_tag

    digest = oci.sha256_digest(body)
    by_digest = reference.startswith("sha256:")
    if by_digest and reference != digest:
        raise DigestInvalid("The manifest does not match the digest it was pushed by.")
    try:
        doc = oci.load_json(body, "manifest")
        media_type = oci.media_type_of(doc)
    except oci.ImageFormatError as exc:
        raise ManifestInvalid(str(exc)) from None
    if not isinstance(doc.get("mediaType"), str) and content_type in c.INDEX_TYPES | c.MANIFEST_TYPES:
        media_type = content_type
    tenant = tenant_of(repository)
    try:
        references = _references(tenant, repository, doc, media_type)
    except oci.ImageFormatError as exc:
        raise ManifestInvalid(str(exc)) from None
    tag = "" if by_digest else reference
    plan = _runnable_plan(doc, body, digest, references) if tag and media_type in c.MANIFEST_TYPES else None
    if plan is not None:
        try:
            validate_name_tag(repository.image_name, tag)
        except ServiceError:
            plan = None
    store = _store()
    if tenant is not None and not RegistryManifest.objects.filter(tenant=tenant, digest=digest).exists():
        with transaction.atomic():
            quota.allocate(tenant, image_bytes=0)  # the quota row lock: room checks serialize
            _refuse_beyond_room(tenant, len(body) + uploading_bytes(tenant))
    lease = store.acquire_lease(f"registry-m-{digest[7:]}", [digest], ttl=LEASE_AFTER_COMMIT)
    if not store.has_blob(digest):
        store.ingest_bytes(body, digest=digest)
    actor = actor_of(principal)
    operation_id = None
    try:
        with transaction.atomic():
            manifest, _ = RegistryManifest.objects.update_or_create(
                tenant=tenant,
                repository=repository.image_name,
                digest=digest,
                defaults={
                    "media_type": media_type,
                    "size": len(body),
                    "references": references,
                    **referrer_fields(doc),
                },
            )
            if tag:
                RegistryTag.objects.update_or_create(
                    tenant=tenant, repository=repository.image_name, tag=tag, defaults={"manifest": manifest}
                )
            if plan is not None:
                operation_id = _list_image(actor, tenant, repository, tag, plan)
            audit.record(
                actor,
                "registry.push",
                manifest,
                tenant=tenant,
                details={
                    "repository": repository.name,
                    "tag": tag,
                    "digest": digest,
                    "media_type": media_type,
                    "operation": operation_id,
                },
            )
    except Denied as exc:
        exc.audit_action = "registry.push"
        lease.release()
        raise
    except Conflict as exc:
        lease.release()
        raise InUse(exc.message, audit_action="registry.push") from None
    return Pushed(digest, operation_id)


def _list_image(
    actor: Actor, tenant: Tenant | None, repository: Repository, tag: str, plan: oci.ImagePlan
) -> str | None:
    """Queue the unpacking of a tag push's image and list the Image at once (in the PUT's transaction:
    the 201 is sent only once the Image row is committed); the operation that unpacks it."""
    from imaging.services import list_pushed_image, reserve_image_bytes

    image = Image.objects.filter(tenant=tenant, name=repository.image_name, tag=tag).first()
    if image is not None and image.manifest_digest == plan.manifest_digest and not image.unpack_failed:
        return str(image.operation_id) if image.operation_id and not image.ready else None
    op = _start_image_push(actor, tenant, repository, tag, plan.manifest_digest)
    reserve_image_bytes(op, plan.manifest.layers, Denied)
    list_pushed_image(actor=actor, op=op, tenant=tenant, name=repository.image_name, tag=tag, plan=plan)
    return str(op.pk)


def _start_image_push(
    actor: Actor, tenant: Tenant | None, repository: Repository, tag: str, digest: str
) -> Any:
    from imaging import tasks

    params = {
        "name": repository.image_name,
        "tag": tag,
        "manifest_digest": digest,
        "repository": repository.name,
    }
    op = operations.start(kind="image.push", task=tasks.push_image, actor=actor, tenant=tenant, params=params)
    op.target_label = f"{repository.image_name}:{tag}"
    op.save(update_fields=["target_label"])
    return op


def delete_manifest(principal: Principal, repository: Repository, reference: str) -> None:
    """Delete a tag, or a manifest by digest with its tags; the Images they made go too (unless in use)."""
    from imaging.services import delete_image

    tenant = tenant_of(repository)
    name = repository.image_name
    actor = actor_of(principal)
    if reference.startswith("sha256:"):
        rows = RegistryManifest.objects.filter(tenant=tenant, repository=name, digest=reference)
        images = Image.objects.filter(tenant=tenant, name=name, manifest_digest=reference)
    else:
        rows = RegistryManifest.objects.none()
        images = Image.objects.filter(tenant=tenant, name=name, tag=reference)
    tags = RegistryTag.objects.filter(tenant=tenant, repository=name)
    if reference.startswith("sha256:"):
        tags = tags.filter(manifest__digest=reference)
    else:
        tags = tags.filter(tag=reference)
    if not (rows.exists() or images.exists() or tags.exists()):
        raise ManifestUnknown("No such manifest or tag in this repository.")
    for image in images:
        try:
            delete_image(actor=actor, image=image)
        except ServiceError as exc:
            raise InUse(exc.message) from None
    with transaction.atomic():
        tags.delete()
        rows.delete()
        audit.record(
            actor,
            "registry.delete",
            tenant=tenant,
            details={"repository": repository.name, "reference": reference},
        )
