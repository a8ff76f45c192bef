"""Benchmark: how fast Bulkhead's namespace-container driver starts containers, and how densely.

Prints one JSON line. Our driver runs each container in a user namespace (the default: its own id
range, idmapped image layers) and, side by side, root-mapped (`user_namespace=False`, what a tenant
allowed privileged containers gets, and what every container was before): the userns cost is the
ratio of the two. A third series runs user-namespaced with the process's kept namespaces dropped
first (`cold`): the cost when a range is used for the first time by this agent.
Baselines, all on the same busybox image and the same host:
  * bare runc: `runc run -d` of an equivalent prepared bundle (same config.json, plain rootfs dir)
    against our create+start; foreground `runc run` of `true` (create, start, wait, delete in one
    process) against our run + wait_exit + delete of `true`;
  * podman: warm `podman run --rm` of the same rootfs imported with `podman import`.
Contenders run interleaved, round by round, so that load from other processes hits them alike.
Density: start N `sleep` containers at once (thread pool) and measure the monitors' memory.

`--netns`: our containers join a network namespace the bench prepares (as in a compartment), where a
user-namespaced container's /sys and sysctls are set up by the host.

Usage: .venv/bin/python bench/bench_container_start.py [--runs 30] [--density 200] [--no-podman] [--netns]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from compute.runtimes.oci import (  # noqa: E402
    ContainerSpec,
    OciRuntime,
    build_oci_config,
    cgroup_mode,
    resolve_user,
)
from compute.runtimes.userns import forget_user_namespaces  # noqa: E402
from tests.compute.rootfs import build_busybox_rootfs  # noqa: E402

CGROUP_PARENT = "bht-bench"
PODMAN_IMAGE = "localhost/bht-bench-busybox:latest"
PODMAN_FLAGS = [
    "--runtime",
    "runc",
    "--network",
    "none",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
]


def median_ms(samples: list[float]) -> float:
    """Median of samples in seconds, as milliseconds rounded to 0.1."""
    return round(statistics.median(samples) * 1000, 1)


def new_id() -> str:
    """A container id with the bench prefix."""
    return f"bht-bench-{uuid.uuid4().hex[:12]}"


def prepare_bare_bundle(directory: Path, image: Path, args: list[str]) -> Path:
    """A runc bundle equivalent to ours (same config.json builder) over a plain rootfs copy."""
    shutil.copytree(image, directory / "rootfs", symlinks=True)
    for name, text in (("hosts", "127.0.0.1\tlocalhost\n"), ("resolv.conf", ""), ("hostname", "bare\n")):
        (directory / name).write_text(text)
    spec = ContainerSpec(
        container_id="bht-bench-bare",
        lower_dirs=[str(image)],
        args=args,
        memory_mib=64,
        vcpus=0.5,
        pids_limit=64,
    )
    config = build_oci_config(
        spec,
        user=resolve_user(image, "0"),
        bundle=directory,
        cgroups_path=f"/{CGROUP_PARENT}/{directory.name}",
        cgroup_mode=cgroup_mode(),
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def time_ours(
    runtime: OciRuntime, image: Path, *, user_namespace: bool = True, netns_path: str | None = None
) -> tuple[float, float, float]:
    """Return (create+start until running, delete of that container, full `true` lifecycle)."""
    container_id = new_id()
    spec = ContainerSpec(
        container_id=container_id,
        lower_dirs=[str(image)],
        args=["sleep", "30"],
        memory_mib=64,
        vcpus=0.5,
        pids_limit=64,
        user_namespace=user_namespace,
        netns_path=netns_path,
    )
    started = time.perf_counter()
    runtime.run(spec)
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    runtime.delete(container_id)
    delete_seconds = time.perf_counter() - started

    lifecycle_id = new_id()
    lifecycle_spec = ContainerSpec(
        container_id=lifecycle_id,
        lower_dirs=[str(image)],
        args=["true"],
        memory_mib=64,
        vcpus=0.5,
        pids_limit=64,
        user_namespace=user_namespace,
        netns_path=netns_path,
    )
    started = time.perf_counter()
    runtime.run(lifecycle_spec)
    exit_code = runtime.wait_exit(lifecycle_id, 10)
    runtime.delete(lifecycle_id)
    lifecycle_seconds = time.perf_counter() - started
    if exit_code != 0:
        raise RuntimeError(f"our `true` container exited with {exit_code}")
    return start_seconds, delete_seconds, lifecycle_seconds


def time_bare_runc(bundle: Path, true_bundle: Path, runc_root: Path) -> tuple[float, float]:
    """Return (`runc run -d` of sleep, foreground `runc run` of `true`, which also deletes)."""
    base = ["runc", f"--root={runc_root}"]
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    container_id = new_id()
    started = time.perf_counter()
    subprocess.run([*base, "run", "-d", "--bundle", str(bundle), container_id], check=True, **quiet)
    run_seconds = time.perf_counter() - started
    subprocess.run([*base, "delete", "--force", container_id], check=True, capture_output=True)

    started = time.perf_counter()
    subprocess.run([*base, "run", "--bundle", str(true_bundle), new_id()], check=True, **quiet)
    return run_seconds, time.perf_counter() - started


def time_podman() -> float:
    """Return the wall time of one warm `podman run --rm` of `true`."""
    started = time.perf_counter()
    subprocess.run(
        ["podman", "run", "--rm", *PODMAN_FLAGS, PODMAN_IMAGE, "true"], check=True, capture_output=True
    )
    return time.perf_counter() - started


def import_into_podman(image: Path, scratch: Path) -> str:
    """Import the busybox rootfs as a podman image, warm it up once; return the image id."""
    archive = scratch / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image, arcname=".")
    imported = subprocess.run(
        ["podman", "import", str(archive), PODMAN_IMAGE], check=True, capture_output=True, text=True
    )
    time_podman()
    return imported.stdout.strip().splitlines()[-1]


def memory_of(pid: int) -> tuple[int, int]:
    """Return (RSS, PSS) of a process in bytes; PSS counts shared pages once across processes."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, value = line.partition(":")
            if key == "Rss":
                rss = int(value.split()[0]) * 1024
            elif key == "Pss":
                pss = int(value.split()[0]) * 1024
    return rss, pss


