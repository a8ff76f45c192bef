"""The built-in registry at `/v2/`: the OCI Distribution Spec's pull and discovery endpoints, as a small
ASGI application beside Django (bodies stream in bounded chunks; Django would buffer them).

Pull serves what imports, pulls and commits stored: manifests, configs and layer blobs straight from the
layer store, by tag or digest, `HEAD` and `GET`, blobs with `Range`. A blob is served only through a
repository the caller may pull that references it: dedup in the store grants nothing. Push is not yet
implemented (it answers the spec's UNSUPPORTED); see NOTES.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async

from imaging.distribution import access
from imaging.distribution.access import Grant, NameInvalid, Principal, Repository

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHUNK_BYTES = 1024 * 1024
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
ROUTE_RE = re.compile(
    r"^/v2/(?P<name>.+?)/(?:(?P<kind>manifests|blobs|referrers)/(?P<reference>[^/]+)|(?P<tags>tags/list))$"
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
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
    method = scope["method"]
    path = scope["path"]
    headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if path in ("/v2", "/v2/"):
        grant = await _grant_from_headers(headers)
        if grant is None or grant.principal is None:
            await _challenge(send, headers, scope_text=None)
            return
        await _json(send, 200, {})
        return
    if path == "/v2/token":
        await _token_endpoint(send, headers, query)
        return
    if method not in ("GET", "HEAD"):
        await _error(send, 405, "UNSUPPORTED", "pushing to Bulkhead's registry is not available yet")
        return
    route = ROUTE_RE.match(path)
    if route is None:
        await _error(send, 404, "NAME_UNKNOWN", "no such repository or endpoint")
        return
    try:
        repository = access.parse_name(route["name"])
    except NameInvalid:
        await _error(send, 400, "NAME_INVALID", "not a repository name under a tenant or library/")
        return
    grant = await _grant_from_headers(headers)
    if grant is None or not await sync_to_async(grant.allows)(repository.name, "pull"):
        await _deny(grant, repository, "pull")
        await _challenge(send, headers, scope_text=f"repository:{repository.name}:pull")
        return
    if route["tags"]:
        await _tags(send, repository, query)
    elif route["kind"] == "manifests":
        await _manifest(send, method, repository, route["reference"])
    elif route["kind"] == "blobs":
        await _blob(send, method, headers, repository, route["reference"])
    else:
        await _referrers(send, repository, route["reference"])


# --- auth ---------------------------------------------------------------------------------------------


async def _grant_from_headers(headers: dict[str, str]) -> Grant | None:
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value:
        return await sync_to_async(access.verify_token)(value.strip())
    if scheme.lower() == "basic" and value:
        principal = await _basic_principal(value)
        if principal is None:
            return None
        # Basic on the resource itself (curl): every repository the user may pull, checked per request.
        return _BasicGrant(principal)
    return None


class _BasicGrant(Grant):
    def __init__(self, principal: Principal) -> None:
        super().__init__(principal, {})

    def allows(self, name: str, action: str) -> bool:
        try:
            repository = access.parse_name(name)
        except NameInvalid:
            return False
        return action in access.granted_actions(self.principal, repository, [action])


async def _basic_principal(value: str) -> Principal | None:
    try:
        username, _, secret = base64.b64decode(value.strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return await sync_to_async(access.principal_from_basic)(username, secret)


async def _token_endpoint(send: Send, headers: dict[str, str], query: dict[str, list[str]]) -> None:
    principal = None
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        principal = await _basic_principal(value)
        if principal is None:
            await sync_to_async(_audit_denied)(None, "registry.login", {})
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


def _find_manifest(repository: Repository, reference: str) -> tuple[bytes, str, str] | None:
    from imaging.services import get_store
    from imaging.store import StoreError

    images = _images(repository)
    image = (
        images.filter(manifest_digest=reference).first()
        if DIGEST_RE.match(reference)
        else images.filter(tag=reference).first()
    )
    if image is None:
        return None
    try:
        body = get_store().read_blob(image.manifest_digest)
    except (StoreError, OSError):
        return None
    try:
        media_type = str(json.loads(body).get("mediaType") or OCI_MANIFEST)
    except ValueError:
        media_type = OCI_MANIFEST
    return body, image.manifest_digest, media_type


async def _manifest(send: Send, method: str, repository: Repository, reference: str) -> None:
    if not (DIGEST_RE.match(reference) or TAG_RE.match(reference)):
        await _error(send, 400, "MANIFEST_INVALID", "not a tag or a sha256 digest")
        return
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


def _blob_path(repository: Repository, digest: str) -> str | None:
    """The blob's file, if an image of this repository references it (layer, config or manifest)."""
    from django.db.models import Q

    from imaging.services import get_store

    referenced = (
        _images(repository)
        .filter(Q(config_digest=digest) | Q(manifest_digest=digest) | Q(image_layers__layer__digest=digest))
        .exists()
    )
    if not referenced:
        return None
    path = get_store().blob_path(digest)
    return str(path) if path.is_file() else None


async def _blob(
    send: Send, method: str, headers: dict[str, str], repository: Repository, digest: str
) -> None:
    if not DIGEST_RE.match(digest):
        await _error(send, 400, "DIGEST_INVALID", "not a sha256 digest")
        return
    path = await sync_to_async(_blob_path)(repository, digest)
    if path is None:
        await _error(send, 404, "BLOB_UNKNOWN", "no such blob in this repository")
        return
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
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(handle.seek, start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = await asyncio.to_thread(handle.read, min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
        if remaining > 0:
            await send({"type": "http.response.body", "body": b""})
    finally:
        await asyncio.to_thread(handle.close)


def _stat_size(path: str) -> int:
    import os

    return os.stat(path).st_size


def _parse_range(text: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", text.strip())
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # the last N bytes
        length = int(match[2])
        return (max(0, size - length), size - 1) if length else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start <= end < size else None


def _tag_page(repository: Repository, limit: int | None, last: str) -> list[str]:
    tags = _images(repository).order_by("tag").values_list("tag", flat=True)
    if last:
        tags = tags.filter(tag__gt=last)
    return list(tags[:limit] if limit is not None else tags)


async def _tags(send: Send, repository: Repository, query: dict[str, list[str]]) -> None:
    limit_text = (query.get("n") or [""])[0]
    limit = int(limit_text) if limit_text.isdigit() else None
    last = (query.get("last") or [""])[0]
    tags = await sync_to_async(_tag_page)(repository, limit, last)
    exists = tags or await sync_to_async(_images(repository).exists)()
    if not exists:
        await _error(send, 404, "NAME_UNKNOWN", "no such repository")
        return
    headers: list[tuple[bytes, bytes]] = []
    if limit is not None and len(tags) == limit and tags:
        link = f'</v2/{repository.name}/tags/list?n={limit}&last={tags[-1]}>; rel="next"'
        headers.append((b"link", link.encode()))
    await _json(send, 200, {"name": repository.name, "tags": tags}, headers)


async def _referrers(send: Send, repository: Repository, digest: str) -> None:
    if not DIGEST_RE.match(digest):
        await _error(send, 400, "DIGEST_INVALID", "not a sha256 digest")
        return
    # Nothing stored here refers to another manifest yet: an empty index, as the spec asks.
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    await _json(send, 200, index, [(b"content-type", OCI_INDEX.encode())])


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
