"""Image services: the only code that changes images, layers and the layer store's contents.

Tenancy: storage is deduplicated, visibility is not. A tenant gets an image only by supplying its
bytes (an archive, every blob verified even when the store already has it) or by pulling it from a
registry it can read; there is no way to name a digest and be given what another tenant stored.
Quota: `image_bytes` counts the blob size of each layer once per tenant (`TenantLayer`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from cryptography.fernet import Fernet, InvalidToken
from django.apps import apps
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, ProtectedError, Sum
from django.http import Http404

from imaging import choices as c
from imaging import oci
from imaging.distribution import services as registry_services
from imaging.models import Image, ImageLayer, Layer, RegistryBlob, RegistryManifest, RegistryTag, TenantLayer
from imaging.registry import REPOSITORY_RE, RegistryClient, RegistryError, endpoint_for, parse_reference
from imaging.store import (
    DigestMismatch,
    LayerSpec,
    LayerStore,
    LimitExceeded,
    SizeMismatch,
    StoreError,
    UnsafeEntry,
    chain_id,
)
from portal import operations
from portal.errors import INTERNAL_FAILURE, Conflict, Invalid, NotPermitted, ServiceError
from portal.models import Operation
from portal.permissions import Action, acts_as_operator
from tenants import audit, quota
from tenants.actors import Actor
from tenants.choices import AuditOutcome
from tenants.models import Quota, Tenant

Progress = Callable[..., None]

NAME_RE = REPOSITORY_RE
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
UPLOAD_RE = re.compile(r"^upload-[A-Za-z0-9_-]{1,64}\.tar$")
# An import's lease outlives its commit this long, so a gc that read the database just before the
# commit still finds the new blobs leased when it takes the store's lock.
LEASE_AFTER_COMMIT = 600.0
# Temporaries in the ingest area (uploads waiting in the queue among them) live this long.
TEMP_MAX_AGE = 24 * 3600.0


class ImportFailed(ServiceError):
    code = "import_failed"


class PullFailed(ServiceError):
    code = "pull_failed"


class PushFailed(ServiceError):
    code = "push_failed"


# --- the store and lookups ----------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _store_at(root: str) -> LayerStore:
    return LayerStore(root)


def get_store() -> LayerStore:
    """The process's layer store at BULKHEAD_STORE_DIR."""
    root = Path(settings.BULKHEAD_STORE_DIR)
    root.mkdir(parents=True, exist_ok=True)
    return _store_at(str(root))


def upload_dir() -> Path:
    """Where the API streams uploads: the store's ingest area (same filesystem as the blobs)."""
    return get_store().root / "ingest"


def get_image_for_user(user: Any, pk: Any, action: Action = "view") -> Image:
    """An image the user may act on, or 404 (a foreign image is indistinguishable from none)."""
    image = Image.objects.for_user(user, action).filter(pk=pk).first()
    if image is None:
        raise Http404("No such image.")
    return image


def image_in_use(image: Image) -> bool:
    """Whether a workload runs this image (compute is optional: imaging never imports it)."""
    try:
        workload = apps.get_model("compute", "Workload")
    except LookupError:
        return False
    fields = {f.name for f in workload._meta.get_fields()}
    if "image" not in fields:
        return False
    return bool(workload._default_manager.filter(image=image).exists())


def require_ready(image: Image, audit_action: str = "") -> None:
    """Refuse (409) to use an image whose pushed layers are not unpacked yet, saying how far it is."""
    if image.ready:
        return
    op = image.operation
    if image.unpack_failed:
        reason = f": {op.error}" if op is not None and op.error else ""
        raise Conflict(
            f"The image {image} could not be unpacked{reason}. Push it again or delete it.",
            field="image",
            audit_action=audit_action,
        )
    progress = f" ({op.progress} %, operation {op.pk})" if op is not None else ""
    raise Conflict(
        f"The image {image} is still being unpacked{progress}; use it once it is ready.",
        field="image",
        audit_action=audit_action,
    )


def validate_name_tag(name: str, tag: str) -> None:
    if not NAME_RE.match(name) or len(name) > 200:
        raise Invalid(
            "Use lowercase letters, digits, '.', '_', '-' and '/' for the image name.", field="name"
        )
    if not TAG_RE.match(tag):
        raise Invalid(
            "A tag is 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'.", field="tag"
        )


def _require_operator(actor: Actor, action: str) -> None:
    # A scoped or read-only token of an operator is no operator.
    if not actor.is_operator:
        raise NotPermitted("Only operators may do this.", audit_action=action)


def _check_target(actor: Actor, tenant: Tenant | None, name: str, tag: str, action: str) -> None:
    """Tenant-less images are public: only operators publish them. Names must be free."""
    if tenant is None:
        _require_operator(actor, action)
    validate_name_tag(name, tag)
    if Image.objects.filter(tenant=tenant, name=name, tag=tag).exists():
        raise Conflict(f"An image {name}:{tag} already exists.", field="tag")


def _actor_of(op: Operation) -> Actor:
    return Actor(user=op.actor) if op.actor is not None else Actor.system("imaging")


# --- starting operations ------------------------------------------------------------------------


