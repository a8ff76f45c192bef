"""`VolumePortalLink` on the portal's own machine: a mixin of `compute.host_reports.InProcessLink` that
calls the very services the host API's views call (`volumes.host_reports`, `backups.host_reports`), so
the local host is checked like a remote one."""

from __future__ import annotations

from typing import Any


class InProcessVolumeCalls:
    host: Any

    def _run(self, service: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def volume_work(self, op_id: Any) -> dict[str, Any]:
        from backups import host_reports

        return dict(self._run(lambda actor, host: host_reports.operation_work(host, op_id)))

    def report_volume(self, volume_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        from volumes import host_reports

        return dict(self._run(host_reports.report_volume, volume_id=volume_id, event=event, **fields))

    def report_snapshot(self, snapshot_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        from volumes import host_reports

        return dict(self._run(host_reports.report_snapshot, snapshot_id=snapshot_id, event=event, **fields))

    def report_volume_pool(self, facts: dict[str, Any]) -> dict[str, Any]:
        from volumes import host_reports

        return dict(self._run(host_reports.report_volume_pool, pool=facts))

    def report_volume_usage(self, usage: dict[str, int]) -> int:
        from volumes import host_reports

        return int(self._run(host_reports.report_volume_usage, usage=usage))

    def volume_operations(self) -> list[dict[str, Any]]:
        from backups import host_reports

        return list(self._run(lambda actor, host: host_reports.volume_operations(host)))

    def resume_volume_operation(self, op_id: Any) -> dict[str, Any]:
        from backups import host_reports

        return dict(self._run(host_reports.resume_operation, op_id=op_id))

    def report_backup(self, backup_id: Any, event: str, **fields: Any) -> dict[str, Any]:
        from backups import host_reports

        return dict(self._run(host_reports.report_backup, backup_id=backup_id, event=event, **fields))

    def backup_missing(self, backup_id: Any, manifest: str, chunks: list[str]) -> dict[str, Any]:
        from backups import host_reports

        return dict(
            self._run(host_reports.backup_missing, backup_id=backup_id, manifest=manifest, chunks=chunks)
        )

    def put_backup_chunk(self, backup_id: Any, digest: str, length: int, data: bytes) -> bool:
        from backups import host_reports

        return bool(
            self._run(
                host_reports.put_backup_chunk, backup_id=backup_id, digest=digest, length=length, data=data
            )
        )

    def put_backup_manifest(self, backup_id: Any, manifest: str, data: bytes) -> None:
        from backups import host_reports

        self._run(host_reports.put_backup_manifest, backup_id=backup_id, manifest=manifest, data=data)

    def backup_manifest(self, backup_id: Any) -> bytes:
        from backups import host_reports

        return bytes(self._run(host_reports.backup_manifest, backup_id=backup_id))

    def backup_chunk(self, backup_id: Any, digest: str) -> bytes:
        from backups import host_reports

        path = self._run(host_reports.backup_chunk_path, backup_id=backup_id, digest=digest)
        return bytes(path.read_bytes())
