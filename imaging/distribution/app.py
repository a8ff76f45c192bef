"""The built-in registry at `/v2/`: the OCI Distribution Spec's pull and discovery endpoints, as a small
ASGI application beside Django (bodies stream in bounded chunks; Django would buffer them).

Pull serves what imports, pulls and commits stored: manifests, configs and layer blobs straight from the
layer store, by tag or digest, `HEAD` and `GET`, blobs with `Range`. A blob is served only through a
repository the caller may pull that references it: dedup in the store grants nothing.

Push (`imaging.distribution.services`): upload sessions (`POST`, chunked `PATCH` with `Content-Range`,
status by `GET`, `PUT ?digest=` to finish, the single-`POST` form, `DELETE` to cancel), mounts from a
repository the pusher may pull, manifests by tag or digest, and deletes. Bodies are read in bounded
chunks into the upload's file; an upload past what the tenant's quota leaves is refused (`DENIED`) before
its bytes reach the store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async

from imaging.distribution import access
from imaging.distribution import services as push
from imaging.distribution.access import Grant, NameInvalid, Principal, Repository

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHUNK_BYTES = 1024 * 1024
# Blob bodies go out in larger messages: fewer hops between the event loop, threads and Twisted.
SEND_CHUNK_BYTES = 4 * 1024 * 1024
# The ASGI zero-copy extension (the server sends a file with sendfile); portal.daphne_streaming offers it.
ZEROCOPY = "http.response.zerocopy"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
UPLOAD_ROUTE_RE = re.compile(r"^/v2/(?P<name>.+?)/blobs/uploads/?(?P<upload>[^/]*)$")
ROUTE_RE = re.compile(
    r"^/v2/(?P<name>.+?)/(?:(?P<kind>manifests|blobs|referrers)/(?P<reference>[^/]+)|(?P<tags>tags/list))$"
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
BASE_HEADERS = [(b"docker-distribution-api-version", b"registry/2.0")]


class RegistryApp:
    """Routes `/v2/...` to the registry; everything else to `inner` (Django, Channels)."""

    def __init__(self, inner: Callable[..., Awaitable[None]]) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v2" or path.startswith("/v2/")):
            await handle(scope, receive, send)
        else:
            await self.inner(scope, receive, send)


async def handle(scope: Scope, receive: Receive, send: Send) -> None:
    try:
        await _handle(scope, receive, send)
    except access.LoginThrottled:  # raised while authenticating: before any response started
        await _error(send, 429, "TOOMANYREQUESTS", "too many failed logins; wait a minute and retry")


def _client_address(scope: Scope, headers: dict[str, str]) -> str | None:
    """The client's address as the API and the sign-in form see it (a trusted proxy's header honoured)."""
    from django.conf import settings

    from portal.client_address import client_address

    meta = {"REMOTE_ADDR": (scope.get("client") or [None])[0]}
    header = settings.BULKHEAD_CLIENT_IP_HEADER.lower()
    if header in headers:
        meta["HTTP_" + header.upper().replace("-", "_")] = headers[header]
    return client_address(meta)


async def _handle(scope: Scope, receive: Receive, send: Send) -> None:
    method = scope["method"]
    path = scope["path"]
    headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
    address = _client_address(scope, headers)
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if path in ("/v2", "/v2/"):
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _is_host_credential(token.strip()):
            await _host_fetch(send, method, headers, None, None, token.strip(), zerocopy=False)
            return
        grant = await _grant_from_headers(headers, address)
        if grant is None or grant.principal is None:
            await _challenge(send, headers, scope_text=None)
            return
        await _json(send, 200, {})
        return
    if path == "/v2/token":
        await _token_endpoint(send, headers, query, address)
        return
    upload_route = UPLOAD_ROUTE_RE.match(path)
    route = None if upload_route else ROUTE_RE.match(path)
    matched = upload_route or route
    if matched is None:
        await _error(send, 404, "NAME_UNKNOWN", "no such repository or endpoint")
        return
    try:
        repository = access.parse_name(matched["name"])
    except NameInvalid:
        await _error(send, 400, "NAME_INVALID", "not a repository name under a tenant or library/")
        return
    action = _action_for(method, upload_route is not None, route)
    if action is None:
        await _error(send, 405, "UNSUPPORTED", "this method is not supported here")
        return
    looked_up: _LookedUp | None = None
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _is_host_credential(token.strip()):
        zerocopy = ZEROCOPY in (scope.get("extensions") or {})
        await _host_fetch(send, method, headers, repository, route, token.strip(), zerocopy)
        return
    if action == "pull" and route is not None and route["kind"] == "manifests" and scheme.lower() == "bearer":
        # The commonest request (a manifest pull with a bearer token): one trip to the database thread.
        grant, looked_up = await sync_to_async(_bearer_manifest_pull)(
            token.strip(), repository, route["reference"]
        )
    else:
        grant = await _grant_from_headers(headers, address)
    if action == "pull":
        if grant is None or not await _allows(grant, repository.name, "pull"):
            await _deny(grant, repository, "pull")
            await _challenge(send, headers, scope_text=f"repository:{repository.name}:pull")
            return
    elif not await _authorized(send, headers, grant, repository, action):
        return
    assert grant is not None
    try:
        if upload_route is not None:
            await _uploads(send, receive, method, headers, query, grant, repository, upload_route["upload"])
        elif route is not None and route["tags"]:
            await _tags(send, repository, query)
        elif route is not None and route["kind"] == "manifests":
            if method == "PUT":
                await _put_manifest(send, receive, headers, grant, repository, route["reference"])
            elif method == "DELETE":
                await _delete_manifest(send, grant, repository, route["reference"])
            else:
                await _manifest(send, method, repository, route["reference"], looked_up)
        elif route is not None and route["kind"] == "blobs":
            if method == "DELETE":
                await _delete_blob(send, grant, repository, route["reference"])
            else:
                zerocopy = ZEROCOPY in (scope.get("extensions") or {})
                await _blob(send, method, headers, repository, route["reference"], zerocopy)
        elif route is not None:
            await _referrers(send, repository, route["reference"], query)
    except push.RegistryRefusal as refusal:
        if isinstance(refusal, push.Denied | push.InUse) and grant.principal is not None:
            await sync_to_async(_audit_denied)(
                grant.principal,
                refusal.audit_action or f"registry.{action}",
                {"repository": repository.name, "reason": refusal.message},
            )
        await _error(send, refusal.status_code, refusal.registry_code, refusal.message)


def _action_for(method: str, upload: bool, route: re.Match[str] | None) -> str | None:
    """The token action a request needs (pull, push, delete), None: a method the endpoint lacks."""
    if upload:
        return "push" if method in ("POST", "PATCH", "PUT", "GET", "DELETE") else None
    assert route is not None
    if method in ("GET", "HEAD"):
        return "pull"
    if route["kind"] == "manifests":
        return {"PUT": "push", "DELETE": "delete"}.get(method)
    if route["kind"] == "blobs" and method == "DELETE":
        return "delete"
    return None


async def _authorized(
    send: Send, headers: dict[str, str], grant: Grant | None, repository: Repository, action: str
) -> bool:
    """Push and delete: 401 to ask for a token with the scope (client retries), DENIED when the
    principal may not do it at all (audited). A missing repository and a foreign one answer alike."""
    scope_text = f"repository:{repository.name}:pull,{action}"
    if grant is None or grant.principal is None:
        await _challenge(send, headers, scope_text=scope_text)
        return False
    if await _allows(grant, repository.name, action):
        return True
    may = await sync_to_async(access.granted_actions)(grant.principal, repository, [action])
    if may:
        await _challenge(send, headers, scope_text=scope_text)
        return False
    await _deny(grant, repository, action)
    await _error(send, 403, "DENIED", "requested access to the resource is denied")
    return False


# --- auth ---------------------------------------------------------------------------------------------


async def _grant_from_headers(headers: dict[str, str], address: str | None) -> Grant | None:
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value:
        return await sync_to_async(access.verify_token)(value.strip())
    if scheme.lower() == "basic" and value:
        principal = await _basic_principal(value, address)
        if principal is None:
            return None
        # Basic on the resource itself (curl): every repository the user may pull, checked per request.
        return _BasicGrant(principal)
    return None


async def _allows(grant: Grant, name: str, action: str) -> bool:
    """A bearer token's grant is read from the token itself (no thread hop); Basic asks the database."""
    if isinstance(grant, _BasicGrant):
        return bool(await sync_to_async(grant.allows)(name, action))
    return grant.allows(name, action)