@audit.denials_audited
@transaction.atomic
def start_import(
    *,
    actor: Actor,
    tenant: Tenant | None,
    name: str,
    tag: str,
    upload: Path | None = None,
    directory: str = "",
) -> Operation:
    """Queue the import of an uploaded archive (in the ingest area) or, for operators, a directory."""
    from imaging import tasks

    _check_target(actor, tenant, name, tag, "image.import")
    params: dict[str, Any] = {"name": name, "tag": tag}
    if directory:
        _require_operator(actor, "image.import")
        if not os.path.isabs(directory):
            raise Invalid("Give the layout directory as an absolute path.", field="directory")
        params["directory"] = directory
    elif upload is not None:
        if upload.parent != upload_dir() or not UPLOAD_RE.match(upload.name):
            raise Invalid("The upload is not in the ingest area.")
        _refuse_upload_beyond_quota(tenant, upload.stat().st_size)
        params["upload"] = upload.name
    else:
        raise Invalid("Upload an archive.", field="archive")
    op = operations.start(
        kind="image.import", task=tasks.import_image, actor=actor, tenant=tenant, params=params
    )
    op.target_label = f"{name}:{tag}"
    op.save(update_fields=["target_label"])
    audit.record(actor, "image.import", op, tenant=tenant, details={"name": name, "tag": tag, **params})
    return op


def _refuse_upload_beyond_quota(tenant: Tenant | None, archive_bytes: int) -> None:
    """An archive larger than what is left of the tenant's image storage is refused before any import."""
    if tenant is None:
        return
    limits = Quota.objects.get(tenant=tenant)
    remaining = max(limits.image_bytes - limits.used_image_bytes, 0)
    if archive_bytes > remaining:
        raise quota.QuotaExceeded("image_bytes", archive_bytes, limits.used_image_bytes, limits.image_bytes)


def refuse_beyond_image_quota(tenant: Tenant, size: int) -> None:
    """Bytes about to be uploaded for a tenant's image (a committed layer) are refused up front when they
    exceed what is left of its image storage."""
    _refuse_upload_beyond_quota(tenant, size)


def reserve_image_bytes(op: Operation, layers: Iterable[oci.Descriptor], failure: type[ServiceError]) -> None:
    """Charge the tenant now for the layers it does not hold yet, as the descriptors give their sizes.

    Runs before a byte of them is fetched or written: what cannot fit is refused up front, and two
    concurrent imports cannot both pass the limit. The reservation is kept on the operation's row (in
    the same transaction), so that `register_image` settles it against what the image really adds, a
    failure gives it back (`release_reservation`), and so does the lost-operation sweep after a killed
    worker.
    """
    tenant: Tenant | None = op.tenant
    if tenant is None:
        return
    sizes = {desc.digest: desc.size for desc in layers}
    with transaction.atomic():
        quota.allocate(tenant, image_bytes=0)  # the quota row lock: held-layer checks serialize
        held = _held_digests(tenant, sizes)
        needed = sum(size for digest, size in sizes.items() if digest not in held)
        try:
            quota.allocate(tenant, image_bytes=needed)
        except quota.QuotaExceeded as exc:
            raise failure(
                f"The image needs {needed} more bytes of image storage; {exc.used} of {exc.limit} "
                "are in use. Delete images or ask an operator for more quota."
            ) from None
        operations.set_reserved_quota(op.pk, {"image_bytes": needed})


def _end_operation_lease(op: Operation, lease: Any, committed: bool) -> None:
    """After an import, pull or push: a committed image keeps its blobs leased a while longer (its
    rows are written); one that failed gives its reserved quota back and lets gc have the blobs."""
    if committed:
        lease.renew(LEASE_AFTER_COMMIT)
    else:
        release_reservation(op)
        lease.release()


def release_reservation(op: Operation) -> None:
    """Give back what `reserve_image_bytes` charged for this operation (nothing if it was settled)."""
    if op.tenant is not None:
        with transaction.atomic():
            quota.allocate(op.tenant, image_bytes=0)  # the quota row lock, then the operation's row
            operations.release_reserved_quota(op.pk)


