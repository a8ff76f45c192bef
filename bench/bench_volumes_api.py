"""Backups, restores and snapshots of volumes through the REST API, beside their baselines in one run.

The stack is the one `make run` starts (bench/harness.make_run: daphne, worker, beat, the local host's
agent with its embedded btrfs volume pool) on a data directory of its own; everything of ours goes
through the API with a token, timed from the POST until the operation's row says succeeded (polled every
5 ms by primary key on a connection of its own).

1. A 4 GiB volume is created through the API; a ~2 GiB, 20,000-file tree (bench_backups.make_tree) is
   written straight into its subvolume (set-up only) and synced.
2. Baseline `tar -c | zstd -3` to a file in the backup store's filesystem (`sync -f` after), of a fresh
   read-only btrfs snapshot of the volume: ours reads one too (a backup of a live volume goes through a
   temporary snapshot), and a new snapshot's files are new inodes, cold in the page cache, so reading the
   volume's own (hot) directory would flatter the baseline; that hot figure is printed beside it. Ours:
   POST /api/v1/backups/ (temporary snapshot, FastCDC chunks, compressed, durable) -> first backup; again
   -> second backup of the unchanged volume. Beside them the same engine called directly
   (BackupStore.backup on another fresh snapshot, into a store of its own on the same disk) shows what the
   API, the operation and the snapshot handling add.
3. Baseline `zstd -d | tar -x` into a directory on the volume pool (`sync -f` after); ours:
   POST /api/v1/backups/<id>/restore/ into a new volume (a new subvolume on the same pool).
4. A 10 GiB volume filled with 10 GiB of data, then POST /api/v1/volumes/<id>/snapshot/, three times.

Each figure is one JSON line; ``ratio`` is ours/baseline throughput (baseline seconds / our seconds).
Run as root (loop devices, btrfs):
    flock /tmp/bulkhead-heavy.lock scripts/with-test-services.sh .venv/bin/python bench/bench_volumes_api.py
Options: --files, --gib (tree), --snapshot-gib (0 skips step 4), --snapshots N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_backups import make_tree, tar_zstd, untar_zstd  # noqa: E402
from harness import admin_token, make_run  # noqa: E402

GIB = 1 << 30


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


class Api:
    """The portal's REST API with a token, and a poller of operation rows on its own connection."""

    def __init__(self, url: str, secret: str) -> None:
        import httpx
        import psycopg
        from django.db import connection

        self.client = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {secret}"})
        db = connection.settings_dict
        self.poll = psycopg.connect(
            dbname=db["NAME"],
            user=db["USER"],
            password=db["PASSWORD"],
            host=db["HOST"],
            port=db["PORT"],
            autocommit=True,
        )

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(path, json=body)
        if response.status_code >= 300:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
        return dict(response.json())

    def operation(
        self, path: str, body: dict[str, Any], timeout: float = 1800
    ) -> tuple[float, dict[str, Any]]:
        """POST something that answers 202 with an operation; seconds until it succeeded, and its row."""
        started = time.perf_counter()
        op = self.post(path, body)
        deadline = time.monotonic() + timeout
        while True:
            row = self.poll.execute(
                "SELECT state, error FROM portal_operation WHERE id = %s", (op["id"],)
            ).fetchone()
            if row is not None and row[0] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} still running after {timeout:.0f} s")
            # 5 ms at first (a snapshot takes tens of ms), then coarser: on 2 cores a poll every 5 ms
            # through a 10 s backup costs the measured worker CPU (resolution stays within 1 %).
            time.sleep(min(0.05, 0.005 + (time.perf_counter() - started) / 100))
        seconds = time.perf_counter() - started
        if row[0] != "succeeded":
            raise RuntimeError(f"{path}: operation {row[0]}: {row[1]}")
        details = dict(self.client.get(f"/api/v1/operations/{op['id']}/").json())
        details["phases"] = self.phases(op["id"])
        return seconds, details

    def phases(self, op_id: str) -> list[tuple[str, float]]:
        """Where the time went: each log entry (queued, started, each new progress message, the end)
        with its seconds since the operation was queued."""
        rows = self.poll.execute(
            "SELECT at, event, message FROM portal_operationlogentry WHERE operation_id = %s ORDER BY at, id",
            (op_id,),
        ).fetchall()
        if not rows:
            return []
        first = rows[0][0]
        return [(message or event, round((at - first).total_seconds(), 3)) for at, event, message in rows]


@contextlib.contextmanager
def fresh_snapshot(pool: Any, source: Path, name: str) -> Iterator[Path]:
    """A read-only btrfs snapshot of `source` at the pool's root for one measurement (deleted after)."""
    path = pool.root / name
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(source), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["btrfs", "-q", "subvolume", "delete", "--commit-each", str(path)], check=True)


