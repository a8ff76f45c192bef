"""API create -> running for a busybox namespace container, side by side with bare `runc run -d`.

Ours: POST /api/v1/workloads/ through the real ASGI server, Operation row + Celery task on the host's
queue (real Redis, real worker), agent: overlay of the store's layers, conmon + runc, state recorded
as `running` in PostgreSQL. Timed from the POST until the row says running (polled every 2 ms by
primary key on a connection of its own). Baseline: `runc run -d` of an equivalent bundle (same
config.json builder, plain rootfs). The two take turns in each round, with 50 ms pauses between them.

Run: scripts/with-test-services.sh .venv/bin/python bench/api_workload_start.py   (root, PostgreSQL)
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from harness import free_port, rss_kib  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "15"))
# BENCH_HOST_API=1: the host's worker and agent act as a host on its own machine would, reporting
# through the portal's host API with the host's credential (HTTP to the same web server) instead of
# the in-process link of the portal's own machine.
HOST_API = os.environ.get("BENCH_HOST_API", "") == "1"


def main() -> None:
    import django

    store = Path(tempfile.mkdtemp(prefix="bht-bench-store-", dir=ROOT / "var"))
    os.environ["BULKHEAD_STORE_DIR"] = str(store)
    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    from django.contrib.auth import get_user_model

    from compute import hosts
    from compute.models import Host
    from imaging.models import Image
    from tenants import services
    from tenants.actors import Actor
    from tests.compute.runtimes import oci_runtime
    from tests.imaging.images import build_image, busybox_layers, write_oci_archive

    User = get_user_model()
    operator = User.objects.create_user("bench-op", password="bench-password-1", is_staff=True)
    actor = Actor(user=operator)
    tenant = services.create_tenant(actor=actor, name="bench", owner=operator)
    from tenants.models import Quota

    Quota.objects.filter(tenant=tenant).update(workloads=1000, vcpus=1000, memory_mib=10**6)
    _token, secret = services.create_token(actor=actor, name="bench")
    host = hosts.register_host(
        actor=actor, name="bench-host", facts=hosts.gather_facts(Host(name="bench-host"))
    )
    archive = write_oci_archive(build_image(busybox_layers()), store / "busybox.tar")

    env = {**os.environ, "BULKHEAD_DEBUG": "false", "BULKHEAD_LOG_LEVEL": "WARNING"}
    port = free_port()
    host_env = dict(env)
    if HOST_API:
        host_env["BULKHEAD_PORTAL_URL"] = f"http://127.0.0.1:{port}"
        host_env["BULKHEAD_HOST_CREDENTIAL"] = hosts.issue_host_credential(actor=actor, host=host)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "-Q",
                f"default,{host.queue}",
                "-c",
                "1",
                "-P",
                "solo",
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=host_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "manage.py", "agent", "--host", str(host.pk)],
            cwd=ROOT,
            env=host_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    import httpx
    import psycopg
    from bench_container_start import new_id, prepare_bare_bundle
    from django.db import connection

    from imaging.services import get_store

    # The poller is the bench's own cost on a 2-core machine: an ORM query every 2 ms took about 30 ms
    # of CPU per create from the web, worker and runtime it measures. A raw query by primary key on its
    # own connection asks the same question at the same 2 ms resolution for a small part of that.
    db = connection.settings_dict
    poll = psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"],
        host=db["HOST"],
        port=db["PORT"],
        autocommit=True,
    )
    ours: list[float] = []
    posts: list[float] = []
    bare: list[float] = []
    flat: Path | None = None
    bundle_dir: Path | None = None
    runc_root: Path | None = None
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Authorization": f"Bearer {secret}"}
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get("/api/v1/tenants/")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with open(archive, "rb") as f:
            client.post(
                "/api/v1/images/import/",
                data={"name": "busybox", "tag": "1", "tenant": str(tenant.pk)},
                files={"archive": f},
            )
        while not Image.objects.filter(name="busybox").exists():
            time.sleep(0.1)
        image = Image.objects.get(name="busybox")
        while image.image_layers.count() == 0 or not all(
            get_store().has_layer(il.layer.diff_id) for il in image.image_layers.all()
        ):
            time.sleep(0.1)

        # The baseline's bundle: the same image flattened into a plain directory.
        lower = get_store().lower_dirs([il.layer.diff_id for il in image.image_layers.order_by("position")])
        flat = Path(tempfile.mkdtemp(prefix="bht-bench-flat-", dir=ROOT / "var"))
        for layer in lower:  # busybox layers have no whiteouts: a plain copy is the flattened tree
            subprocess.run(["cp", "-a", f"{layer}/.", str(flat)], check=True)
        bundle_dir = Path(tempfile.mkdtemp(prefix="bht-bench-bundle-", dir=ROOT / "var"))
        bundle = prepare_bare_bundle(bundle_dir, flat, ["/bin/sleep", "300"])
        runc_root = Path(tempfile.mkdtemp(prefix="bht-bench-runc-"))

        def create_and_wait(name: str) -> tuple[float, float]:
            t0 = time.perf_counter()
            response = client.post(
                "/api/v1/workloads/",
                json={
                    "name": name,
                    "image": str(image.pk),
                    "tenant": str(tenant.pk),
                    "command": ["/bin/sleep", "300"],
                    "memory_mib": 64,
                    "vcpus": "0.5",
                },
            )
            posted = time.perf_counter() - t0
            assert response.status_code == 202, response.text
            workload_id = response.json()["target_id"]
            while (
                poll.execute(
                    "SELECT 1 FROM compute_workload WHERE id = %s AND state = 'running'", (workload_id,)
                ).fetchone()
                is None
            ):
                time.sleep(0.002)
            return time.perf_counter() - t0, posted

        def bare_run() -> float:
            cid = new_id()
            t0 = time.perf_counter()
            subprocess.run(
                ["runc", f"--root={runc_root}", "run", "-d", "--bundle", str(bundle), cid],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            elapsed = time.perf_counter() - t0
            subprocess.run(
                ["runc", f"--root={runc_root}", "delete", "--force", cid], check=True, capture_output=True
            )
            return elapsed

        create_and_wait("warmup")
        bare_run()
        rss_before = [rss_kib(proc.pid) for proc in procs]
        # Side by side: the contenders take turns within each round, so load from other processes on
        # the machine hits both about equally (our web, worker and agent are up and idle during `runc`).
        for i in range(RUNS):
            total, posted = create_and_wait(f"w{i}")
            ours.append(total)
            posts.append(posted)
            time.sleep(0.05)  # let the worker finish the operation's bookkeeping, as between API calls
            bare.append(bare_run())
            time.sleep(0.05)
        rss_after = [rss_kib(proc.pid) for proc in procs]
    finally:
        poll.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        runtime = oci_runtime(host)
        for runtime_id in runtime.list_ids():
            runtime.delete(runtime_id)
        if runc_root is not None:  # a baseline container left by a failed round
            listed = subprocess.run(
                ["runc", f"--root={runc_root}", "list", "-q"], capture_output=True, text=True
            )
            for cid in listed.stdout.split():
                subprocess.run(["runc", f"--root={runc_root}", "delete", "--force", cid], capture_output=True)

    import shutil

    for path in (store, flat, bundle_dir, runc_root):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    ours_ms = statistics.median(ours) * 1000
    bare_ms = statistics.median(bare) * 1000
    print(
        json.dumps(
            {
                "bench": "api_workload_start",
                "runs": RUNS,
                "host_link": "host API over HTTP" if HOST_API else "in process",
                "api_create_to_running_ms_median": round(ours_ms, 1),
                "api_post_202_ms_median": round(statistics.median(posts) * 1000, 1),
                "baseline": "bare runc run -d, same config.json",
                "bare_runc_run_d_ms_median": round(bare_ms, 1),
                "ratio_vs_bare_runc": round(ours_ms / bare_ms, 2),
                "load_average": os.getloadavg()[0],
                # Web, worker and agent memory, and what each further running container adds to it.
                "rss_kib_web_worker_agent": rss_after,
                "rss_kib_per_container": [
                    round((a - b) / RUNS, 1) for a, b in zip(rss_after, rss_before, strict=True)
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
