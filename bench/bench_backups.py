"""Backup benchmark (issue 17): prints one JSON line of figures and ratios against named baselines.

Everything runs on a loop-mounted ext4 this script creates (backed by a tmpfs of its own, or by the
root disk with ``--backing disk``) and removes afterwards; both sides of each comparison read the
same files and write to that filesystem, and both make their output durable (ours syncs chunks and
manifests; the baselines are followed by ``sync -f``).

1. first backup of a ~2 GiB, 20,000-file tree (mixed: text-like, incompressible, sparse-ish) with
   ``BackupStore.backup`` vs ``tar -c | zstd -3`` to a file (goal >= 1.0x throughput);
2. second backup of the unchanged tree (given the first manifest) vs the same tar | zstd again
   (goal >= 10x);
3. restore into an empty directory vs ``zstd -d | tar -x`` (goal >= 1.0x);
4. the issue's figures on a 1 GiB directory (one 1 GiB file and nothing else): a second backup of
   it unchanged writes < 1 % new chunk bytes (also when re-read without the previous manifest), and
   one changed 4 MiB region writes about 4 MiB.

Run as root: ``.venv/bin/python bench/bench_backups.py`` (``--rounds N`` best of N, default 1;
``--files``, ``--gib`` to scale the tree).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_layers import loop_ext4, run  # noqa: E402

from imaging.store import BackupStore  # noqa: E402

ALPHABET = bytes.maketrans(bytes(range(256)), (b"etaoinshrdlucmfw" * 16))


def make_tree(root: Path, files: int, total: int, seed: int = 17) -> int:
    """`files` files in dirs of 100, `total` bytes: 1 % big files (a third of the bytes), the rest
    small; half text-like (16 symbols: ~2x compressible), a third incompressible, the rest runs."""
    rng = random.Random(seed)
    big = max(1, files // 100)
    big_size = total // 3 // big
    small_mean = (total - big * big_size) // (files - big)
    written = 0
    for i in range(files):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        size = big_size if i % 100 == 99 and i // 100 < big else int(rng.expovariate(1 / small_mean))
        kind = rng.random()
        raw = rng.randbytes(size)
        if kind < 0.5:
            data = raw.translate(ALPHABET)
        elif kind < 0.83:
            data = raw
        else:
            data = bytes(size // 2) + raw[: size - size // 2]
        (d / f"f{i:05d}.dat").write_bytes(data)
        written += size
    return written


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def best(rounds: int, fn: Callable[[], Any], reset: Callable[[], None] | None = None) -> tuple[float, Any]:
    out: tuple[float, Any] = (float("inf"), None)
    for _ in range(rounds):
        if reset:
            reset()
        t, r = timed(fn)
        if t < out[0]:
            out = (t, r)
    return out


def tar_zstd(src: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    run("zstd", "-q", "-3", "-o", str(out), stdin=tar.stdout)
    tar.stdout.close()
    if tar.wait() != 0:
        raise RuntimeError("tar failed")
    run("sync", "-f", str(out))


def untar_zstd(archive: Path, dest: Path) -> None:
    dest.mkdir()
    zstd = subprocess.Popen(["zstd", "-q", "-d", "-c", str(archive)], stdout=subprocess.PIPE)
    assert zstd.stdout is not None
    run("tar", "-C", str(dest), "-xf", "-", stdin=zstd.stdout)
    zstd.stdout.close()
    if zstd.wait() != 0:
        raise RuntimeError("zstd -d failed")
    run("sync", "-f", str(dest))


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--backing", choices=["tmpfs", "disk"], default="tmpfs")
    args = ap.parse_args()
    r: dict[str, Any] = {"bench": "backups", "files": args.files, "cpus": os.cpu_count()}
    with loop_ext4(int(args.gib * 3.5) + 3, args.backing) as mnt:
        src = mnt / "src"
        t_gen, total = timed(lambda: make_tree(src, args.files, int(args.gib * (1 << 30))))
        r["tree_bytes"] = total
        r["tree_generate_s"] = round(t_gen, 2)
        run("sync", "-f", str(src))
        archive = mnt / "tree.tar.zst"
        stores: list[Path] = []

        def fresh_store() -> None:
            for s in stores:
                shutil.rmtree(s, ignore_errors=True)
            stores.append(mnt / f"store{len(stores)}")

        # 1. first backup vs tar | zstd -3
        t_tar, _ = best(args.rounds, lambda: tar_zstd(src, archive))
        t_first, first = best(args.rounds, lambda: BackupStore(stores[-1]).backup(src), fresh_store)
        store = BackupStore(stores[-1])
        r["first"] = {
            "tar_zstd_s": round(t_tar, 2),
            "tar_zstd_MBps": round(total / t_tar / 1e6),
            "tar_zstd_bytes": archive.stat().st_size,
            "backup_s": round(t_first, 2),
            "backup_MBps": round(total / t_first / 1e6),
            "backup_stored_bytes": first.stored_bytes,
            "backup_chunks": first.distinct_chunks,
            "ratio_vs_tar_zstd": round(t_tar / t_first, 2),
            "goal": ">= 1.0",
        }
        # 2. second backup of the unchanged tree
        t_second, second = best(args.rounds, lambda: store.backup(src, previous=first.manifest))
        r["second_unchanged"] = {
            "backup_s": round(t_second, 3),
            "new_chunk_bytes": second.new_chunk_bytes,
            "bytes_read": second.bytes_read,
            "ratio_vs_tar_zstd": round(t_tar / t_second, 1),
            "goal": ">= 10",
        }
        t_cold, cold = timed(lambda: store.backup(src))
        r["second_unchanged_reread"] = {
            "backup_s": round(t_cold, 2),
            "new_chunk_bytes": cold.new_chunk_bytes,
            "ratio_vs_tar_zstd": round(t_tar / t_cold, 2),
        }
        # 3. restore vs zstd -d | tar -x
        out = mnt / "restore"

        def clear_out() -> None:
            shutil.rmtree(out, ignore_errors=True)

        t_untar, _ = best(args.rounds, lambda: untar_zstd(archive, out), clear_out)
        clear_out()
        t_restore, restored = best(args.rounds, lambda: store.restore(first.manifest, out), clear_out)
        assert restored["bytes"] == total, restored
        r["restore"] = {
            "untar_s": round(t_untar, 2),
            "restore_s": round(t_restore, 2),
            "restore_MBps": round(total / t_restore / 1e6),
            "ratio_vs_zstd_tar": round(t_untar / t_restore, 2),
            "goal": ">= 1.0",
        }
        clear_out()
        t_verify, v = timed(lambda: store.verify(first.manifest))
        assert v.ok, v.bad
        r["verify_s"] = round(t_verify, 2)
        export = mnt / "export.tar.zst"
        t_export, n = timed(lambda: store.export_tar(first.manifest, path=export))
        r["export"] = {"s": round(t_export, 2), "bytes": n, "ratio_vs_tar_zstd": round(t_tar / t_export, 2)}
        export.unlink()
        archive.unlink()
        shutil.rmtree(src)

        # 4. the figures on 1 GiB
        gib = mnt / "gib"
        gib.mkdir()
        rng = random.Random(4)
        data = bytearray(b"".join(rng.randbytes(1 << 26) for _ in range(16)))
        (gib / "data").write_bytes(data)
        s1 = BackupStore(mnt / "store-gib")
        a = s1.backup(gib)
        b = s1.backup(gib, previous=a.manifest)
        c = s1.backup(gib)
        off = 300 << 20
        data[off : off + (4 << 20)] = rng.randbytes(4 << 20)
        with open(gib / "data", "r+b") as f:
            f.seek(off)
            f.write(data[off : off + (4 << 20)])
        d = s1.backup(gib, previous=a.manifest)
        r["one_gib"] = {
            "unchanged_new_chunk_bytes": b.new_chunk_bytes,
            "unchanged_reread_new_chunk_bytes": c.new_chunk_bytes,
            "unchanged_reread_new_percent": round(100 * c.new_chunk_bytes / total_or_one(a.source_bytes), 3),
            "changed_4mib_new_raw_bytes": d.new_raw_bytes,
            "changed_4mib_new_chunk_bytes": d.new_chunk_bytes,
            "changed_4mib_new_chunks": d.new_chunks,
            "goal": "unchanged < 1 %, 4 MiB change ~ 4 MiB",
        }
    print(json.dumps(r))


def total_or_one(n: int) -> int:
    return n or 1


if __name__ == "__main__":
    main()