class _BasicGrant(Grant):
    def __init__(self, principal: Principal) -> None:
        super().__init__(principal, {})

    def allows(self, name: str, action: str) -> bool:
        try:
            repository = access.parse_name(name)
        except NameInvalid:
            return False
        return action in access.granted_actions(self.principal, repository, [action])


async def _basic_principal(value: str, address: str | None) -> Principal | None:
    """The user of a Basic header; a refusal is counted and audited by `access.principal_from_basic`."""
    try:
        username, _, secret = base64.b64decode(value.strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        await sync_to_async(_audit_denied)(None, "registry.login", {"reason": "malformed Basic header"})
        return None
    return await sync_to_async(access.principal_from_basic)(username, secret, address)


async def _token_endpoint(
    send: Send, headers: dict[str, str], query: dict[str, list[str]], address: str | None
) -> None:
    principal = None
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        principal = await _basic_principal(value, address)
        if principal is None:
            await _error(send, 401, "UNAUTHORIZED", "unknown user or wrong token")
            return
    entries = []
    for text in query.get("scope", []):
        for one in text.split(" "):
            kind, _, rest = one.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            try:
                repository = access.parse_name(name)
            except NameInvalid:
                continue
            wanted = [action for action in actions.split(",") if action]
            granted = await sync_to_async(access.granted_actions)(principal, repository, wanted)
            entries.append({"type": "repository", "name": name, "actions": granted})
    token = await sync_to_async(access.issue_token)(principal, entries)
    await _json(send, 200, {"token": token, "access_token": token, "expires_in": access.TOKEN_SECONDS})


async def _challenge(send: Send, headers: dict[str, str], scope_text: str | None) -> None:
    scheme = "https" if headers.get("x-forwarded-proto") == "https" else "http"
    realm = f"{scheme}://{headers.get('host', 'localhost')}/v2/token"
    challenge = f'Bearer realm="{realm}",service="bulkhead"'
    if scope_text:
        challenge += f',scope="{scope_text}"'
    await _error(
        send, 401, "UNAUTHORIZED", "authentication required", [(b"www-authenticate", challenge.encode())]
    )


async def _deny(grant: Grant | None, repository: Repository, action: str) -> None:
    if grant is not None and grant.principal is not None:
        await sync_to_async(_audit_denied)(
            grant.principal, f"registry.{action}", {"repository": repository.name}
        )


def _audit_denied(principal: Principal | None, action: str, details: dict[str, Any]) -> None:
    from tenants import audit
    from tenants.actors import Actor

    actor = Actor(user=principal.user, token=principal.token) if principal else Actor()
    audit.record_denied(actor, action, **details)


# --- pull ----------------------------------------------------------------------------------------------


def _images(repository: Repository) -> Any:
    from imaging.models import Image

    if repository.tenant_name is None:
        return Image.objects.filter(tenant__isnull=True, name=repository.image_name)
    return Image.objects.filter(tenant__name=repository.tenant_name, name=repository.image_name)


def _registry_rows(model: Any, repository: Repository) -> Any:
    """Rows of the registry's own metadata (pushed manifests, tags, proved blobs) of a repository."""
    rows = model.objects.filter(repository=repository.image_name)
    if repository.tenant_name is None:
        return rows.filter(tenant__isnull=True)
    return rows.filter(tenant__name=repository.tenant_name)


def _find_manifest(repository: Repository, reference: str) -> tuple[bytes, str, str] | None:
    from imaging.models import RegistryManifest, RegistryTag
    from imaging.services import get_store
    from imaging.store import StoreError

    digest, media_type = None, None
    if DIGEST_RE.match(reference):
        pushed = _registry_rows(RegistryManifest, repository).filter(digest=reference).first()
        if pushed is not None:
            digest, media_type = pushed.digest, pushed.media_type
    else:
        tagged = (
            _registry_rows(RegistryTag, repository).select_related("manifest").filter(tag=reference).first()
        )
        if tagged is not None:
            digest, media_type = tagged.manifest.digest, tagged.manifest.media_type
    if digest is None:
        images = _images(repository)
        image = (
            images.filter(manifest_digest=reference).first()
            if DIGEST_RE.match(reference)
            else images.filter(tag=reference).first()
        )
        if image is None:
            return None
        digest = image.manifest_digest
    try:
        body = get_store().read_blob(digest)
    except (StoreError, OSError):
        return None
    if media_type is None:
        try:
            media_type = str(json.loads(body).get("mediaType") or OCI_MANIFEST)
        except ValueError:
            media_type = OCI_MANIFEST
    return body, digest, media_type


@dataclass(frozen=True)
class _LookedUp:
    """A manifest looked up together with the token's check (`found` None: no such manifest)."""

    found: tuple[bytes, str, str] | None


def _bearer_manifest_pull(
    token: str, repository: Repository, reference: str
) -> tuple[Grant | None, _LookedUp | None]:
    """The grant of a bearer token and, when it may pull the repository, the manifest it asks for."""
    grant = access.verify_token(token) if token else None
    if grant is None or not grant.allows(repository.name, "pull"):
        return grant, None
    if not (DIGEST_RE.match(reference) or TAG_RE.match(reference)):
        return grant, None
    return grant, _LookedUp(_find_manifest(repository, reference))


async def _manifest(
    send: Send, method: str, repository: Repository, reference: str, looked_up: _LookedUp | None = None
) -> None:
    if not (DIGEST_RE.match(reference) or TAG_RE.match(reference)):
        await _error(send, 400, "MANIFEST_INVALID", "not a tag or a sha256 digest")
        return
    if looked_up is not None:
        found = looked_up.found
    else:
        found = await sync_to_async(_find_manifest)(repository, reference)
    if found is None:
        await _error(send, 404, "MANIFEST_UNKNOWN", "no such manifest in this repository")
        return
    body, digest, media_type = found
    headers = [
        (b"content-type", media_type.encode()),
        (b"docker-content-digest", digest.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await _respond(send, 200, headers, b"" if method == "HEAD" else body)


def blob_path_in(repository: Repository, digest: str) -> str | None:
    """The blob's file, if this repository references it (a layer, config or manifest of its images or
    pushed manifests) or a push proved it here."""
    from django.db.models import Q

    from imaging.models import RegistryBlob, RegistryManifest
    from imaging.services import get_store

    referenced = (
        _images(repository)
        .filter(Q(config_digest=digest) | Q(manifest_digest=digest) | Q(image_layers__layer__digest=digest))
        .exists()
        or _registry_rows(RegistryBlob, repository).filter(digest=digest).exists()
        or _registry_rows(RegistryManifest, repository)
        .filter(Q(digest=digest) | Q(references__contains=[digest]))
        .exists()
    )
    if not referenced:
        return None
    path = get_store().blob_path(digest)
    return str(path) if path.is_file() else None


async def _blob(
    send: Send, method: str, headers: dict[str, str], repository: Repository, digest: str, zerocopy: bool
) -> None:
    if not DIGEST_RE.match(digest):
        await _error(send, 400, "DIGEST_INVALID", "not a sha256 digest")
        return
    path = await sync_to_async(blob_path_in)(repository, digest)
    if path is None:
        await _error(send, 404, "BLOB_UNKNOWN", "no such blob in this repository")
        return
    await _send_blob(send, method, headers, path, digest, zerocopy)


# --- a host's agent --------------------------------------------------------------------------------------


def _is_host_credential(secret: str) -> bool:
    from compute.hosts import HOST_CREDENTIAL_PREFIX

    return secret.startswith(HOST_CREDENTIAL_PREFIX)


async def _host_fetch(
    send: Send,
    method: str,
    headers: dict[str, str],
    repository: Repository | None,
    route: re.Match[str] | None,
    secret: str,
    zerocopy: bool,
) -> None:
    """A host's agent with its own credential (`Bearer bhh_…`): it may GET or HEAD a blob of an image that
    a workload placed on it uses, through that image's repository, and nothing else (no manifest, tag
    list, push or delete; `repository` None: the registry's root, where a client's login would start).
    What it may not fetch answers like a missing blob and is audited."""
    host = await sync_to_async(_current_host)(secret)
    if host is None:
        await _error(send, 401, "UNAUTHORIZED", "a current host credential is needed", _HOST_CHALLENGE)
        return
    digest = route["reference"] if route is not None and route["kind"] == "blobs" else None
    if repository is None or digest is None or method not in ("GET", "HEAD"):
        await sync_to_async(_audit_host_denied)(host, "host.registry", repository, method)
        await _error(send, 403, "DENIED", "a host may only fetch the blobs of its workloads' images")
        return
    if not DIGEST_RE.match(digest):
        await _error(send, 400, "DIGEST_INVALID", "not a sha256 digest")
        return
    path = await sync_to_async(_blob_for_host)(host, repository, digest)
    if path is None:
        await _error(send, 404, "BLOB_UNKNOWN", "no such blob in this repository")
        return
    await _send_blob(send, method, headers, path, digest, zerocopy)


_HOST_CHALLENGE = [(b"www-authenticate", b'Bearer realm="bulkhead-hosts"')]


def _current_host(secret: str) -> Any:
    from compute.hosts import host_for_credential
    from tenants import audit
    from tenants.actors import Actor

    host = host_for_credential(secret)
    if host is None:
        audit.record_denied(Actor(), "auth.host", reason="bad host credential")
    return host


def _blob_for_host(host: Any, repository: Repository, digest: str) -> str | None:
    """The blob's file if an image of this repository that a workload on the host runs uses it."""
    from django.db.models import Q

    from imaging.services import get_store

    placed = (
        _images(repository)
        .filter(workloads__host=host)
        .filter(Q(config_digest=digest) | Q(manifest_digest=digest) | Q(image_layers__layer__digest=digest))
        .exists()
    )
    path = get_store().blob_path(digest) if placed else None
    if path is None or not path.is_file():
        _audit_host_denied(host, "host.blob.fetch", repository, "GET", digest=digest)
        return None
    return str(path)


def _audit_host_denied(
    host: Any, action: str, repository: Repository | None, method: str, **details: Any
) -> None:
    from tenants import audit
    from tenants.actors import Actor

    name = repository.name if repository is not None else ""  # None: the registry's root (`/v2/`)
    audit.record_denied(Actor.system(f"host {host.name}"), action, repository=name, method=method, **details)


async def _send_blob(
    send: Send, method: str, headers: dict[str, str], path: str, digest: str, zerocopy: bool
) -> None:
    """The blob's file as the response: `Range` honoured, sent by the server itself when it can."""
    size = await asyncio.to_thread(_stat_size, path)
    start, end = 0, size - 1
    status = 200
    extra: list[tuple[bytes, bytes]] = []
    if "range" in headers:
        parsed = _parse_range(headers["range"], size)
        if parsed is None:
            await _error(
                send,
                416,
                "RANGE_INVALID",
                "unsatisfiable range",
                [(b"content-range", f"bytes */{size}".encode())],
            )
            return
        start, end = parsed
        status = 206
        extra.append((b"content-range", f"bytes {start}-{end}/{size}".encode()))
    response_headers = [
        (b"content-type", b"application/octet-stream"),
        (b"docker-content-digest", digest.encode()),
        (b"content-length", str(end - start + 1 if size else 0).encode()),
        (b"accept-ranges", b"bytes"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": BASE_HEADERS + response_headers})
    if method == "HEAD" or size == 0:
        await send({"type": "http.response.body", "body": b""})
        return
    if zerocopy and method == "GET":
        # The server sends the file itself (sendfile): no byte of it passes through Python.
        with open(path, "rb") as handle:
            await send({"type": ZEROCOPY, "file": handle, "offset": start, "count": end - start + 1})
        return
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(handle.seek, start)
        remaining = end - start + 1
        # The next chunk is read while this one is sent: disk and socket work at the same time.
        reading = asyncio.ensure_future(asyncio.to_thread(handle.read, min(SEND_CHUNK_BYTES, remaining)))
        while remaining > 0:
            chunk = await reading
            if not chunk:
                break
            remaining -= len(chunk)
            if remaining > 0:
                reading = asyncio.ensure_future(
                    asyncio.to_thread(handle.read, min(SEND_CHUNK_BYTES, remaining))
                )
            await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
        if remaining > 0:
            await send({"type": "http.response.body", "body": b""})
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reading
        await asyncio.to_thread(handle.close)


def _stat_size(path: str) -> int:
    import os

    return os.stat(path).st_size


def _parse_range(text: str, size: int) -> tuple[int, int] | None:
    # At most 19 digits (an int64, as any file size): int() of thousands of digits raises, a 500.
    match = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", text.strip())
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # the last N bytes
        length = int(match[2])
        return (max(0, size - length), size - 1) if length else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start <= end < size else None


def _tag_page(repository: Repository, limit: int | None, last: str) -> list[str] | None:
    """A page of the repository's tags (imported and pushed), None if the repository has none."""
    from imaging.models import RegistryManifest, RegistryTag

    tags = set(_images(repository).values_list("tag", flat=True))
    tags.update(_registry_rows(RegistryTag, repository).values_list("tag", flat=True))
    if not tags and not _registry_rows(RegistryManifest, repository).exists():
        return None
    ordered = sorted(tag for tag in tags if tag > last) if last else sorted(tags)
    return ordered[:limit] if limit is not None else ordered


async def _tags(send: Send, repository: Repository, query: dict[str, list[str]]) -> None:
    limit_text = (query.get("n") or [""])[0]
    limit = int(limit_text) if limit_text.isdigit() else None
    last = (query.get("last") or [""])[0]
    tags = await sync_to_async(_tag_page)(repository, limit, last)
    if tags is None:
        await _error(send, 404, "NAME_UNKNOWN", "no such repository")
        return
    headers: list[tuple[bytes, bytes]] = []
    if limit is not None and len(tags) == limit and tags:
        link = f'</v2/{repository.name}/tags/list?n={limit}&last={tags[-1]}>; rel="next"'
        headers.append((b"link", link.encode()))
    await _json(send, 200, {"name": repository.name, "tags": tags}, headers)


async def _referrers(send: Send, repository: Repository, digest: str, query: dict[str, list[str]]) -> None:
    """The manifests of this repository whose subject is `digest` (signatures, SBOMs), as an index; an
    empty one when there are none (or the subject is unknown), as the spec asks."""
    if not DIGEST_RE.match(digest):
        await _error(send, 400, "DIGEST_INVALID", "not a sha256 digest")
        return
    artifact_type = (query.get("artifactType") or [""])[0][:255]
    manifests = await sync_to_async(push.referrers)(repository, digest, artifact_type)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    headers = [(b"content-type", OCI_INDEX.encode())]
    if artifact_type:
        headers.append((b"oci-filters-applied", b"artifactType"))
    await _json(send, 200, index, headers)


# --- push ------------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _UploadWriter:
    """Appends to an upload's file from a worker thread, hashing what it writes (the PUT then need
    not read the file again) and letting the kernel write it back as it goes (the store's fsync at
    the PUT is then short)."""

    WRITEBACK_BYTES = 16 * 1024 * 1024

    def __init__(self, handle: Any, hashed: push.UploadHash | None) -> None:
        self.handle = handle
        self.hashed = hashed
        self.unsynced = 0

    def write(self, data: bytes | bytearray) -> None:
        self.handle.write(data)
        if self.hashed is not None:
            self.hashed.hasher.update(data)
            self.hashed.size += len(data)
        self.unsynced += len(data)
        if self.unsynced >= self.WRITEBACK_BYTES:
            from imaging.services import get_store

            self.handle.flush()
            get_store().start_writeback(self.handle.fileno())
            self.unsynced = 0


async def _append_body(receive: Receive, upload: Any, room: RoomGrant | None) -> int:
    """Append the request body to the upload's file in bounded chunks, within the room `room` grants.

    The file is locked while written, so two requests cannot interleave bytes in one upload.
    """
    import fcntl

    handle = await asyncio.to_thread(open, str(push.upload_path(upload)), "ab")
    try:
        try:
            await asyncio.to_thread(fcntl.flock, handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise push.RegistryRefusal("another request is writing this upload") from None
        size_now = (await asyncio.to_thread(os.fstat, handle.fileno())).st_size
        writer = _UploadWriter(handle, push.upload_hash(upload, size_now))
        written = 0
        pending = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise push.RegistryRefusal("the client went away")
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if room is not None and written + len(chunk) > room.limit:
                # Past the reservation: what is buffered goes to disk first, so the store's count of
                # the session (its file) is exact when more room is asked for.
                await asyncio.to_thread(writer.write, pending)
                pending = bytearray()
                await room.extend(written, written + len(chunk))
            written += len(chunk)
            if not pending and len(chunk) >= CHUNK_BYTES:
                await asyncio.to_thread(writer.write, chunk)  # large enough as it came: no copy
                continue
            pending += chunk
            if len(pending) >= CHUNK_BYTES or (not more and pending):
                await asyncio.to_thread(writer.write, pending)
                pending = bytearray()
        await asyncio.to_thread(handle.flush)
        return written
    except BaseException:
        push.forget_upload_hash(upload)  # what reached the file is not known exactly
        raise
    finally:
        await asyncio.to_thread(handle.close)


class RoomGrant:
    """What one request may append to an upload, reserved under the tenant's quota lock.

    A body of declared length reserves all of it at once. A streamed body (no Content-Length, as
    skopeo and podman send layers) reserves a step at a time: parallel streamed uploads of one tenant
    then share the room instead of the first one holding all of it. A request that finds no room
    waits briefly when other requests hold room they may give back unwritten."""

    STEP_BYTES = 32 * 1024 * 1024
    RETRIES = 10
    RETRY_SECONDS = 0.2

    def __init__(self, upload: Any, repository: Repository) -> None:
        self.upload = upload
        self.repository = repository
        self.limit = 0
        self.left = 0

    async def reserve(self, written: int, wanted: int, enough: int) -> bool:
        """Reserve up to `wanted` bytes past the `written` ones of this request (already on disk);
        False when not even `enough` could be had."""
        reserve = sync_to_async(push.reserve_upload_room)
        for attempt in range(self.RETRIES + 1):
            reserved = await reserve(self.upload, self.repository, wanted)
            self.limit, self.left = written + reserved.granted, reserved.left
            if reserved.granted >= enough:
                return True
            if reserved.granted + reserved.lent < enough or attempt == self.RETRIES:
                return False  # even what the others hold for a moment would not be enough
            await asyncio.sleep(self.RETRY_SECONDS)
        return False

    async def extend(self, written: int, needed: int) -> None:
        if not await self.reserve(written, max(self.STEP_BYTES, needed - written), needed - written):
            raise _BodyTooLarge


async def _write_upload(
    receive: Receive, headers: dict[str, str], grant: Grant, repository: Repository, upload: Any
) -> None:
    """The body into the upload, refused with DENIED (and the upload dropped) past the quota's room."""
    declared_text = headers.get("content-length", "")
    declared = int(declared_text) if declared_text.isdigit() else None
    # The room is reserved before the first byte: many sessions at once, or parallel requests, hold no
    # more of the host's disk together than the tenant's quota leaves.
    room: RoomGrant | None = None
    if repository.tenant_name is not None:  # the operators' public namespace has no quota
        room = RoomGrant(upload, repository)
    try:
        if room is not None:
            if declared is None:
                await room.reserve(0, RoomGrant.STEP_BYTES, 0)
            elif not await room.reserve(0, declared, declared):
                raise _BodyTooLarge
        await _append_body(receive, upload, room)
    except _BodyTooLarge:
        await sync_to_async(push.cancel_upload)(upload)
        left = room.left if room is not None else 0
        raise push.Denied(
            f"the upload is larger than the {left} bytes left of the tenant's image storage",
            audit_action="registry.push",
        ) from None
    finally:
        await sync_to_async(push.settle_upload_room)(upload)  # a row already gone: nothing to settle
    await sync_to_async(push.touch_upload)(upload)


def _upload_headers(repository: Repository, upload: Any, size: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"location", f"/v2/{repository.name}/blobs/uploads/{upload.pk}".encode()),
        (b"range", f"0-{max(size - 1, 0)}".encode()),
        (b"docker-upload-uuid", str(upload.pk).encode()),
    ]


def _blob_created(repository: Repository, digest: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"location", f"/v2/{repository.name}/blobs/{digest}".encode()),
        (b"docker-content-digest", digest.encode()),
    ]


async def _uploads(
    send: Send,
    receive: Receive,
    method: str,
    headers: dict[str, str],
    query: dict[str, list[str]],
    grant: Grant,
    repository: Repository,
    upload_id: str,
) -> None:
    principal = grant.principal
    assert principal is not None
    digest = (query.get("digest") or [""])[0]
    if digest and not DIGEST_RE.match(digest):
        raise push.DigestInvalid("not a sha256 digest")
    if method == "POST" and not upload_id:
        mount = (query.get("mount") or [""])[0]
        if mount and await _mounted(send, grant, repository, mount, (query.get("from") or [""])[0]):
            return
        upload = await sync_to_async(push.start_upload)(principal, repository)
        if digest:  # the single-POST form: the whole blob in this request
            await _write_upload(receive, headers, grant, repository, upload)
            await sync_to_async(push.finish_upload)(principal, repository, upload, digest)
            await _respond(send, 201, [*_blob_created(repository, digest), (b"content-length", b"0")], b"")
            return
        await _respond(send, 202, [*_upload_headers(repository, upload, 0), (b"content-length", b"0")], b"")
        return
    if not upload_id:
        await _error(send, 405, "UNSUPPORTED", "start an upload with POST")
        return
    upload = await sync_to_async(push.find_upload)(principal, repository, upload_id)
    path = str(push.upload_path(upload))
    size = await asyncio.to_thread(_stat_size, path)
    if method == "GET":
        await _respond(
            send, 204, [*_upload_headers(repository, upload, size), (b"content-length", b"0")], b""
        )
    elif method == "DELETE":
        await sync_to_async(push.cancel_upload)(upload)
        await _respond(send, 204, [(b"content-length", b"0")], b"")
    elif method == "PATCH":
        if not _chunk_in_order(headers, size):
            await _out_of_order(send, repository, upload, size)
            return
        await _write_upload(receive, headers, grant, repository, upload)
        size = await asyncio.to_thread(_stat_size, path)
        await _respond(
            send, 202, [*_upload_headers(repository, upload, size), (b"content-length", b"0")], b""
        )
    elif method == "PUT":
        if not digest:
            raise push.DigestInvalid("finish an upload with ?digest=")
        if not _chunk_in_order(headers, size):  # a last chunk may come with the PUT
            await _out_of_order(send, repository, upload, size)
            return
        await _write_upload(receive, headers, grant, repository, upload)
        await sync_to_async(push.finish_upload)(principal, repository, upload, digest)
        await _respond(send, 201, [*_blob_created(repository, digest), (b"content-length", b"0")], b"")
    else:
        await _error(send, 405, "UNSUPPORTED", "this method is not supported on an upload")


def _chunk_in_order(headers: dict[str, str], size: int) -> bool:
    """Whether a chunk's Content-Range (if any) starts where the upload ends."""
    content_range = headers.get("content-range", "").strip()
    if not content_range:
        return True
    match = re.fullmatch(r"(?:bytes[ =])?(\d+)-(\d+)(?:/\d+|/\*)?", content_range)
    return match is not None and int(match[1]) == size and int(match[2]) >= int(match[1])


async def _out_of_order(send: Send, repository: Repository, upload: Any, size: int) -> None:
    await _error(
        send,
        416,
        "BLOB_UPLOAD_INVALID",
        "the chunk does not start where the upload ends",
        _upload_headers(repository, upload, size),
    )


def _subject_of(body: bytes) -> str | None:
    """The digest a pushed manifest names as its `subject` (a signature's or SBOM's image), if any."""
    try:
        subject = json.loads(body).get("subject")
    except (ValueError, AttributeError):
        return None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return digest if isinstance(digest, str) and DIGEST_RE.match(digest) else None


async def _mounted(send: Send, grant: Grant, repository: Repository, digest: str, source_name: str) -> bool:
    """Mount a blob from a repository the pusher may pull; False: not mountable, upload it instead."""
    if not DIGEST_RE.match(digest) or not source_name:
        return False
    try:
        source = access.parse_name(source_name)
    except NameInvalid:
        return False
    assert grant.principal is not None
    if not await sync_to_async(_may_pull)(grant, source):
        await _deny(grant, source, "mount")
        return False
    try:
        await sync_to_async(push.mount_blob)(grant.principal, repository, source, digest)
    except push.BlobUnknown:
        return False
    await _respond(send, 201, [*_blob_created(repository, digest), (b"content-length", b"0")], b"")
    return True


def _may_pull(grant: Grant, repository: Repository) -> bool:
    # A bearer token carries the scopes the client asked for; the source's pull may have been left out
    # by a client that still may read it: ask the same rules directly.
    if grant.allows(repository.name, "pull"):
        return True
    return bool(access.granted_actions(grant.principal, repository, ["pull"]))


async def _read_small_body(receive: Receive, limit: int) -> bytes | None:
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(body) > limit:
            return None
    return bytes(body)


async def _put_manifest(
    send: Send,
    receive: Receive,
    headers: dict[str, str],
    grant: Grant,
    repository: Repository,
    reference: str,
) -> None:
    if not (DIGEST_RE.match(reference) or TAG_RE.match(reference)):
        raise push.ManifestInvalid("not a tag or a sha256 digest")
    body = await _read_small_body(receive, MAX_MANIFEST_BYTES)
    if body is None:
        raise push.ManifestInvalid(f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")
    assert grant.principal is not None
    content_type = headers.get("content-type", "").split(";")[0].strip()
    pushed = await sync_to_async(push.put_manifest)(
        grant.principal, repository, reference, body, content_type
    )
    response = [
        (b"location", f"/v2/{repository.name}/manifests/{pushed.digest}".encode()),
        (b"docker-content-digest", pushed.digest.encode()),
        (b"content-length", b"0"),
    ]
    if pushed.operation_id:
        response.append((b"bulkhead-operation", pushed.operation_id.encode()))
    subject = _subject_of(body)
    if subject is not None:
        # The referrers API knows this manifest now (clients then skip the tag-schema fallback).
        response.append((b"oci-subject", subject.encode()))
    await _respond(send, 201, response, b"")


async def _delete_manifest(send: Send, grant: Grant, repository: Repository, reference: str) -> None:
    if not (DIGEST_RE.match(reference) or TAG_RE.match(reference)):
        raise push.ManifestInvalid("not a tag or a sha256 digest")
    assert grant.principal is not None
    await sync_to_async(push.delete_manifest)(grant.principal, repository, reference)
    await _respond(send, 202, [(b"content-length", b"0")], b"")


async def _delete_blob(send: Send, grant: Grant, repository: Repository, digest: str) -> None:
    if not DIGEST_RE.match(digest):
        raise push.DigestInvalid("not a sha256 digest")
    assert grant.principal is not None
    await sync_to_async(push.delete_blob)(grant.principal, repository, digest)
    await _respond(send, 202, [(b"content-length", b"0")], b"")


# --- responses -------------------------------------------------------------------------------------------


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": BASE_HEADERS + headers})
    await send({"type": "http.response.body", "body": body})


async def _json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    names = {name for name, _ in headers or []}
    base = [] if b"content-type" in names else [(b"content-type", b"application/json")]
    await _respond(
        send, status, [*base, (b"content-length", str(len(body)).encode()), *(headers or [])], body
    )


async def _error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _json(send, status, {"errors": [{"code": code, "message": message, "detail": None}]}, headers)
