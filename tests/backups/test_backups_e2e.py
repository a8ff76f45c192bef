"""Backups with real parts (issue 17): btrfs volume pools of two hosts with their own agents, the
portal served by daphne. Back a volume up, back it up again unchanged (nothing new written), delete
the volume, restore the backup onto the other host, whose agent fetches the manifest and chunks
through the portal with its own credential; verify finds a tampered chunk; export downloads a tar.zst.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from backups.models import Backup
from compute import hosts
from compute.models import Host
from compute.runtimes.volume_pool import VolumePool
from portal import cli
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.compute.conftest import finished, make_host
from tests.conftest import World, client_for
from tests.processes import celery_worker, host_agent, process, wait_until
from volumes.agent import embedded_pool_paths, release_pool
from volumes.models import Volume

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def serve_portal(store_dir: Path, backup_dir: Path) -> Iterator[str]:
    """daphne serving portal.asgi on the test database with these stores; yields host:port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"]
    env = {"BULKHEAD_STORE_DIR": str(store_dir), "BULKHEAD_BACKUP_DIR": str(backup_dir)}
    with process(argv, f"test-backups-portal-{port}.log", **env):
        address = f"127.0.0.1:{port}"

        def answering() -> bool:
            try:
                return httpx.get(f"http://{address}/v2/", timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        wait_until(answering, timeout=60, what="daphne to serve the portal")
        yield address


@pytest.fixture
def backup_dir(settings: Any) -> Iterator[Path]:
    directory = Path(settings.DATA_DIR) / "test-backups" / uuid.uuid4().hex[:12]
    directory.mkdir(parents=True)
    settings.BULKHEAD_BACKUP_DIR = directory
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def volume_dir(host: Host, volume: Volume) -> Path:
    return VolumePool(embedded_pool_paths(host)[1]).volume_path(volume.pool_name)


def done(client: Any, response: Any, timeout: float = 180) -> Any:
    assert response.status_code == 202, response.json()
    op = finished(response.json()["id"], timeout=timeout)
    assert op.state == "succeeded", (op.error, op.operator_details)
    return op


def test_a_backup_dedups_and_restores_onto_another_host_through_the_portal(
    world: World, store_dir: Path, backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_host("bht-bk-a"), make_host("bht-bk-b")
    oscar = Actor(user=world.user("oscar"))
    hosts.set_host_state(actor=oscar, host=b, state="maintenance")  # the volume lands on a
    secret_a = hosts.issue_host_credential(actor=Actor.system("test"), host=a)
    secret_b = hosts.issue_host_credential(actor=Actor.system("test"), host=b)
    # Both hosts act as other machines: their own backup stores, the portal reached over HTTP.
    a_backups, b_backups = tmp_path / "host-a-backups", tmp_path / "host-b-backups"
    mia, operator = client_for(world, "mia"), client_for(world, "oscar")
    table = os.urandom(6 << 20)
    try:
        with (
            serve_portal(store_dir, backup_dir) as portal,
            celery_worker(queues="default", name="bht-bk-portal", BULKHEAD_BACKUP_DIR=str(backup_dir)),
            host_agent(
                a,
                BULKHEAD_STORE_DIR=str(store_dir),
                BULKHEAD_BACKUP_DIR=str(a_backups),
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_HOST_CREDENTIAL=secret_a,
            ),
            host_agent(
                b,
                BULKHEAD_STORE_DIR=str(tmp_path / "host-b-store"),
                BULKHEAD_BACKUP_DIR=str(b_backups),
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_HOST_CREDENTIAL=secret_b,
            ),
        ):
            done(mia, mia.post("/api/v1/volumes/", {"name": "db-data", "size_gib": 1}, format="json"))
            volume = Volume.objects.get(tenant=world.acme, name="db-data")
            assert volume.host == a
            data = volume_dir(a, volume)
            (data / "base").mkdir()
            (data / "base" / "table").write_bytes(table)
            (data / "config").write_text("max_connections = 20\n")
            (data / "latest").symlink_to("base/table")

            op = done(mia, mia.post("/api/v1/backups/", {"volume": str(volume.pk)}, format="json"))
            first = Backup.objects.get(pk=op.target_id)
            assert first.state == "ready" and first.new_bytes > 0 and first.source_bytes == len(table) + 21
            assert op.result["uploaded_chunks"] == first.chunks  # a sent the portal every chunk
            assert (backup_dir / "manifests" / first.manifest[7:]).is_file()
            op = done(mia, mia.post("/api/v1/backups/", {"volume": str(volume.pk)}, format="json"))
            second = Backup.objects.get(pk=op.target_id)
            assert second.new_bytes == 0 and second.manifest == first.manifest
            assert op.result["uploaded_chunks"] == 0 and op.result["bytes_read"] == 0
            # With no backup running, a host may upload nothing.
            upload = httpx.put(
                f"http://{portal}/api/v1/hosts/self/backups/{second.pk}/chunks/sha256:{'0' * 64}/?length=1",
                content=b"x",
                headers={"Authorization": f"Bearer {secret_a}"},
            )
            assert upload.status_code == 404
            assert Quota.objects.get(tenant=world.acme).used_backup_bytes == first.stored_bytes

            done(mia, mia.delete(f"/api/v1/volumes/{volume.pk}/"))
            wait_until(lambda: not Volume.objects.filter(pk=volume.pk).exists(), timeout=60, what="gone")
            hosts.set_host_state(actor=oscar, host=b, state="ready")
            chunk = Backup.objects.get(pk=first.pk).chunk_rows.first()
            assert chunk is not None
            url = f"http://{portal}/api/v1/hosts/self/backups/{first.pk}/chunks/{chunk.digest}/"
            headers = {"Authorization": f"Bearer {secret_b}"}
            assert httpx.get(url, headers=headers).status_code == 404  # nothing being restored on b

            op = done(
                operator,
                operator.post(
                    f"/api/v1/backups/{first.pk}/restore/",
                    {"name": "db-restored", "host": str(b.pk)},
                    format="json",
                ),
            )
            restored = Volume.objects.get(pk=op.target_id)
            assert restored.host == b and restored.state == "ready"
            out = volume_dir(b, restored)
            assert (out / "base" / "table").read_bytes() == table
            assert (out / "config").read_text() == "max_connections = 20\n"
            assert os.readlink(out / "latest") == "base/table"
            assert op.result["fetched_chunks"] == first.chunks
            assert any((b_backups / "chunks").rglob("*"))
            # Done restoring: b may fetch nothing more, and the refusal is audited.
            assert httpx.get(url, headers=headers).status_code == 404
            assert AuditEntry.objects.filter(action="host.backup_chunk.fetch", outcome="denied").exists()

            op = done(mia, mia.post(f"/api/v1/backups/{first.pk}/export/"))
            download = mia.get(op.result["download"])
            assert download.status_code == 200
            raw = b"".join(download.streaming_content)
            tar_bytes = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
                member = archive.extractfile("base/table")
                assert member is not None and member.read() == table

            # The CLI against the served portal, with alice's token scoped to acme.
            monkeypatch.setenv("BULKHEAD_URL", f"http://{portal}")
            monkeypatch.setenv("BULKHEAD_TOKEN", world.tokens["alice_acme"])
            monkeypatch.delenv("BULKHEAD_TENANT", raising=False)
            out = io.StringIO()
            assert cli.main(["backups", "list"], out=out) == 0
            assert out.getvalue().count("db-data") == 2, out.getvalue()
            saved = tmp_path / "cli.tar.zst"
            assert cli.main(["backups", "download", str(first.pk), "-o", str(saved)], out=out) == 0
            assert saved.read_bytes() == raw

            op = done(mia, mia.post(f"/api/v1/backups/{first.pk}/verify/"))
            assert op.result["bad"] == []
            stored = backup_dir / "chunks" / chunk.digest[7:9] / chunk.digest[7:]
            stored.write_bytes(stored.read_bytes()[:-4] + b"evil")
            op = done(mia, mia.post(f"/api/v1/backups/{first.pk}/verify/"))
            assert op.result["bad"] == [chunk.digest]
            assert Backup.objects.get(pk=first.pk).verify_bad_chunks == 1
            assert cli.main(["backups", "verify", str(first.pk)], out=out) == 1
    finally:
        for h in (a, b):
            pool = VolumePool(embedded_pool_paths(h)[1])
            if embedded_pool_paths(h)[1].is_mount():
                for v in Volume.objects.filter(host=h):
                    pool.delete(v.pool_name)
            release_pool(h)
