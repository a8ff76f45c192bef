"""Layer store benchmark: prints one JSON line of figures and ratios against named baselines.

Everything runs on a loop-mounted ext4 this script creates under /tmp (the root filesystem is slow
and erratic at creating many files) and removes afterwards, also after a failure. Both sides of each
comparison read the same input files and write to the same filesystem.

1. ingest: hash+verify+write+fsync a 1 GiB blob into the store vs ``openssl dgst -sha256`` of the
   same file (goal >= 0.9x); also the consuming ingest of an upload file on the store's filesystem
   (``consume=True``: hash+verify+fsync+rename, nothing copied).
2. unpack: a 5-layer image built from parts of /usr/share and /usr/lib (>= 300 MB, >= 20,000 files)
   as gzip layers vs ``tar -xzf`` of each layer in sequence (goal >= 2x) and vs ``umoci unpack`` of
   the same OCI layout (goal >= 4x); as zstd layers vs ``zstd -dc | tar -x`` (goal >= 1.5x).
3. disks: ``build_disk`` (erofs and ext4) of the unpacked chain vs ``mkfs.erofs`` / ``mkfs.ext4 -d``
   of the tree ``tar -x`` already flattened.
4. re-import of the same image into the populated store: bytes written (goal 0) and time.
5. chains (``--only unpack,chains``): ``lower_dirs`` of the image (its layers have implicit ``usr/``
   dirs, none over a symlink: the check alone), and the per-chain variant of the man-page layer stacked
   on a layer whose ``usr`` is a symlink (every file relocated) vs ``cp -al`` of that layer's tree.

Run as root: ``.venv/bin/python bench/bench_layers.py`` (``--rounds N``, default 3; best of N;
``--only ingest,unpack`` skips the slow disk section).
Layer tarballs are cached in /var/tmp/bulkhead-bench-layers between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaging.store import LayerSpec, LayerStore  # noqa: E402

CACHE = Path("/var/tmp/bulkhead-bench-layers")
# Five layers of a realistic size mix: many small files (man pages), locales, docs, Python, gcc.
LAYERS: list[list[str]] = [
    ["usr/share/man"],
    ["usr/share/locale", "usr/share/i18n", "usr/share/zoneinfo"],
    ["usr/share/doc", "usr/share/perl", "usr/share/vim"],
    ["usr/lib/python3.11", "usr/lib/python3"],
    ["usr/lib/gcc"],
]
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def loop_ext4(size_gib: int, backing: str) -> Iterator[Path]:
    """A fresh ext4 on a sparse file, loop-mounted under /tmp; removed on exit.

    With backing "tmpfs" the sparse file lives on a tmpfs of our own, so the root disk (slow and
    shared) does not decide the figures; "disk" puts it on the root filesystem.
    """
    base = Path(tempfile.mkdtemp(prefix="bulkhead-bench-"))
    back, mnt = base / "back", base / "mnt"
    back.mkdir()
    mnt.mkdir()
    mounted: list[Path] = []
    try:
        if backing == "tmpfs":
            run("mount", "-t", "tmpfs", "-o", f"size={size_gib + 1}g", "tmpfs", str(back))
            mounted.append(back)
        img = back / "fs.img"
        with open(img, "wb") as f:
            f.truncate(size_gib << 30)
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(img))
        run("mount", "-o", "loop", str(img), str(mnt))
        mounted.append(mnt)
        yield mnt
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def build_layers() -> list[dict[str, object]]:
    """Creates (or reuses) the layer tarballs: .tar, .tar.gz and .tar.zst per layer."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, object]] = []
    pending: list[subprocess.Popen[bytes]] = []
    for i, dirs in enumerate(LAYERS):
        tar, gz, zst = (CACHE / f"layer{i}.tar{ext}" for ext in ("", ".gz", ".zst"))
        if not (tar.exists() and gz.exists() and zst.exists()):
            present = [d for d in dirs if (Path("/") / d).exists()]
            run("tar", "-C", "/", "--sort=name", "--numeric-owner", "-cf", str(tar), *present)
            with open(gz, "wb") as f:
                pending.append(subprocess.Popen(["gzip", "-6", "-c", str(tar)], stdout=f))
            run("zstd", "-q", "-f", "-3", str(tar), "-o", str(zst))
            if len(pending) >= 2:  # two cores
                pending.pop(0).wait()
        out.append({"tar": tar, "gz": gz, "zst": zst})
    for p in pending:
        p.wait()
    for layer in out:
        layer["diff_id"] = sha256_file(layer["tar"])  # type: ignore[arg-type]
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(
    fn: Callable[[], object], rounds: int, setup: Callable[[], object] | None = None
) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of ``rounds`` runs; dirty data is flushed before each.

    CPU time is reported too because the machine is shared: wall time includes waiting for cores
    that other work holds, CPU time does not.
    """
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        if setup:
            setup()
        os.sync()
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        best = min(best, (wall, cpu))
    return best


Case = tuple[Callable[[], object], Callable[[], object] | None]


def timed_together(cases: dict[str, Case], rounds: int) -> dict[str, tuple[float, float]]:
    """``timed`` for several cases that are compared with each other: each round runs every case
    once, in turn, so a change of load on the shared machine (other sessions come and go within
    minutes) hits both sides of a ratio rather than whichever ran during it."""
    best = {name: (float("inf"), float("inf")) for name in cases}
    for _ in range(rounds):
        for name, (fn, setup) in cases.items():
            best[name] = min(best[name], timed(fn, 1, setup))
    return best


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def oci_layout(dest: Path, layers: list[dict[str, object]]) -> None:
    """An OCI image layout of the gzip layers, for umoci."""
    blobs = fresh(dest) / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return "sha256:" + d, len(data)

    descs = []
    for layer in layers:
        gz = Path(str(layer["gz"]))
        digest = sha256_file(gz)
        shutil.copyfile(gz, blobs / digest[7:])
        descs.append({"mediaType": GZIP, "digest": digest, "size": gz.stat().st_size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
    }
    cd, cs = put(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    }
    md, ms = put(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md,
                "size": ms,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def bench_ingest(mnt: Path, rounds: int, r: dict[str, object]) -> None:
    """1 GiB blob: the copying ingest and the consuming one vs ``openssl dgst -sha256``."""
    blob = mnt / "blob.bin"
    chunk = os.urandom(16 << 20)
    with open(blob, "wb") as f:
        for _ in range(64):
            f.write(chunk)
    expected = "sha256:" + run("openssl", "dgst", "-sha256", "-r", str(blob)).stdout.split()[0].decode()
    holder: dict[str, LayerStore] = {}
    upload = mnt / "upload.bin"

    def new_store() -> None:
        holder["s"] = LayerStore(fresh(mnt / "ingest-store"))

    def new_upload() -> None:
        # An upload temp file on the store's filesystem, already on disk like the blob above.
        new_store()
        shutil.copyfile(blob, upload)

    cases: dict[str, Case] = {
        "openssl": (lambda: run("openssl", "dgst", "-sha256", str(blob)), None),
        "ingest": (lambda: holder["s"].ingest_path(blob, digest=expected), new_store),
    }
    if "consume" in inspect.signature(LayerStore.ingest_path).parameters:  # not in older stores
        cases["consume"] = (
            lambda: holder["s"].ingest_path(upload, digest=expected, consume=True),
            new_upload,
        )
    t = timed_together(cases, rounds)
    t_openssl, t_ingest = t["openssl"][0], t["ingest"][0]
    shutil.rmtree(mnt / "ingest-store")
    blob.unlink()
    r["ingest_1gib_s"] = round(t_ingest, 3)
    r["ingest_gb_per_s"] = round((1 << 30) / t_ingest / 1e9, 2)
    r["openssl_sha256_1gib_s"] = round(t_openssl, 3)
    r["ingest_vs_openssl"] = round(t_openssl / t_ingest, 2)
    if "consume" in t:
        r["ingest_consume_1gib_s"] = round(t["consume"][0], 3)
        r["ingest_consume_vs_openssl"] = round(t_openssl / t["consume"][0], 2)


def bench_unpack(
    mnt: Path, layers: list[dict[str, object]], rounds: int, r: dict[str, object]
) -> tuple[LayerStore, list[LayerSpec]]:
    """The image as gzip and zstd layers: ours (durable and not) vs tar, zstd | tar and umoci."""
    tar_bytes = sum(Path(str(x["tar"])).stat().st_size for x in layers)
    store_root = mnt / "store"
    store = LayerStore(store_root)
    gz_specs = []
    zst_specs = []
    for layer in layers:
        b, _ = store.ingest_path(Path(str(layer["gz"])))
        gz_specs.append(LayerSpec(b, GZIP, str(layer["diff_id"])))
        b, _ = store.ingest_path(Path(str(layer["zst"])))
        zst_specs.append(LayerSpec(b, ZSTD, str(layer["diff_id"])))

    def wipe_layers() -> None:
        store.gc(keep_blobs=[s.blob_digest for s in gz_specs + zst_specs])

    results = store.unpack_layers(gz_specs)
    r["image_tar_mb"] = round(tar_bytes / 1e6, 1)
    r["image_files"] = sum(x.entries for x in results)
    r["image_gzip_mb"] = round(sum(Path(str(x["gz"])).stat().st_size for x in layers) / 1e6, 1)
    r["image_zstd_mb"] = round(sum(Path(str(x["zst"])).stat().st_size for x in layers) / 1e6, 1)

    # The same store without syncing (tar and umoci do not sync either).
    scratch = LayerStore(store_root, durable=False)

    def tar_gz() -> None:
        dest = mnt / "tar-x"
        for layer in layers:
            run("tar", "--numeric-owner", "-xzf", str(layer["gz"]), "-C", str(dest))

    def tar_zst() -> None:
        dest = mnt / "tar-x"
        for layer in layers:
            cmd = f"zstd -dc {layer['zst']} | tar --numeric-owner -x -C {dest}"
            subprocess.run(cmd, shell=True, check=True)  # noqa: S602 fixed command, our own paths

    layout = mnt / "oci"
    oci_layout(layout, layers)

    def umoci() -> None:
        run("umoci", "unpack", "--image", f"{layout}:latest", str(mnt / "bundle"))

    t = timed_together(
        {
            "ours_gz": (lambda: store.unpack_layers(gz_specs), wipe_layers),
            "tar_gz": (tar_gz, lambda: fresh(mnt / "tar-x")),
            "ours_zst": (lambda: store.unpack_layers(zst_specs), wipe_layers),
            "tar_zst": (tar_zst, lambda: fresh(mnt / "tar-x")),
            "fast_gz": (lambda: scratch.unpack_layers(gz_specs), wipe_layers),
            "fast_zst": (lambda: scratch.unpack_layers(zst_specs), wipe_layers),
            "umoci": (umoci, lambda: shutil.rmtree(mnt / "bundle", ignore_errors=True)),
        },
        rounds,
    )
    wipe_layers()  # the tree tar -x left in tar-x stays for bench_disks
    shutil.rmtree(mnt / "bundle", ignore_errors=True)
    shutil.rmtree(layout)
    (t_ours_gz, c_ours_gz), (t_ours_zst, c_ours_zst) = t["ours_gz"], t["ours_zst"]
    (t_tar_gz, c_tar_gz), (t_tar_zst, c_tar_zst) = t["tar_gz"], t["tar_zst"]
    (t_umoci, c_umoci), t_fast_gz, t_fast_zst = t["umoci"], t["fast_gz"][0], t["fast_zst"][0]

    mb = tar_bytes / 1e6
    r["unpack_gzip_s"] = round(t_ours_gz, 3)
    r["unpack_gzip_mb_per_s"] = round(mb / t_ours_gz, 1)
    r["tar_xzf_s"] = round(t_tar_gz, 3)
    r["umoci_unpack_s"] = round(t_umoci, 3)
    r["unpack_zstd_s"] = round(t_ours_zst, 3)
    r["unpack_zstd_mb_per_s"] = round(mb / t_ours_zst, 1)
    r["zstd_dc_tar_x_s"] = round(t_tar_zst, 3)
    r["unpack_gzip_vs_tar_xzf"] = round(t_tar_gz / t_ours_gz, 2)
    r["unpack_gzip_vs_umoci"] = round(t_umoci / t_ours_gz, 2)
    r["unpack_zstd_vs_zstd_tar"] = round(t_tar_zst / t_ours_zst, 2)
    r["cpu_s"] = {
        "unpack_gzip": round(c_ours_gz, 2),
        "tar_xzf": round(c_tar_gz, 2),
        "umoci_unpack": round(c_umoci, 2),
        "unpack_zstd": round(c_ours_zst, 2),
        "zstd_dc_tar_x": round(c_tar_zst, 2),
    }
    r["no_sync"] = {
        "unpack_gzip_s": round(t_fast_gz, 3),
        "unpack_zstd_s": round(t_fast_zst, 3),
        "unpack_gzip_vs_tar_xzf": round(t_tar_gz / t_fast_gz, 2),
        "unpack_gzip_vs_umoci": round(t_umoci / t_fast_gz, 2),
        "unpack_zstd_vs_zstd_tar": round(t_tar_zst / t_fast_zst, 2),
    }
    return store, gz_specs


def bench_disks(
    mnt: Path,
    layers: list[dict[str, object]],
    store: LayerStore,
    gz_specs: list[LayerSpec],
    rounds: int,
    r: dict[str, object],
) -> None:
    """Root disks of the chain vs mkfs of the tree tar flattened, then the re-import."""
    store_root = store.root
    diff_ids = [str(x["diff_id"]) for x in layers]
    store.unpack_layers(gz_specs)
    disks = store_root / "disks"

    def drop_disks() -> None:
        for p in disks.iterdir():
            p.unlink()

    for fs in ("ext4", "erofs"):  # erofs last: its disk stays for the re-import below
        # mkfs.ext4 -d is slow on big directories (see README), so ext4 runs once.
        n = rounds if fs == "erofs" else 1
        t, _ = timed(lambda fs=fs: store.build_disk(diff_ids, fs=fs), n, drop_disks)  # type: ignore[misc]
        r[f"build_disk_{fs}_s"] = round(t, 3)
        r[f"disk_{fs}_mb"] = round(next(disks.glob(f"*.{fs}")).stat().st_size / 1e6, 1)
    flat = mnt / "tar-x"  # the tree tar -x flattened in bench_unpack
    out_img = mnt / "flat.img"
    t_mkfs_erofs, _ = timed(
        lambda: run("mkfs.erofs", "--quiet", str(out_img), str(flat)),
        rounds,
        lambda: out_img.unlink(missing_ok=True),
    )
    size_k = int(float(r["disk_ext4_mb"]) * 1e6 * 1.1) // 1024  # type: ignore[arg-type]
    t_mkfs_ext4, _ = timed(
        lambda: run(
            "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(flat), str(out_img), f"{size_k}k"
        ),
        1,
        lambda: out_img.unlink(missing_ok=True),
    )
    out_img.unlink(missing_ok=True)
    r["mkfs_erofs_flat_tree_s"] = round(t_mkfs_erofs, 3)
    r["mkfs_ext4_flat_tree_s"] = round(t_mkfs_ext4, 3)
    r["build_disk_erofs_vs_mkfs_erofs"] = round(t_mkfs_erofs / float(r["build_disk_erofs_s"]), 2)  # type: ignore[arg-type]
    r["build_disk_ext4_vs_mkfs_ext4"] = round(t_mkfs_ext4 / float(r["build_disk_ext4_s"]), 2)  # type: ignore[arg-type]

    # --- re-import of a fully shared image ---------------------------------------------------
    again = LayerStore(store_root)
    t0 = time.perf_counter()
    for layer, spec in zip(layers, gz_specs, strict=True):
        again.ingest_path(Path(str(layer["gz"])), digest=spec.blob_digest)
    reimported = again.unpack_layers(gz_specs)
    again.build_disk(diff_ids)
    r["reimport_s"] = round(time.perf_counter() - t0, 4)
    stats = again.stats()
    r["reimport_bytes_written"] = stats["bytes_written"]
    r["reimport_bytes_read"] = stats["bytes_read"]
    r["reimport_layers_skipped"] = sum(1 for x in reimported if x.skipped)
    r["reimport_disks_built"] = stats["disks_built"]


def bench_chains(
    mnt: Path,
    layers: list[dict[str, object]],
    store: LayerStore,
    gz_specs: list[LayerSpec],
    rounds: int,
    r: dict[str, object],
) -> None:
    """Stacking layers: the symlink check of an ordinary image, and one variant built from scratch."""
    diff_ids = [str(x["diff_id"]) for x in layers]
    store.unpack_layers(gz_specs)
    t, _ = timed(lambda: store.lower_dirs(diff_ids), rounds * 5)
    r["lower_dirs_5_layers_ms"] = round(t * 1e3, 2)
    r["lower_dirs_variants"] = sum(1 for p in store.lower_dirs(diff_ids) if "chains" in p.parts)

    # A base whose /usr is a symlink: the man-page layer's implicit usr/ resolves through it.
    base_tar = mnt / "usr-link.tar"
    link_src = fresh(mnt / "usr-link")
    (link_src / "usr").symlink_to("/opt/usr")
    run("tar", "-cf", str(base_tar), "-C", str(link_src), "usr")
    blob, _ = store.ingest_path(base_tar)
    [base] = store.unpack_layers([LayerSpec(blob, "application/vnd.oci.image.layer.v1.tar")])
    chain = [base.diff_id, diff_ids[0]]
    chains_dir = store.root / "layers" / "chains"

    def drop_variants() -> None:
        for p in chains_dir.iterdir():
            shutil.rmtree(p)

    t_variant, _ = timed(lambda: store.lower_dirs(chain), rounds, drop_variants)
    variant = store.lower_dirs(chain)[1]
    assert (variant / "opt/usr/share/man").is_dir(), variant
    r["variant_entries"] = sum(1 for _ in variant.rglob("*"))
    t_found, _ = timed(lambda: store.lower_dirs(chain), rounds * 5)
    layer_tree = store.layer_path(diff_ids[0])
    copy = mnt / "cp-al"
    t_cp, _ = timed(
        lambda: run("cp", "-al", str(layer_tree), str(copy)),
        rounds,
        lambda: shutil.rmtree(copy, ignore_errors=True),
    )
    shutil.rmtree(copy, ignore_errors=True)
    drop_variants()
    r["variant_build_s"] = round(t_variant, 3)
    r["variant_found_ms"] = round(t_found * 1e3, 2)
    r["cp_al_layer_s"] = round(t_cp, 3)
    r["variant_build_vs_cp_al"] = round(t_cp / t_variant, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backing", choices=["tmpfs", "disk"], default="tmpfs")
    ap.add_argument(
        "--only",
        default="ingest,unpack,disks",
        help="comma-separated sections: ingest, unpack, disks, chains (disks and chains need unpack)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    if ("disks" in only or "chains" in only) and "unpack" not in only:
        ap.error("disks and chains need unpack")
    rounds = args.rounds
    layers = build_layers()
    r: dict[str, object] = {
        "bench": "layers",
        "rounds": rounds,
        "backing": f"ext4 on loop on {args.backing}",
        "load_avg_1m": os.getloadavg()[0],
    }
    with loop_ext4(10, args.backing) as mnt:
        if "ingest" in only:
            bench_ingest(mnt, rounds, r)
        if "unpack" in only:
            store, gz_specs = bench_unpack(mnt, layers, rounds, r)
            if "disks" in only:
                bench_disks(mnt, layers, store, gz_specs, rounds, r)
            if "chains" in only:
                bench_chains(mnt, layers, store, gz_specs, rounds, r)
    r["load_avg_1m_end"] = os.getloadavg()[0]
    goals = {
        "ingest_vs_openssl>=0.9": ("ingest_vs_openssl", 0.9),
        "ingest_consume_vs_openssl>=0.9": ("ingest_consume_vs_openssl", 0.9),
        "unpack_gzip_vs_tar_xzf>=2": ("unpack_gzip_vs_tar_xzf", 2),
        "unpack_gzip_vs_umoci>=4": ("unpack_gzip_vs_umoci", 4),
        "unpack_zstd_vs_zstd_tar>=1.5": ("unpack_zstd_vs_zstd_tar", 1.5),
    }
    met: dict[str, bool] = {k: float(r[key]) >= goal for k, (key, goal) in goals.items() if key in r}  # type: ignore[arg-type]
    if "reimport_bytes_written" in r:
        met["reimport_bytes_written==0"] = r["reimport_bytes_written"] == 0
    r["goals_met"] = met
    print(json.dumps(r))


if __name__ == "__main__":
    main()