def density(runtime: OciRuntime, image: Path, count: int, workers: int) -> dict[str, float]:
    """Start `count` sleep containers at once; report time and the conmon monitors' memory."""
    ids = [new_id() for _ in range(count)]

    def start_one(container_id: str) -> None:
        runtime.run(
            ContainerSpec(
                container_id=container_id,
                lower_dirs=[str(image)],
                args=["sleep", "600"],
                memory_mib=16,
                vcpus=0.1,
                pids_limit=8,
            )
        )

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(start_one, ids))
        start_seconds = time.perf_counter() - started
        running = sum(runtime.state(container_id).status == "running" for container_id in ids)
        monitor_memory = []
        for container_id in ids:
            pid = int((runtime.bundle_dir(container_id) / "conmon.pid").read_text())
            monitor_memory.append(memory_of(pid))
        container_memory = sum(runtime.stats(container_id).memory_bytes for container_id in ids)
    finally:
        started_delete = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(runtime.delete, ids))
        delete_seconds = time.perf_counter() - started_delete
    return {
        "density_containers": count,
        "density_running": running,
        "density_workers": workers,
        "density_start_total_s": round(start_seconds, 2),
        "density_start_per_container_ms": round(start_seconds / count * 1000, 1),
        "density_delete_total_s": round(delete_seconds, 2),
        "monitor_rss_per_container_kib": round(statistics.mean(rss for rss, _ in monitor_memory) / 1024),
        "monitor_pss_per_container_kib": round(statistics.mean(pss for _, pss in monitor_memory) / 1024),
        "container_memory_per_container_kib": round(container_memory / count / 1024),
    }


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--density", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--netns", action="store_true")
    options = parser.parse_args()
    use_podman = not options.no_podman and shutil.which("podman") is not None

    scratch = Path(tempfile.mkdtemp(prefix="bht-bench-"))
    scratch.chmod(0o711)  # a user-namespaced container's root must reach its rootfs below it
    runtime = OciRuntime("runc", state_dir=scratch / "state", cgroup_parent=CGROUP_PARENT)
    runc_root = scratch / "bare-runc"
    podman_image_id = ""
    netns_name = f"bht-bench-{uuid.uuid4().hex[:8]}" if options.netns else None
    netns_path = f"/var/run/netns/{netns_name}" if netns_name else None
    try:
        if netns_name:
            subprocess.run(["ip", "netns", "add", netns_name], check=True)
        image = build_busybox_rootfs(scratch / "image")
        bundle = prepare_bare_bundle(scratch / "bare", image, ["sleep", "30"])
        true_bundle = prepare_bare_bundle(scratch / "bare-true", image, ["true"])
        if use_podman:
            podman_image_id = import_into_podman(image, scratch)
        time_ours(runtime, image, netns_path=netns_path)  # warm caches once, untimed
        time_ours(runtime, image, user_namespace=False, netns_path=netns_path)
        time_bare_runc(bundle, true_bundle, runc_root)
        ours_start, ours_delete, ours_lifecycle, bare_run, bare_lifecycle, podman = [], [], [], [], [], []
        mapped_start: list[float] = []
        mapped_delete: list[float] = []
        mapped_lifecycle: list[float] = []
        cold_start: list[float] = []
        for round_number in range(options.runs):
            forget_user_namespaces()
            cold_start.append(time_ours(runtime, image, netns_path=netns_path)[0])
            # Alternate which of the two goes first, so neither always runs on a warmer cache.
            for user_namespace in (True, False) if round_number % 2 == 0 else (False, True):
                start_seconds, delete_seconds, lifecycle_seconds = time_ours(
                    runtime, image, user_namespace=user_namespace, netns_path=netns_path
                )
                starts, deletes, lifecycles = (
                    (ours_start, ours_delete, ours_lifecycle)
                    if user_namespace
                    else (mapped_start, mapped_delete, mapped_lifecycle)
                )
                starts.append(start_seconds)
                deletes.append(delete_seconds)
                lifecycles.append(lifecycle_seconds)
            run_seconds, lifecycle_seconds = time_bare_runc(bundle, true_bundle, runc_root)
            bare_run.append(run_seconds)
            bare_lifecycle.append(lifecycle_seconds)
            if use_podman:
                podman.append(time_podman())
        figures: dict[str, object] = {
            "benchmark": "container_start",
            "runs": options.runs,
            "cgroup_mode": cgroup_mode(),
            "joined_netns": bool(netns_path),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "ours_create_start_ms": median_ms(ours_start),
            "ours_delete_ms": median_ms(ours_delete),
            "ours_true_lifecycle_ms": median_ms(ours_lifecycle),
            "root_mapped_create_start_ms": median_ms(mapped_start),
            "root_mapped_delete_ms": median_ms(mapped_delete),
            "root_mapped_true_lifecycle_ms": median_ms(mapped_lifecycle),
            "userns_cold_create_start_ms": median_ms(cold_start),
            "ratio_cold_start_userns_vs_root_mapped": round(
                statistics.median(cold_start) / statistics.median(mapped_start), 3
            ),
            "ratio_start_userns_vs_root_mapped": round(
                statistics.median(ours_start) / statistics.median(mapped_start), 3
            ),
            "ratio_lifecycle_userns_vs_root_mapped": round(
                statistics.median(ours_lifecycle) / statistics.median(mapped_lifecycle), 3
            ),
            "ratio_delete_userns_vs_root_mapped": round(
                statistics.median(ours_delete) / statistics.median(mapped_delete), 3
            ),
            "bare_runc_run_d_ms": median_ms(bare_run),
            "bare_runc_run_true_ms": median_ms(bare_lifecycle),
            "ratio_start_vs_bare_runc_run_d": round(
                statistics.median(ours_start) / statistics.median(bare_run), 2
            ),
            "ratio_lifecycle_vs_bare_runc_run_true": round(
                statistics.median(ours_lifecycle) / statistics.median(bare_lifecycle), 2
            ),
        }
        if use_podman:
            figures["podman_run_rm_ms"] = median_ms(podman)
            figures["ratio_lifecycle_vs_podman_run_rm"] = round(
                statistics.median(ours_lifecycle) / statistics.median(podman), 2
            )
            figures["ratio_start_vs_podman_run_rm"] = round(
                statistics.median(ours_start) / statistics.median(podman), 2
            )
        if options.density:
            figures.update(density(runtime, image, options.density, options.workers))
        print(json.dumps(figures))
    finally:
        for container_id in runtime.list_ids():
            runtime.delete(container_id)
        if use_podman:
            # By id: removing only the tag could leave an untagged image behind.
            for image_ref in (podman_image_id, PODMAN_IMAGE):
                if image_ref:
                    subprocess.run(["podman", "rmi", "--force", image_ref], capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        if netns_name:
            subprocess.run(["ip", "netns", "delete", netns_name], check=False)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / CGROUP_PARENT
            if parent.is_dir():
                try:
                    parent.rmdir()
                except OSError as error:
                    print(f"left {parent}: {error}", file=sys.stderr)


if __name__ == "__main__":
    main()