def _fernet() -> Fernet:
    key = hashlib.sha256(f"imaging.pull:{settings.SECRET_KEY}".encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


@transaction.atomic
def start_pull(
    *,
    actor: Actor,
    tenant: Tenant | None,
    reference: str,
    name: str = "",
    tag: str = "",
    username: str = "",
    password: str = "",
) -> Operation:
    """Queue a pull. Registry credentials are kept encrypted on the operation until it ends."""
    from imaging import tasks

    try:
        ref = parse_reference(reference)
    except RegistryError as exc:
        raise Invalid(str(exc), field="reference") from None
    name = name or ref.name
    tag = tag or ref.tag or (ref.digest or "")[7:19]
    _check_target(actor, tenant, name, tag, "image.pull")
    allowlist = list(getattr(settings, "BULKHEAD_REGISTRY_ALLOWLIST", []))
    try:
        # Checked here too so an obviously refused registry answers 400 at once.
        endpoint_for(ref.host, ref.port, allowlist)
    except RegistryError as exc:
        raise Invalid(str(exc), field="reference", audit_action="image.pull") from None
    params: dict[str, Any] = {"reference": str(ref), "name": name, "tag": tag}
    if username:
        secret = json.dumps({"username": username, "password": password}).encode()
        params["credentials"] = _fernet().encrypt(secret).decode()
    op = operations.start(kind="image.pull", task=tasks.pull_image, actor=actor, tenant=tenant, params=params)
    op.target_label = f"{name}:{tag}"
    op.save(update_fields=["target_label"])
    audit.record(
        actor,
        "image.pull",
        op,
        tenant=tenant,
        details={"reference": str(ref), "name": name, "tag": tag, "authenticated": bool(username)},
    )
    return op


# --- the work of imports and pulls (run by tasks) -----------------------------------------------


def _record_failure(op: Operation, action: str, message: str) -> None:
    """Audit a failed import or pull (outside any transaction the failure rolled back)."""
    audit.record(
        _actor_of(op),
        action,
        op,
        tenant=op.tenant,
        outcome=AuditOutcome.FAILED,
        details={"error": message[:500], **{k: v for k, v in op.params.items() if k != "credentials"}},
    )


def _stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def _keep_small_blob(store: LayerStore, data: bytes, digest: str) -> None:
    if not store.has_blob(digest):
        store.ingest_bytes(data, digest=digest)


def _plan_digests(plan: oci.ImagePlan) -> list[str]:
    return [
        plan.manifest_digest,
        plan.manifest.config.digest,
        *(d.digest for d in plan.manifest.layers),
        *plan.config.diff_ids,
    ]


def run_import(op_id: str, progress: Progress) -> dict[str, Any]:
    """Import an archive or layout: verify everything, store the blobs, unpack, then write rows."""
    op = Operation.objects.select_related("tenant", "actor").get(pk=op_id)
    store = get_store()
    before = store.stats()
    upload = op.params.get("upload", "")
    path: Path | None = None
    source: oci.BlobSource | None = None
    lease = store.acquire_lease(f"op-{op.pk}", ttl=TEMP_MAX_AGE)
    committed = False
    try:
        progress(2, "Reading the archive", force=True)
        if upload:
            if not UPLOAD_RE.match(upload):
                raise ImportFailed("The operation names an invalid upload.")
            path = upload_dir() / upload
            if not path.is_file():
                raise ImportFailed("The uploaded archive is gone.")
            source = oci.TarSource(path)
        else:
            source = oci.DirectorySource(op.params["directory"])
        plan = oci.plan_archive(source, f"{op.params['name']}:{op.params['tag']}")
        reserve_image_bytes(op, plan.manifest.layers, ImportFailed)
        lease.add(*_plan_digests(plan))
        written = _ingest_from_source(store, source, plan, progress)
        _keep_small_blob(store, plan.config_bytes, plan.manifest.config.digest)
        _keep_small_blob(store, plan.manifest_bytes, plan.manifest_digest)
        results = _unpack(store, plan, progress)
        source_kind = c.ImageSource.IMPORT if upload else c.ImageSource.DIRECTORY
        image = register_image(
            op=op,
            plan=plan,
            results=results,
            source=source_kind,
            reference=op.params.get("directory", ""),
        )
        committed = True
    except oci.ImageFormatError as exc:
        _record_failure(op, "image.import", str(exc))
        raise ImportFailed(str(exc)) from None
    except StoreError as exc:
        message = _store_message(exc)
        _record_failure(op, "image.import", message or INTERNAL_FAILURE)
        if message is None:
            raise  # the store itself failed: a generic text for the tenant, the error for operators
        raise ImportFailed(message) from None
    except ServiceError as exc:
        _record_failure(op, "image.import", exc.message)
        raise
    finally:
        if source is not None:
            source.close()
        if path is not None:
            path.unlink(missing_ok=True)
        _end_operation_lease(op, lease, committed)
    progress(100, "Imported", force=True)
    return {
        "image": str(image.pk),
        "manifest_digest": image.manifest_digest,
        "warnings": unpack_warnings(results),
        # Whether bytes were written tells what the shared store held before: operators only.
        operations.OPERATOR_ONLY: {
            "layer_bytes_written": written,
            "store": _stats_delta(before, store.stats()),
        },
    }


def _store_message(exc: StoreError) -> str | None:
    """What the tenant reads about a refusal of their content; None when the store itself failed (an
    I/O error names host paths: that text is for operators only)."""
    if isinstance(exc, UnsafeEntry):
        return f"The image has an unsafe entry {exc.path!r}: {exc.reason}."
    if isinstance(exc, DigestMismatch | SizeMismatch | LimitExceeded):
        return f"The image's content was refused: {exc}."
    return None


def _ingest_from_source(
    store: LayerStore, source: oci.BlobSource, plan: oci.ImagePlan, progress: Progress
) -> int:
    """Ingest each layer blob; one already in the store is only hashed, to prove the uploader has it."""
    total = max(plan.size, 1)
    done = 0
    written = 0
    for desc in plan.manifest.layers:
        member = oci.member_for(plan, desc.digest)
        if source.size(member) != desc.size:
            raise oci.ImageFormatError(f"The layer blob {desc.digest} is not {desc.size} bytes.")
        if store.has_blob(desc.digest):
            digest, size = oci.hash_stream(source.chunks(member), desc.size)
            if digest != desc.digest or size != desc.size:
                raise oci.ImageFormatError(f"The layer blob {desc.digest} does not match its digest.")
        else:
            store.ingest_chunks(source.chunks(member), digest=desc.digest, size=desc.size)
            written += desc.size
        done += desc.size
        progress(5 + 60 * done / total, f"Verified {done} of {plan.size} bytes")
    return written


def unpack_warnings(results: list[Any]) -> list[str]:
    """What unpacking left out of an image that the importer should know (device nodes today)."""
    skipped = [path for result in results for path in result.skipped_devices]
    if not skipped:
        return []
    shown = ", ".join(skipped[:20]) + (", …" if len(skipped) > 20 else "")
    return [f"{len(skipped)} device node(s) or FIFO(s) were left out; the runtime provides /dev: {shown}."]


def _unpack(store: LayerStore, plan: oci.ImagePlan, progress: Progress) -> list[Any]:
    progress(70, "Unpacking layers", force=True)
    specs = [
        LayerSpec(blob_digest=d.digest, media_type=d.media_type, diff_id=diff_id)
        for d, diff_id in zip(plan.manifest.layers, plan.config.diff_ids, strict=True)
    ]
    results = store.unpack_layers(specs)
    # Stack the layers as the runtimes will: links that loop are refused now, not at a start, and
    # a layer writing through a lower layer's symlinked directory gets this chain's variant now.
    store.lower_dirs([r.diff_id for r in results])
    progress(90, "Recording the image", force=True)
    return results


@transaction.atomic
def register_image(
    *,
    op: Operation,
    plan: oci.ImagePlan,
    results: list[Any],
    source: str,
    reference: str = "",
) -> Image:
    """Write Layer/Image/ImageLayer/TenantLayer rows and charge the tenant for layers new to it.

    What ``reserve_image_bytes`` already charged for this operation is settled to what the image adds.
    Idempotent: a repeated run of the same operation finds its image and returns
    it.
    """
    tenant: Tenant | None = op.tenant
    actor = _actor_of(op)
    name, tag = op.params["name"], op.params["tag"]
    if tenant is not None:
        quota.allocate(tenant, image_bytes=0)  # takes the quota row lock: held-layer checks serialize
    existing = Image.objects.select_for_update().filter(tenant=tenant, name=name, tag=tag).first()
    pending: Image | None = None
    if existing is not None:
        if existing.manifest_digest != plan.manifest_digest:
            raise Conflict(f"An image {name}:{tag} already exists.")
        if existing.ready:
            operations.release_reserved_quota(op.pk)
            return existing
        pending = existing  # a pushed image listed since its manifest was accepted: completed here
    layers: list[Layer] = []
    for desc, result in zip(plan.manifest.layers, results, strict=True):
        layer, _ = Layer.objects.get_or_create(
            digest=desc.digest,
            defaults={
                "diff_id": result.diff_id,
                "size": desc.size,
                "media_type": desc.media_type,
                "unpacked_size": result.size,
            },
        )
        layers.append(layer)
    if tenant is not None:
        held = set(
            TenantLayer.objects.filter(tenant=tenant, layer__in=layers).values_list("layer_id", flat=True)
        )
        new = {layer.pk: layer for layer in layers if layer.pk not in held}
        new_bytes = sum(layer.size for layer in new.values())
        try:
            reserved = operations.settle_reserved_quota(op.pk).get("image_bytes", 0)
            quota.allocate(tenant, image_bytes=max(new_bytes - reserved, 0))
            quota.release(tenant, image_bytes=max(reserved - new_bytes, 0))
        except quota.QuotaExceeded as exc:
            raise ImportFailed(
                f"The image needs {new_bytes} more bytes of image storage; {exc.used} of {exc.limit} "
                "are in use. Delete images or ask an operator for more quota."
            ) from None
        TenantLayer.objects.bulk_create([TenantLayer(tenant=tenant, layer=layer) for layer in new.values()])
    fields = {
        "manifest_digest": plan.manifest_digest,
        "config_digest": plan.manifest.config.digest,
        "platform": c.DEFAULT_PLATFORM,
        "config": plan.config.runtime,
        "size": plan.size,
        "source": source,
        "source_reference": reference[:500],
        "state": c.ImageState.READY,
    }
    if pending is not None:
        ImageLayer.objects.filter(image=pending).delete()  # none, unless a killed run left some
        Image.objects.filter(pk=pending.pk).update(**fields)
        image = Image.objects.get(pk=pending.pk)
    else:
        try:
            with transaction.atomic():
                image = Image.objects.create(tenant=tenant, name=name, tag=tag, **fields)
        except IntegrityError:
            raise Conflict(f"An image {name}:{tag} already exists.") from None
    ImageLayer.objects.bulk_create(
        [ImageLayer(image=image, layer=layer, position=i) for i, layer in enumerate(layers)]
    )
    Operation.objects.filter(pk=op.pk).update(
        target_type="image", target_id=str(image.pk), target_label=str(image)
    )
    audit.record(
        actor,
        f"image.{source}.succeeded",
        image,
        details={
            "manifest_digest": plan.manifest_digest,
            "size": plan.size,
            "operation": str(op.pk),
            "warnings": unpack_warnings(results),
        },
    )
    return image


def _pull_credentials(op: Operation) -> tuple[str, str]:
    token = op.params.get("credentials")
    if not token:
        return "", ""
    try:
        data = json.loads(_fernet().decrypt(token.encode()))
    except (InvalidToken, ValueError):
        return "", ""
    return str(data.get("username", "")), str(data.get("password", ""))


def _scrub_credentials(op: Operation) -> None:
    if "credentials" in op.params:
        params = {k: v for k, v in op.params.items() if k != "credentials"}
        Operation.objects.filter(pk=op.pk).update(params=params)


def _resolve_manifest(client: RegistryClient, reference: str) -> tuple[bytes, str, oci.Manifest]:
    data, _media_type, digest = client.manifest(reference)
    for _depth in range(c.MAX_INDEX_DEPTH + 1):
        doc = oci.load_json(data, "manifest")
        if oci.media_type_of(doc) in c.INDEX_TYPES:
            desc = oci.select_platform(oci.parse_index(doc))
            if desc.size > c.MAX_JSON_BYTES:
                raise oci.ImageFormatError("The platform manifest is too large.")
            data, _media_type, digest = client.manifest(desc.digest)
            if digest != desc.digest:
                raise oci.ImageFormatError("The registry sent a manifest that does not match the index.")
            continue
        return data, digest, oci.parse_manifest(doc)
    raise oci.ImageFormatError("The image indexes are nested too deeply.")


def run_pull(op_id: str, progress: Progress) -> dict[str, Any]:
    """Pull by reference: resolve to linux/amd64, fetch what the tenant lacks, verify, unpack, record."""
    op = Operation.objects.select_related("tenant", "actor").get(pk=op_id)
    store = get_store()
    before = store.stats()
    username, password = _pull_credentials(op)
    _scrub_credentials(op)
    lease = store.acquire_lease(f"op-{op.pk}", ttl=TEMP_MAX_AGE)
    committed = False
    written = 0
    try:
        ref = parse_reference(op.params["reference"])
        progress(2, f"Contacting {ref.registry}", force=True)
        with RegistryClient(
            ref,
            username=username,
            password=password,
            allowlist=list(getattr(settings, "BULKHEAD_REGISTRY_ALLOWLIST", [])),
            ca_bundle=getattr(settings, "BULKHEAD_REGISTRY_CA_BUNDLE", None),
        ) as client:
            manifest_bytes, manifest_digest, manifest = _resolve_manifest(client, ref.digest or ref.tag or "")
            # Before any blob is fetched: the manifest's descriptors say what the image needs.
            reserve_image_bytes(op, manifest.layers, PullFailed)
            config_bytes = client.blob_bytes(manifest.config, c.MAX_JSON_BYTES)
            plan = oci.check_plan(
                oci.ImagePlan(
                    manifest_digest=manifest_digest,
                    manifest_bytes=manifest_bytes,
                    manifest=manifest,
                    config_bytes=config_bytes,
                    config=oci.parse_config(config_bytes),
                )
            )
            lease.add(*_plan_digests(plan))
            held = _held_digests(op.tenant, [d.digest for d in manifest.layers])
            total, done = max(plan.size, 1), 0
            for desc in manifest.layers:
                if desc.digest in held and store.has_blob(desc.digest):
                    pass  # the tenant already has these bytes: nothing to prove, nothing to fetch
                elif store.has_blob(desc.digest):
                    with client.blob(desc) as chunks:
                        digest, size = oci.hash_stream(chunks, desc.size)
                    if digest != desc.digest or size != desc.size:
                        raise RegistryError(f"The registry sent content that does not match {desc.digest}.")
                else:
                    with client.blob(desc) as chunks:
                        store.ingest_chunks(chunks, digest=desc.digest, size=desc.size)
                    written += desc.size
                done += desc.size
                progress(5 + 60 * done / total, f"Fetched {done} of {plan.size} bytes")
        _keep_small_blob(store, config_bytes, manifest.config.digest)
        _keep_small_blob(store, manifest_bytes, manifest_digest)
        results = _unpack(store, plan, progress)
        image = register_image(
            op=op,
            plan=plan,
            results=results,
            source=c.ImageSource.PULL,
            reference=str(ref),
        )
        committed = True
    except (RegistryError, oci.ImageFormatError) as exc:
        _record_failure(op, "image.pull", str(exc))
        raise PullFailed(str(exc)) from None
    except StoreError as exc:
        message = _store_message(exc)
        _record_failure(op, "image.pull", message or INTERNAL_FAILURE)
        if message is None:
            raise
        raise PullFailed(message) from None
    except ServiceError as exc:
        _record_failure(op, "image.pull", exc.message)
        raise
    finally:
        _end_operation_lease(op, lease, committed)
    progress(100, "Pulled", force=True)
    return {
        "image": str(image.pk),
        "manifest_digest": image.manifest_digest,
        "warnings": unpack_warnings(results),
        # Whether bytes were written tells what the shared store held before: operators only.
        operations.OPERATOR_ONLY: {
            "layer_bytes_written": written,
            "store": _stats_delta(before, store.stats()),
        },
    }


def run_push(op_id: str, progress: Progress) -> dict[str, Any]:
    """Unpack an image pushed to the built-in registry (the checks of imports) and register it.

    The manifest and its blobs are in the store already (verified when pushed), and the Image is listed
    (`unpacking`) since the manifest PUT (`list_pushed_image`); this completes it. On failure the image
    and the tag this push set are removed again, so a refused image is neither listed nor pullable.
    """
    op = Operation.objects.select_related("tenant", "actor").get(pk=op_id)
    store = get_store()
    lease = store.acquire_lease(f"op-{op.pk}", ttl=TEMP_MAX_AGE)
    committed = False
    try:
        progress(2, "Reading the pushed manifest", force=True)
        manifest_bytes = store.read_blob(op.params["manifest_digest"])
        manifest = oci.parse_manifest(oci.load_json(manifest_bytes, "manifest"))
        config_bytes = store.read_blob(manifest.config.digest)
        plan = oci.check_plan(
            oci.ImagePlan(
                manifest_digest=op.params["manifest_digest"],
                manifest_bytes=manifest_bytes,
                manifest=manifest,
                config_bytes=config_bytes,
                config=oci.parse_config(config_bytes),
            )
        )
        lease.add(*_plan_digests(plan))
        image = _pushed_image(op)
        if image.ready:  # a repeated run of a finished push
            progress(100, "Pushed", force=True)
            return {"image": str(image.pk), "manifest_digest": image.manifest_digest, "warnings": []}
        results = _unpack(store, plan, progress)
        image = register_image(
            op=op, plan=plan, results=results, source=c.ImageSource.PUSH, reference=op.params["repository"]
        )
        committed = True
    except oci.ImageFormatError as exc:
        _fail_push(op, str(exc))
    except StoreError as exc:
        message = _store_message(exc)
        # The store itself failed: a generic text for the tenant, the error itself for operators.
        _fail_push(op, message or INTERNAL_FAILURE, cause=None if message else exc)
    except ServiceError as exc:
        _fail_push(op, exc.message)
    finally:
        _end_operation_lease(op, lease, committed)
    progress(100, "Pushed", force=True)
    return {
        "image": str(image.pk),
        "manifest_digest": image.manifest_digest,
        "warnings": unpack_warnings(results),
    }


def _pushed_image(op: Operation) -> Image:
    """The Image the manifest PUT listed for this push (gone: deleted while its layers waited)."""
    image = Image.objects.filter(
        tenant=op.tenant,
        name=op.params["name"],
        tag=op.params["tag"],
        manifest_digest=op.params["manifest_digest"],
    ).first()
    if image is None:
        raise PushFailed("The image was deleted before its layers were unpacked.")
    return image


@transaction.atomic
def list_pushed_image(
    *, actor: Actor, op: Operation, tenant: Tenant | None, name: str, tag: str, plan: oci.ImagePlan
) -> Image | None:
    """At a tag push's manifest PUT: the Image of the tenant at once, `unpacking` until `op` ends.

    A tag that named another image moves (that image is deleted, unless a workload uses it: then the
    push is refused before anything changed). The same manifest again: None (nothing new to unpack)
    when its image is ready or still being unpacked by an earlier push."""
    existing = Image.objects.select_for_update().filter(tenant=tenant, name=name, tag=tag).first()
    if existing is not None:
        if existing.manifest_digest == plan.manifest_digest and not existing.unpack_failed:
            return None
        if image_in_use(existing):
            raise Conflict(
                f"A workload uses the image {existing}; delete the workload or push another tag.",
                audit_action="registry.push",
            )
        if existing.ready:
            _delete_image(actor, existing)
        else:
            existing.delete()  # a failed unpack: no layers, no quota of its own
    image = Image.objects.create(
        tenant=tenant,
        name=name,
        tag=tag,
        manifest_digest=plan.manifest_digest,
        config_digest=plan.manifest.config.digest,
        platform=c.DEFAULT_PLATFORM,
        config=plan.config.runtime,
        size=plan.size,
        source=c.ImageSource.PUSH,
        state=c.ImageState.UNPACKING,
        operation=op,
    )
    Operation.objects.filter(pk=op.pk).update(target_type="image", target_id=str(image.pk))
    return image


def _fail_push(op: Operation, message: str, cause: BaseException | None = None) -> NoReturn:
    _record_failure(op, "image.push", message)
    # A refused image is neither listed nor pullable under its tag (the digest stays, like any manifest).
    Image.objects.filter(
        tenant=op.tenant,
        name=op.params["name"],
        tag=op.params["tag"],
        manifest_digest=op.params["manifest_digest"],
        state=c.ImageState.UNPACKING,
    ).delete()
    RegistryTag.objects.filter(
        tenant=op.tenant,
        repository=op.params["name"],
        tag=op.params["tag"],
        manifest__digest=op.params["manifest_digest"],
    ).delete()
    if cause is not None:
        raise cause
    raise PushFailed(message)


def _held_digests(tenant: Tenant | None, digests: Iterable[str]) -> set[str]:
    if tenant is None:
        return set()
    return set(
        TenantLayer.objects.filter(tenant=tenant, layer__digest__in=list(digests)).values_list(
            "layer__digest", flat=True
        )
    )


# --- commit: a workload's changes on top of its image -------------------------------------------

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _committed_config(base: Image, diff_ids: list[str]) -> dict[str, Any]:
    runtime = base.config or {}
    config: dict[str, Any] = {
        "Env": runtime.get("env") or [],
        "Entrypoint": runtime.get("entrypoint"),
        "Cmd": runtime.get("cmd"),
        "WorkingDir": runtime.get("workdir") or "",
        "User": runtime.get("user") or "",
    }
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {k: v for k, v in config.items() if v not in (None, "")},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def register_committed_image(
    *, actor: Actor, base: Image, tenant: Tenant, name: str, tag: str, layer: Layer, source_reference: str
) -> Image:
    """A new image of `tenant`: `base`'s layers plus `layer` (already in the portal's store, its DiffID
    proven by unpacking it here), with `base`'s runtime config. Writes the config and manifest blobs, the
    rows and the audit entry, and charges the tenant for the layers new to it (in the caller's
    transaction; QuotaExceeded or Conflict change nothing)."""
    validate_name_tag(name, tag)
    store = get_store()
    base_layers = [il.layer for il in base.image_layers.select_related("layer").order_by("position")]
    layers = [*base_layers, layer]
    config = _committed_config(base, [lyr.diff_id for lyr in layers])
    config_digest, config_size = store.ingest_bytes(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": lyr.media_type, "digest": lyr.digest, "size": lyr.size} for lyr in layers],
    }
    manifest_digest, _ = store.ingest_bytes(json.dumps(manifest, sort_keys=True).encode())
    quota.allocate(tenant, image_bytes=0)  # the quota row lock: held-layer checks serialize
    if Image.objects.filter(tenant=tenant, name=name, tag=tag).exists():
        raise Conflict(f"The image {name}:{tag} exists already.", field="name")
    held = set(TenantLayer.objects.filter(tenant=tenant, layer__in=layers).values_list("layer_id", flat=True))
    new = {lyr.pk: lyr for lyr in layers if lyr.pk not in held}
    quota.allocate(tenant, image_bytes=sum(lyr.size for lyr in new.values()))
    TenantLayer.objects.bulk_create([TenantLayer(tenant=tenant, layer=lyr) for lyr in new.values()])
    image = Image.objects.create(
        tenant=tenant,
        name=name,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        config=base.config,
        size=sum(lyr.size for lyr in layers),
        source="commit",
        source_reference=source_reference[:500],
    )
    ImageLayer.objects.bulk_create(
        [ImageLayer(image=image, layer=lyr, position=i) for i, lyr in enumerate(layers)]
    )
    audit.record(
        actor, "image.commit", image, details={"from": source_reference[:200], "layer": layer.digest}
    )
    return image


# --- tag, publish, delete -----------------------------------------------------------------------


def _copy_image(actor: Actor, image: Image, tenant: Tenant | None, name: str, tag: str, source: str) -> Image:
    require_ready(image)
    try:
        with transaction.atomic():
            copy = Image.objects.create(
                tenant=tenant,
                name=name,
                tag=tag,
                manifest_digest=image.manifest_digest,
                config_digest=image.config_digest,
                platform=image.platform,
                config=image.config,
                size=image.size,
                source=source,
                source_reference=str(image.pk),
            )
    except IntegrityError:
        raise Conflict(f"An image {name}:{tag} already exists.", field="tag") from None
    ImageLayer.objects.bulk_create(
        [
            ImageLayer(image=copy, layer_id=il.layer_id, position=il.position)
            for il in ImageLayer.objects.filter(image=image)
        ]
    )
    return copy


@transaction.atomic
def tag_image(*, actor: Actor, image: Image, name: str, tag: str) -> Image:
    """A new name:tag for the same content in the same tenant (no new bytes, no quota)."""
    validate_name_tag(name, tag)
    copy = _copy_image(actor, image, image.tenant, name, tag, c.ImageSource.TAG)
    audit.record(actor, "image.tag", copy, details={"from": str(image.pk), "name": name, "tag": tag})
    return copy


@transaction.atomic
def publish_image(*, actor: Actor, image: Image, name: str, tag: str) -> Image:
    """Operators: make a copy of an image public (readable by every signed-in user)."""
    _require_operator(actor, "image.publish")
    validate_name_tag(name, tag)
    copy = _copy_image(actor, image, None, name, tag, c.ImageSource.PUBLISH)
    audit.record(actor, "image.publish", copy, details={"from": str(image.pk), "name": name, "tag": tag})
    return copy


def delete_image(*, actor: Actor, image: Image) -> None:
    """Delete an image not used by a workload; layers no other image of the tenant uses are released."""
    if image_in_use(image):
        # Recorded outside the deleting transaction, which this refusal never opens.
        audit.record(actor, "image.delete", image, outcome=AuditOutcome.DENIED, details={"reason": "in use"})
        raise Conflict("A workload uses this image; delete the workload first.")
    try:
        _delete_image(actor, image)
    except ProtectedError:
        audit.record(actor, "image.delete", image, outcome=AuditOutcome.DENIED, details={"reason": "in use"})
        raise Conflict("A workload uses this image; delete the workload first.") from None


@transaction.atomic
def _delete_image(actor: Actor, image: Image) -> None:
    tenant = image.tenant
    details = {"name": image.name, "tag": image.tag, "manifest_digest": image.manifest_digest}
    audit.record(actor, "image.delete", image, details=details)
    if tenant is not None:
        quota.allocate(tenant, image_bytes=0)  # the quota row lock, as in register_image
    layer_ids = set(ImageLayer.objects.filter(image=image).values_list("layer_id", flat=True))
    image.delete()
    # The registry's tag of a pushed image goes with it (the manifest stays pullable by digest).
    RegistryTag.objects.filter(
        tenant=tenant, repository=image.name, tag=image.tag, manifest__digest=image.manifest_digest
    ).delete()
    if tenant is None:
        return
    still_used = set(
        ImageLayer.objects.filter(image__tenant=tenant, layer_id__in=layer_ids).values_list(
            "layer_id", flat=True
        )
    )
    freed = layer_ids - still_used
    if freed:
        freed_bytes = Layer.objects.filter(pk__in=freed).aggregate(n=Sum("size"))["n"] or 0
        TenantLayer.objects.filter(tenant=tenant, layer_id__in=freed).delete()
        quota.release(tenant, image_bytes=freed_bytes)


# --- the store: usage and garbage collection ----------------------------------------------------


def _tree_usage(path: Path) -> tuple[int, int]:
    """(bytes, top-level entries) under a store directory; hidden temporaries are not entries."""
    if not path.is_dir():
        return 0, 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    entries = sum(1 for e in os.scandir(path) if not e.name.startswith("."))
    return total, entries


def store_usage(user: Any) -> dict[str, Any]:
    """Operators: bytes of blobs, layers and disks on disk and per-tenant use; others their tenants'."""
    tenants = Tenant.objects.for_user(user, "view").order_by("name")
    images = dict(
        Image.objects.filter(tenant__in=tenants).values_list("tenant").annotate(n=Count("id")).order_by()
    )
    layers = dict(
        TenantLayer.objects.filter(tenant__in=tenants)
        .values_list("tenant")
        .annotate(n=Count("id"))
        .order_by()
    )
    quotas = {q.tenant_id: q for q in Quota.objects.filter(tenant__in=tenants)}
    rows = [
        {
            "tenant": str(t.pk),
            "tenant_name": t.name,
            "images": images.get(t.pk, 0),
            "layers": layers.get(t.pk, 0),
            "image_bytes": quotas[t.pk].used_image_bytes if t.pk in quotas else 0,
            "image_bytes_limit": quotas[t.pk].image_bytes if t.pk in quotas else 0,
        }
        for t in tenants
    ]
    body: dict[str, Any] = {"tenants": rows}
    if acts_as_operator(user):
        root = get_store().root
        store: dict[str, Any] = {"root": str(root)}
        for part, sub in (("blobs", "blobs/sha256"), ("layers", "layers/sha256"), ("disks", "disks")):
            size, count = _tree_usage(root / sub)
            store[f"{part}_bytes"] = size
            store[f"{part}_count"] = count
        body["store"] = store
        body["database"] = {
            "images": Image.objects.count(),
            "public_images": Image.objects.filter(tenant__isnull=True).count(),
            "layers": Layer.objects.count(),
            "layer_bytes": Layer.objects.aggregate(n=Sum("size"))["n"] or 0,
        }
    return body


@transaction.atomic
def start_gc(*, actor: Actor) -> Operation:
    """Operators: queue a garbage collection of the layer store."""
    from imaging import tasks

    _require_operator(actor, "store.gc")
    op = operations.start(kind="store.gc", task=tasks.gc_store, actor=actor, params={})
    op.target_label = "layer store"
    op.save(update_fields=["target_label"])
    audit.record(actor, "store.gc", op)
    return op


def run_gc(op_id: str, progress: Progress) -> dict[str, Any]:
    """Keep what the database references (and what live leases name); remove everything else."""
    op = Operation.objects.get(pk=op_id)
    progress(10, "Collecting references", force=True)
    with transaction.atomic():
        Layer.objects.filter(image_layers__isnull=True, tenant_layers__isnull=True).delete()
    keep_blobs: set[str] = set()
    keep_layers: set[str] = set()
    chains: dict[uuid.UUID, list[str]] = {}
    for image_id, digest, diff_id in ImageLayer.objects.order_by("image_id", "position").values_list(
        "image_id", "layer__digest", "layer__diff_id"
    ):
        keep_blobs.add(digest)
        keep_layers.add(diff_id)
        chains.setdefault(image_id, []).append(diff_id)
    for manifest, config in Image.objects.values_list("manifest_digest", "config_digest"):
        keep_blobs.update((manifest, config))
    # The built-in registry's pushed content (abandoned uploads and orphan blobs expire first).
    expired = registry_services.expire_abandoned()
    keep_blobs.update(RegistryBlob.objects.values_list("digest", flat=True))
    for manifest, references in RegistryManifest.objects.values_list("digest", "references"):
        keep_blobs.add(manifest)
        keep_blobs.update(references or [])
    keep_disks = {chain_id(ids) for ids in chains.values() if ids}
    progress(40, "Removing unreferenced content", force=True)
    started = time.monotonic()
    report = get_store().gc(
        keep_blobs=keep_blobs, keep_layers=keep_layers, keep_disks=keep_disks, temp_max_age=TEMP_MAX_AGE
    )
    result = {
        **asdict(report),
        "seconds": round(time.monotonic() - started, 3),
        "expired_uploads": expired["uploads"],
        "expired_registry_blobs": expired["blobs"],
    }
    audit.record(_actor_of(op), "store.gc.succeeded", op, details=result)
    return result