def sync_dir(path: Path) -> None:
    subprocess.run(["sync", "-f", str(path)], check=True)


def fill(path: Path, size: int) -> None:
    """`size` bytes of incompressible data in one file, fsynced (a 64 MiB random block repeated)."""
    block = os.urandom(64 << 20)
    with open(path, "wb") as out:
        written = 0
        while written < size:
            out.write(block[: min(len(block), size - written)])
            written += min(len(block), size - written)
        out.flush()
        os.fsync(out.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--snapshot-gib", type=int, default=10)
    parser.add_argument("--snapshots", type=int, default=3)
    options = parser.parse_args()

    with make_run(
        {"BULKHEAD_VOLUME_POOL_GIB": str(int(options.gib * 2 + options.snapshot_gib + 16))}
    ) as product:
        import django

        django.setup()
        from django.conf import settings

        from compute.models import Host
        from compute.runtimes.volume_pool import VolumePool
        from tenants.models import Quota, Tenant
        from volumes.agent import embedded_pool_paths
        from volumes.models import Volume

        _admin, secret = admin_token("bench-volumes")
        tenant = Tenant.objects.get(name="demo")
        Quota.objects.filter(tenant=tenant).update(volume_bytes=1024 * GIB, backup_bytes=1024 * GIB)
        host = wait_for(
            lambda: Host.objects.filter(state="ready", facts__has_key="volume_pool").first(),
            180,
            "the host's pool",
        )
        api = Api(product.url, secret)
        pool = VolumePool(embedded_pool_paths(host)[1])
        common = {"load_average_1m": round(os.getloadavg()[0], 2), "host": host.name}
        work = Path(settings.BULKHEAD_BACKUP_DIR).parent / "bench-baseline"
        work.mkdir(parents=True, exist_ok=True)
        untar_dir = pool.root / "bench-baseline-untar"
        try:
            size_gib = max(int(options.gib * 2), 1)
            api.operation(
                "/api/v1/volumes/", {"tenant": str(tenant.pk), "name": "bench-data", "size_gib": size_gib}
            )
            volume = Volume.objects.get(tenant=tenant, name="bench-data")
            source = pool.volume_path(volume.pool_name)
            started = time.perf_counter()
            total = make_tree(source / "tree", options.files, int(options.gib * GIB))
            sync_dir(source)
            emit(
                {
                    "bench": "volumes_api",
                    "step": "setup",
                    "tree_bytes": total,
                    "files": options.files,
                    "generate_s": round(time.perf_counter() - started, 1),
                    **common,
                }
            )

            # 2. backups vs tar | zstd -3
            archive = work / "tree.tar.zst"
            t0 = time.perf_counter()
            tar_zstd(source, archive)
            sync_dir(archive)
            t_tar_hot = time.perf_counter() - t0
            archive.unlink()
            with fresh_snapshot(pool, source, "bench-baseline-snap") as snapshot:
                t0 = time.perf_counter()
                tar_zstd(snapshot, archive)
                sync_dir(archive)
                t_tar = time.perf_counter() - t0
            from imaging.store import BackupStore

            direct_store = BackupStore(work / "direct-store")
            with fresh_snapshot(pool, source, "bench-direct-snap") as snapshot:
                t0 = time.perf_counter()
                direct = direct_store.backup(snapshot)
                t_direct = time.perf_counter() - t0
            with fresh_snapshot(pool, source, "bench-direct-snap") as snapshot:
                t0 = time.perf_counter()
                direct_store.backup(snapshot, previous=direct.manifest)
                t_direct_second = time.perf_counter() - t0
            t0 = time.perf_counter()
            chunk_list = direct_store.chunks(direct.manifest)
            t_chunk_list = time.perf_counter() - t0
            shutil.rmtree(work / "direct-store")
            # What a backup's temporary snapshot costs the agent: made, then deleted as the pool does it
            # (delete --commit-each, wait for the cleaner, destroy the qgroup).
            import uuid

            temporary = f"snap-{uuid.uuid4().hex}"
            t0 = time.perf_counter()
            pool.snapshot(volume.pool_name, temporary)
            t_snap_make = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.delete_snapshot(temporary)
            t_snap_delete = time.perf_counter() - t0
            t_first, first = api.operation("/api/v1/backups/", {"volume": str(volume.pk)})
            result = first.get("result") or {}
            emit(
                {
                    "bench": "volumes_api",
                    "step": "first_backup",
                    "ours_s": round(t_first, 2),
                    "ours_MBps": round(total / t_first / 1e6),
                    "ours_stored_bytes": result.get("stored_bytes"),
                    "baseline": "tar -c | zstd -3 of a fresh snapshot",
                    "baseline_s": round(t_tar, 2),
                    "baseline_MBps": round(total / t_tar / 1e6),
                    "baseline_bytes": archive.stat().st_size,
                    "ratio": round(t_tar / t_first, 2),
                    "goal": ">= 1.0",
                    "baseline_hot_s": round(t_tar_hot, 2),
                    "ratio_vs_hot": round(t_tar_hot / t_first, 2),
                    "engine_direct_s": round(t_direct, 2),
                    "ratio_engine_direct": round(t_tar / t_direct, 2),
                    "ours_phases": first["phases"],
                    "temporary_snapshot_make_s": round(t_snap_make, 3),
                    "temporary_snapshot_delete_s": round(t_snap_delete, 3),
                    "chunk_list_s": round(t_chunk_list, 3),
                    "chunks": len(chunk_list),
                    **common,
                }
            )
            t_second, second = api.operation("/api/v1/backups/", {"volume": str(volume.pk)})
            result = second.get("result") or {}
            emit(
                {
                    "bench": "volumes_api",
                    "step": "second_backup_unchanged",
                    "ours_s": round(t_second, 3),
                    "ours_new_bytes": result.get("new_bytes"),
                    "ours_bytes_read": result.get("bytes_read"),
                    "baseline": "tar -c | zstd -3 of a fresh snapshot",
                    "baseline_s": round(t_tar, 2),
                    "ratio": round(t_tar / t_second, 1),
                    "goal": ">= 10",
                    "engine_direct_s": round(t_direct_second, 3),
                    "ratio_engine_direct": round(t_tar / t_direct_second, 1),
                    "ours_phases": second["phases"],
                    **common,
                }
            )

            # 3. restore into a new volume vs zstd -d | tar -x onto the pool
            from backups.models import Backup

            backup = Backup.objects.filter(volume=volume, state="ready").order_by("created_at").first()
            assert backup is not None
            t0 = time.perf_counter()
            untar_zstd(archive, untar_dir)
            t_untar = time.perf_counter() - t0
            shutil.rmtree(untar_dir)
            t_restore, restore_op = api.operation(
                f"/api/v1/backups/{backup.pk}/restore/", {"name": "bench-restored"}
            )
            restored = Volume.objects.get(tenant=tenant, name="bench-restored")
            restored_files = sum(1 for p in pool.volume_path(restored.pool_name).rglob("*") if p.is_file())
            emit(
                {
                    "bench": "volumes_api",
                    "step": "restore_new_volume",
                    "ours_s": round(t_restore, 2),
                    "ours_MBps": round(total / t_restore / 1e6),
                    "restored_files": restored_files,
                    "baseline": "zstd -d | tar -x",
                    "baseline_s": round(t_untar, 2),
                    "ratio": round(t_untar / t_restore, 2),
                    "goal": ">= 1.0",
                    "ours_phases": restore_op["phases"],
                    **common,
                }
            )
            archive.unlink()

            # 4. snapshot of a full 10 GiB volume
            if options.snapshot_gib:
                api.operation(
                    "/api/v1/volumes/",
                    {"tenant": str(tenant.pk), "name": "bench-big", "size_gib": options.snapshot_gib + 1},
                )
                big = Volume.objects.get(tenant=tenant, name="bench-big")
                t0 = time.perf_counter()
                fill(pool.volume_path(big.pool_name) / "data", options.snapshot_gib * GIB)
                t_fill = time.perf_counter() - t0
                api_seconds = []
                host_seconds = []
                for index in range(options.snapshots):
                    seconds, op = api.operation(f"/api/v1/volumes/{big.pk}/snapshot/", {"name": f"s{index}"})
                    api_seconds.append(seconds)
                    host_seconds.append((op.get("result") or {}).get("seconds"))
                emit(
                    {
                        "bench": "volumes_api",
                        "step": "snapshot",
                        "volume_gib": options.snapshot_gib,
                        "fill_s": round(t_fill, 1),
                        "api_s": [round(s, 3) for s in api_seconds],
                        "api_median_s": round(statistics.median(api_seconds), 3),
                        "host_s": host_seconds,
                        "goal": "< 1 s end to end through the API",
                        **common,
                    }
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(untar_dir, ignore_errors=True)
    # make_run stopped the stack; its agent unmounted the embedded pool: the data directory can go.
    from compute.runtimes.volume_pool import unmount_embedded_pool

    unmount_embedded_pool(embedded_pool_paths(host)[1])
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(product.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
