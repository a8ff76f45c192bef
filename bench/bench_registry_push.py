"""`skopeo copy` of a multi-layer image to and from Bulkhead's built-in registry (daphne, /v2/), side by side
with Debian's `docker-registry` (distribution 2.8) on this machine, in one run, rounds alternating.

Per round each registry gets a fresh image of the same shape (random, incompressible layers), so neither
side skips a blob it saw in an earlier round. Then: a re-push of the same image (every layer present:
HEAD checks only), a pull back to an `oci:` directory, and the latency of a small manifest GET.

Run: scripts/with-test-services.sh .venv/bin/python bench/bench_registry_push.py
     (BENCH_MB total image size, default 250; BENCH_LAYERS 5; BENCH_ROUNDS 2; BENCH_MANIFEST_GETS 1000)
Prints one JSON line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

TOTAL_MB = int(os.environ.get("BENCH_MB", "250"))
LAYERS = int(os.environ.get("BENCH_LAYERS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
MANIFEST_GETS = int(os.environ.get("BENCH_MANIFEST_GETS", "1000"))
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_image(directory: Path) -> None:
    """An OCI layout of LAYERS uncompressed tar layers of random bytes, TOTAL_MB in all."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers = []
    per_layer = TOTAL_MB * 1024 * 1024 // LAYERS
    for i in range(LAYERS):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(f"data/{i}.bin")
            info.size, info.mtime = per_layer, 1_700_000_000
            tar.addfile(info, io.BytesIO(os.urandom(per_layer)))
        data = buffer.getvalue()
        (blobs / digest(data)[7:]).write_bytes(data)
        layers.append({"mediaType": LAYER_TAR, "digest": digest(data), "size": len(data)})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        }
    ).encode()
    (blobs / digest(config)[7:]).write_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    (blobs / digest(manifest)[7:]).write_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def seed() -> str:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from tenants import services
    from tenants.actors import Actor
    from tenants.models import Quota, Tenant

    call_command("migrate", interactive=False, verbosity=0)
    users = get_user_model()
    operator = users.objects.filter(username="bench-op").first() or users.objects.create_user(
        "bench-op", password="bench-password-123", is_staff=True
    )
    pusher = users.objects.filter(username="bench-pusher").first() or users.objects.create_user(
        "bench-pusher", password="bench-password-123"
    )
    tenant = Tenant.objects.filter(name="benchreg").first() or services.create_tenant(
        actor=Actor(user=operator), name="benchreg", owner=pusher
    )
    Quota.objects.filter(tenant=tenant).update(image_bytes=1 << 50)
    return services.create_token(actor=Actor(user=pusher), name=f"bench-{time.time()}")[1]


def wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited")
        try:
            if httpx.get(url, timeout=2).status_code in (200, 401):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def skopeo(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return time.perf_counter() - started


def push(layout: Path, address: str, repo: str, creds: list[str]) -> float:
    return skopeo(
        "copy", "--dest-tls-verify=false", *creds, f"oci:{layout}:latest", f"docker://{address}/{repo}:1"
    )


def repush_blobs_sent(layout: Path, address: str, repo: str, creds: list[str]) -> dict[str, int]:
    """Push again an image whose blobs are all present, with skopeo's debug log: how many layer blobs
    it skipped (its HEAD check answered 200) and how many upload requests it made (0: no byte sent)."""
    done = subprocess.run(
        [
            "skopeo",
            "--debug",
            "copy",
            "--dest-tls-verify=false",
            *creds,
            f"oci:{layout}:latest",
            f"docker://{address}/{repo}:1",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    log = done.stderr.splitlines()
    return {
        "skipped": sum("Skipping blob" in line for line in log),
        "upload_requests": sum('msg="PATCH ' in line or "/blobs/uploads/" in line for line in log),
    }


def pull(address: str, repo: str, creds: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    return skopeo("copy", "--src-tls-verify=false", *creds, f"docker://{address}/{repo}:1", f"oci:{out}:x")


def manifest_latency(address: str, repo: str, token: str | None) -> tuple[float, float]:
    import httpx

    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    times = []
    with httpx.Client(headers=headers, timeout=10) as client:
        url = f"http://{address}/v2/{repo}/manifests/1"
        for _ in range(MANIFEST_GETS):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return statistics.median(times), percentile(times, 99)


def main() -> None:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    secret = seed()
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    ours_port, theirs_port = free_port(), free_port()
    config = work / "distribution.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'distribution'}\nhttp:\n  addr: 127.0.0.1:{theirs_port}\n"
    )
    env = {
        **os.environ,
        "BULKHEAD_DEBUG": "false",
        "BULKHEAD_LOG_LEVEL": "WARNING",
        "BULKHEAD_STORE_DIR": str(work / "store"),
    }
    ours = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(ours_port), "portal.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ours_address, theirs_address = f"127.0.0.1:{ours_port}", f"127.0.0.1:{theirs_port}"
    creds_push = ["--dest-creds", f"bench-pusher:{secret}"]
    creds_pull = ["--src-creds", f"bench-pusher:{secret}"]
    times: dict[str, list[float]] = {key: [] for key in ("push", "repush", "pull")}
    base: dict[str, list[float]] = {key: [] for key in ("push", "repush", "pull")}
    repush_blobs: dict[str, list[dict[str, int]]] = {"ours": [], "theirs": []}
    try:
        wait_for(f"http://{ours_address}/v2/", ours)
        wait_for(f"http://{theirs_address}/v2/", theirs)
        for round_number in range(ROUNDS):
            sides = [("ours", ours_address, times), ("theirs", theirs_address, base)]
            if round_number % 2:
                sides.reverse()
            for side, address, into in sides:
                layout = work / f"image-{side}-{round_number}"
                write_image(layout)
                repo = f"benchreg/app{round_number}"
                ours_side = side == "ours"
                into["push"].append(push(layout, address, repo, creds_push if ours_side else []))
                into["repush"].append(push(layout, address, repo, creds_push if ours_side else []))
                repush_blobs[side].append(
                    repush_blobs_sent(layout, address, repo, creds_push if ours_side else [])
                )
                into["pull"].append(pull(address, repo, creds_pull if ours_side else [], work / "pulled"))
                shutil.rmtree(layout)
        token = httpx.get(
            f"http://{ours_address}/v2/token",
            params={"service": "bulkhead", "scope": "repository:benchreg/app0:pull"},
            auth=("bench-pusher", secret),
        ).json()["token"]
        ours_p50, ours_p99 = manifest_latency(ours_address, "benchreg/app0", token)
        theirs_p50, theirs_p99 = manifest_latency(theirs_address, "benchreg/app0", None)
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    mb = TOTAL_MB * 1.0

    def best(values: list[float]) -> float:
        return min(values)

    result = {
        "bench": "registry_push",
        "image_mb": TOTAL_MB,
        "layers": LAYERS,
        "rounds": ROUNDS,
        "baseline": "docker-registry (distribution 2.8), filesystem storage, no auth",
        "push_s": {
            "ours": [round(t, 2) for t in times["push"]],
            "theirs": [round(t, 2) for t in base["push"]],
        },
        "push_mb_per_s_best": {
            "ours": round(mb / best(times["push"]), 1),
            "theirs": round(mb / best(base["push"]), 1),
        },
        "push_throughput_ratio_ours_over_theirs": round(best(base["push"]) / best(times["push"]), 2),
        "repush_s": {
            "ours": [round(t, 2) for t in times["repush"]],
            "theirs": [round(t, 2) for t in base["repush"]],
        },
        "repush_layer_blobs": repush_blobs,
        "pull_s": {
            "ours": [round(t, 2) for t in times["pull"]],
            "theirs": [round(t, 2) for t in base["pull"]],
        },
        "pull_throughput_ratio_ours_over_theirs": round(best(base["pull"]) / best(times["pull"]), 2),
        # The machine is shared: medians over the rounds say more than the best round alone.
        "median_ratio_ours_over_theirs": {
            "push": round(statistics.median(base["push"]) / statistics.median(times["push"]), 2),
            "pull": round(statistics.median(base["pull"]) / statistics.median(times["pull"]), 2),
        },
        "manifest_get_ms": {
            "ours_p50": round(ours_p50, 2),
            "ours_p99": round(ours_p99, 2),
            "theirs_p50": round(theirs_p50, 2),
            "theirs_p99": round(theirs_p99, 2),
        },
        "goal": "throughput ratio >= 1.0 both ways",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
