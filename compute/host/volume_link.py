"""What a host says to and asks of the portal about its volumes, snapshots and backups (issue 16).

`VolumePortalLink` is the part of `PortalLink` for them; `HostApiVolumeCalls` is how `HostApiClient`
speaks it over HTTP (`/api/v1/hosts/self/…`). The portal answers each only for objects on the calling
host (anything else is a 404, audited). Kept in its own module so the link's other half can move freely.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import httpx


class VolumePortalLink(Protocol):
    def volume_work(self, op_id: Any) -> dict[str, Any]: ...

    def report_volume(self, volume_id: Any, event: str, **fields: Any) -> dict[str, Any]: ...

    def report_snapshot(self, snapshot_id: Any, event: str, **fields: Any) -> dict[str, Any]: ...

    def report_volume_pool(self, facts: dict[str, Any]) -> dict[str, Any]: ...

    def report_volume_usage(self, usage: dict[str, int]) -> int: ...

    def volume_operations(self) -> list[dict[str, Any]]: ...

    def resume_volume_operation(self, op_id: Any) -> dict[str, Any]: ...

    def report_backup(self, backup_id: Any, event: str, **fields: Any) -> dict[str, Any]: ...

    def backup_missing(self, backup_id: Any, manifest: str, chunks: list[str]) -> dict[str, Any]: ...

    def put_backup_chunk(self, backup_id: Any, digest: str, length: int, data: bytes) -> bool: ...

    def put_backup_manifest(self, backup_id: Any, manifest: str, data: bytes) -> None: ...

    def backup_manifest(self, backup_id: Any) -> bytes: ...

    def backup_chunk(self, backup_id: Any, digest: str) -> bytes: ...


class HostApiVolumeCalls:
    """`VolumePortalLink` over HTTP: a mixin of `HostApiClient` (its `_call` and `_client`)."""

    _client: httpx.Client

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def _bytes(
        self,
        method: str,
        path: str,
        content: bytes | Iterable[bytes] | None = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: Any = None,
        **params: Any,
    ) -> bytes:
        from compute.host.link import HostApiError

        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        try:
            response = self._client.request(
                method, path, content=content, params=params or None, headers=headers, **extra
            )
        except httpx.TransportError as error:
            raise HostApiError(0, "unreachable", f"the portal did not answer: {error}") from None
        if response.status_code >= 400:
            try:
                refusal = response.json().get("error") or {}
            except ValueError:
                refusal = {}
            raise HostApiError(
                response.status_code, str(refusal.get("code", "error")), str(refusal.get("message", ""))[:500]
            )
        return response.content

    def volume_work(self, op_id: Any) -> dict[str, Any]:
        return dict(self._call("GET", f"volume-operations/{op_id}/"))

    def report_volume(self, volume_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"volumes/{volume_id}/", {"event": event, **fields}))

    def report_snapshot(self, snapshot_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"snapshots/{snapshot_id}/", {"event": event, **fields}))

    def report_volume_pool(self, facts: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "volume-pool/", {"pool": facts}))

    def report_volume_usage(self, usage: dict[str, int]) -> int:
        return int(self._call("POST", "volume-usage/", {"usage": usage})["recorded"])

    def volume_operations(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "volume-operations/")["operations"])

    def resume_volume_operation(self, op_id: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"volume-operations/{op_id}/resume/"))

    def report_backup(self, backup_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"backups/{backup_id}/", {"event": event, **fields}))

    def backup_missing(self, backup_id: Any, manifest: str, chunks: list[str]) -> dict[str, Any]:
        body = {"manifest": manifest, "chunks": chunks}
        return dict(self._call("POST", f"backups/{backup_id}/missing/", body))

    def put_backup_chunk(self, backup_id: Any, digest: str, length: int, data: bytes) -> bool:
        self._bytes("PUT", f"backups/{backup_id}/chunks/{digest}/", data, length=length)
        return True

    def put_backup_manifest(self, backup_id: Any, manifest: str, data: bytes) -> None:
        self._bytes("PUT", f"backups/{backup_id}/manifests/{manifest}/", data)

    def backup_manifest(self, backup_id: Any) -> bytes:
        return self._bytes("GET", f"backups/{backup_id}/manifest/")

    def backup_chunk(self, backup_id: Any, digest: str) -> bytes:
        return self._bytes("GET", f"backups/{backup_id}/chunks/{digest}/")
