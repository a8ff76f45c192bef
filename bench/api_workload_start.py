"""API create -> running for a busybox namespace container, side by side with bare `runc run -d` and a
warm `podman run -d`; then (BENCH_HOST_API=1) the first start on a host without the layers, side by side
with `skopeo copy` of the same image from the portal's registry plus `umoci unpack` and `runc run -d`.

Ours: POST /api/v1/workloads/ through the real ASGI server, Operation row + Celery task on the host's
queue (real Redis, real worker), agent: overlay of the store's layers, conmon + runc, state recorded
as `running` in PostgreSQL. Timed from the POST until the portal recorded the workload running (the
row's `started_at`, the portal's clock on this machine, set in the statement that commits the state);
the bench polls the row every 10 ms by primary key on a connection of its own, and prints what it saw
too (`..._seen_ms_median`, quantized by the poll). Baselines:
- `runc run -d` of an equivalent bundle (same config.json builder, plain rootfs);
- warm `podman run -d --network none` of the same image (copied from the portal's registry into podman's
  storage with skopeo before the rounds), removed after each round (`podman rm -f -t 0`, not timed).
The contenders take turns in each round, with 50 ms pauses between them.

First start without the layers (BENCH_HOST_API=1, BENCH_COLD_RUNS rounds, default 5): the host's worker
and agent use a layer store of their own (a joined host's), fetching blobs from the portal with the
host's credential. Before each cold round every workload is deleted through the API, the host's
processes are stopped, its store is removed and the processes started again (warm interpreters, empty
store: not timed). Baseline: `skopeo copy` of the image from the portal's `/v2/` (API token) into a fresh
local `oci:` directory + `umoci unpack` of it + `runc run -d` with the same config.json builder over the
unpacked rootfs, all timed, on the same filesystem.

Run: BENCH_HOST_API=0|1 scripts/with-test-services.sh .venv/bin/python bench/api_workload_start.py
(root, PostgreSQL, podman/skopeo/umoci from scripts/system-packages.txt; BENCH_PODMAN=0 leaves podman
out). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from harness import free_port, percentile, rss_kib  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "15"))
# BENCH_HOST_API=1: the host's worker and agent act as a host on its own machine would, reporting
# through the portal's host API with the host's credential (HTTP to the same web server) instead of
# the in-process link of the portal's own machine, and keep a layer store of their own.
HOST_API = os.environ.get("BENCH_HOST_API", "") == "1"
COLD_RUNS = int(os.environ.get("BENCH_COLD_RUNS", "5")) if HOST_API else 0
TRACE = os.environ.get("BENCH_TRACE", "") == "1"
POLL_SECONDS = 0.01  # how often the bench looks whether the row says running
PODMAN = os.environ.get("BENCH_PODMAN", "1") == "1" and shutil.which("podman") is not None
PODMAN_IMAGE = "localhost/bht-bench-busybox:1"
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
QUIET = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
# BENCH_LOG_DIR=<dir>: the web server's, workers' and agent's output appended to files there (debugging).
LOG_DIR = os.environ.get("BENCH_LOG_DIR", "")


def output_of(name: str) -> dict[str, Any]:
    if not LOG_DIR:
        return QUIET
    log = open(Path(LOG_DIR) / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it for its life
    return {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": log}


def start_worker(queues: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A Celery worker on `queues` (solo, as a small host runs it)."""
    # BENCH_PROFILE_WORKER=<file>: the host's worker under cProfile (solo pool: tasks run in it), dumped
    # to <file> when it stops; read with pstats (e.g. sorted by cumulative time, `ensure_running`).
    profile = os.environ.get("BENCH_PROFILE_WORKER", "") if "host." in queues else ""
    # BENCH_HOST_POOL=prefork: the host's worker as portal/stack.py runs it (a pool of 2 children)
    # instead of solo (tasks in the worker process itself).
    pool = os.environ.get("BENCH_HOST_POOL", "solo") if "host." in queues else "solo"
    pool_size = "2" if pool == "prefork" else "1"
    command = [
        sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []),
        # A joined host runs its own Django-free app (compute.host.worker), as `make agent` starts it.
        "-m", "celery", "-A", "compute.host.worker" if HOST_API and "host." in queues else "portal",
        "worker", "-Q", queues, "-c", pool_size,
        "-P", pool, "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, **output_of("worker-" + queues.replace(",", "+")))


def start_host_processes(queues: str, host_pk: Any, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """The host's worker on `queues` and its agent loop."""
    loop = ["-m", "compute.host", "agent"] if HOST_API else ["manage.py", "agent"]
    agent = [sys.executable, *loop, "--host", str(host_pk)]
    return [start_worker(queues, env), subprocess.Popen(agent, cwd=ROOT, env=env, **output_of("agent"))]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def main() -> None:
    import django

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) when terminated
    store = Path(tempfile.mkdtemp(prefix="bht-bench-store-", dir=ROOT / "var"))
    # A joined host's own layer store (the portal's own machine shares the portal's).
    host_store = (
        Path(tempfile.mkdtemp(prefix="bht-bench-hoststore-", dir=ROOT / "var")) if HOST_API else store
    )
    os.environ["BULKHEAD_STORE_DIR"] = str(store)
    django.setup()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the bench's own requests: not worth a line each
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    from django.contrib.auth import get_user_model

    from compute import hosts
    from compute.host.broker import key_prefix
    from compute.models import Host, Workload
    from imaging.models import Image
    from portal.celery import app as celery_app
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
        host_env["BULKHEAD_STORE_DIR"] = str(host_store)
        host_env["BULKHEAD_HOST_ID"] = str(host.pk)
    web = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT,
        env=env,
        **output_of("web"),
    )
    procs = [web]
    # The portal's own worker (imports write the portal's store); the host's serves its queue only, read
    # under the host's key prefix as in production (portal/stack.py host_worker).
    procs.append(start_worker("default", env))
    host_queues = host.queue
    host_env["BULKHEAD_BROKER_KEYPREFIX"] = key_prefix(host.pk)
    host_procs: list[subprocess.Popen[bytes]] = []
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
    observed: list[float] = []  # the same, until the bench saw the row say running
    posts: list[float] = []
    bare: list[float] = []
    podman: list[float] = []
    cold_ours: list[float] = []
    cold_skopeo: list[float] = []
    cold_parts: dict[str, list[float]] = {"skopeo_copy": [], "umoci_unpack": [], "runc_run_d": []}
    flat: Path | None = None
    bundle_dir: Path | None = None
    runc_root: Path | None = None
    scratch = Path(tempfile.mkdtemp(prefix="bht-bench-cold-", dir=ROOT / "var"))
    registry = f"127.0.0.1:{port}"
    rss_before: list[int] = []
    rss_after: list[int] = []
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
        # The host's agent asks the portal who it is at start: only once the portal answers.
        host_procs = start_host_processes(host_queues, host.pk, host_env)
        with open(archive, "rb") as f:
            client.post(
                "/api/v1/images/import/",
                data={"name": "busybox", "tag": "1", "tenant": str(tenant.pk)},
                files={"archive": f},
            )
        deadline = time.monotonic() + 120
        while not Image.objects.filter(name="busybox").exists():
            assert time.monotonic() < deadline, "image not imported in 120 s"
            time.sleep(0.1)
        image = Image.objects.get(name="busybox")
        while image.image_layers.count() == 0 or not all(
            get_store().has_layer(il.layer.diff_id) for il in image.image_layers.all()
        ):
            assert time.monotonic() < deadline, "layers not unpacked in 120 s"
            time.sleep(0.1)

        # The baseline's bundle: the same image flattened into a plain directory.
        lower = get_store().lower_dirs([il.layer.diff_id for il in image.image_layers.order_by("position")])
        flat = Path(tempfile.mkdtemp(prefix="bht-bench-flat-", dir=ROOT / "var"))
        for layer in lower:  # busybox layers have no whiteouts: a plain copy is the flattened tree
            subprocess.run(["cp", "-a", f"{layer}/.", str(flat)], check=True)
        bundle_dir = Path(tempfile.mkdtemp(prefix="bht-bench-bundle-", dir=ROOT / "var"))
        bundle = prepare_bare_bundle(bundle_dir, flat, ["/bin/sleep", "300"])
        runc_root = Path(tempfile.mkdtemp(prefix="bht-bench-runc-"))
        source = f"docker://{registry}/bench/busybox:1"
        creds = ["--src-tls-verify=false", "--src-creds", f"bench-op:{secret}"]
        if PODMAN:
            subprocess.run(
                ["skopeo", "copy", "-q", *creds, source, f"containers-storage:{PODMAN_IMAGE}"],
                check=True,
                **QUIET,
            )

        def create_and_wait(name: str) -> tuple[float, float]:
            """(POST until the portal recorded the workload running, POST until its 202)."""
            if TRACE:  # wall clock of each POST, to line up with the services' logs when profiling
                print(f"trace {name} post {time.time():.6f}", file=sys.stderr)
            wall0 = time.time()
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
            deadline = time.monotonic() + 120
            # The time counted is the row's `started_at`: the portal's clock (this machine's) when it
            # recorded the host's `running` report, in the statement that commits it. Polled slowly
            # (POLL_SECONDS): a poll every 2 ms took 10-20 % of a core from the create it was timing.
            while (
                row := poll.execute(
                    "SELECT started_at FROM compute_workload WHERE id = %s AND state = 'running'",
                    (workload_id,),
                ).fetchone()
            ) is None:
                assert time.monotonic() < deadline, f"{name} not running in 120 s"
                time.sleep(POLL_SECONDS)
            observed.append(time.perf_counter() - t0)
            elapsed = row[0].timestamp() - wall0
            if TRACE:
                print(f"trace {name} running {row[0].timestamp():.6f}", file=sys.stderr)
            # Not timed: the operation's end (the worker's finish report and whatever it does after the
            # workload runs), so that it does not run into the next contender's turn.
            while (
                poll.execute(
                    "SELECT 1 FROM portal_operation WHERE id = %s AND state = 'succeeded'",
                    (response.json()["id"],),
                ).fetchone()
                is None
            ):
                assert time.monotonic() < deadline, f"{name}'s operation not finished in 120 s"
                time.sleep(POLL_SECONDS)
            return elapsed, posted

        def bare_run(bundle: Path) -> float:
            cid = new_id()
            t0 = time.perf_counter()
            subprocess.run(
                ["runc", f"--root={runc_root}", "run", "-d", "--bundle", str(bundle), cid],
                check=True,
                **QUIET,
            )
            elapsed = time.perf_counter() - t0
            subprocess.run(
                ["runc", f"--root={runc_root}", "delete", "--force", cid], check=True, capture_output=True
            )
            return elapsed

        def podman_run() -> float:
            t0 = time.perf_counter()
            started = subprocess.run(
                ["podman", "run", "-d", *PODMAN_FLAGS, PODMAN_IMAGE, "/bin/sleep", "300"],
                check=True,
                capture_output=True,
                text=True,
            )
            elapsed = time.perf_counter() - t0
            subprocess.run(["podman", "rm", "-f", "-t", "0", started.stdout.strip()], check=True, **QUIET)
            return elapsed

        create_and_wait("warmup")
        bare_run(bundle)
        if PODMAN:
            podman_run()
        rss_before = [rss_kib(proc.pid) for proc in (*procs, *host_procs)]
        # Side by side: the contenders take turns within each round, so load from other processes on
        # the machine hits both about equally (our web, worker and agent are up and idle during `runc`).
        for i in range(RUNS):
            total, posted = create_and_wait(f"w{i}")
            ours.append(total)
            posts.append(posted)
            time.sleep(0.05)  # let the worker finish the operation's bookkeeping, as between API calls
            bare.append(bare_run(bundle))
            time.sleep(0.05)
            if PODMAN:
                podman.append(podman_run())
                time.sleep(0.05)
        rss_after = [rss_kib(proc.pid) for proc in (*procs, *host_procs)]

        def delete_all_workloads() -> None:
            # `sleep` as PID 1 ignores TERM: stopped at once (grace 0), or each delete waits out 10 s.
            for workload_id in Workload.objects.values_list("pk", flat=True):
                client.post(f"/api/v1/workloads/{workload_id}/stop/", json={"grace_seconds": 0})
                client.delete(f"/api/v1/workloads/{workload_id}/")
            deadline = time.monotonic() + 120
            while Workload.objects.exists():
                assert time.monotonic() < deadline, "workloads not deleted in 120 s"
                time.sleep(0.1)

        def host_ready(since: float) -> None:
            """The restarted worker answers a ping and the agent has sent a heartbeat since `since`."""
            deadline = time.monotonic() + 60
            while not celery_app.control.ping(timeout=0.5):
                assert time.monotonic() < deadline, "worker not answering"
            while True:
                beat = Host.objects.get(pk=host.pk).last_heartbeat
                if beat is not None and beat.timestamp() > since:
                    break
                assert time.monotonic() < deadline, "agent not reporting"
                time.sleep(0.1)
            time.sleep(1.0)  # the agent's start-up re-sync is done before the round starts

        def skopeo_unpack_run(n: int) -> float:
            layout, unpacked = scratch / f"oci-{n}", scratch / f"bundle-{n}"
            t0 = time.perf_counter()
            subprocess.run(["skopeo", "copy", "-q", *creds, source, f"oci:{layout}:1"], check=True, **QUIET)
            t1 = time.perf_counter()
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", str(unpacked)], check=True, **QUIET)
            t2 = time.perf_counter()
            # The same config.json builder as the other baselines, over umoci's rootfs.
            (unpacked / "config.json").unlink()
            prepared = prepare_bare_bundle(scratch / f"run-{n}", unpacked / "rootfs", ["/bin/sleep", "300"])
            elapsed = bare_run(prepared)
            cold_parts["skopeo_copy"].append(t1 - t0)
            cold_parts["umoci_unpack"].append(t2 - t1)
            cold_parts["runc_run_d"].append(elapsed)
            return (t2 - t0) + elapsed  # prepare_bare_bundle's copy of umoci's rootfs is not timed

        for i in range(COLD_RUNS):
            delete_all_workloads()
            stop(host_procs)
            shutil.rmtree(host_store)
            host_store.mkdir()
            since = time.time()
            host_procs = start_host_processes(host_queues, host.pk, host_env)
            host_ready(since)
            total, _posted = create_and_wait(f"cold{i}")
            cold_ours.append(total)
            time.sleep(0.05)
            cold_skopeo.append(skopeo_unpack_run(i))
            time.sleep(0.05)
    finally:
        poll.close()
        stop([*procs, *host_procs])
        runtime = oci_runtime(host)
        for runtime_id in runtime.list_ids():
            runtime.delete(runtime_id)
        if runc_root is not None:  # a baseline container left by a failed round
            listed = subprocess.run(
                ["runc", f"--root={runc_root}", "list", "-q"], capture_output=True, text=True
            )
            for cid in listed.stdout.split():
                subprocess.run(["runc", f"--root={runc_root}", "delete", "--force", cid], capture_output=True)
        if PODMAN:
            subprocess.run(["podman", "rmi", "-f", PODMAN_IMAGE], capture_output=True, check=False)

    for path in (store, host_store, flat, bundle_dir, runc_root, scratch):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    ours_ms = statistics.median(ours) * 1000
    bare_ms = statistics.median(bare) * 1000
    figures: dict[str, Any] = {
        "bench": "api_workload_start",
        "runs": RUNS,
        "host_link": "host API over HTTP" if HOST_API else "in process",
        "api_create_to_running_ms_median": round(ours_ms, 1),
        "api_create_to_running_ms_p90": round(percentile(ours, 90) * 1000, 1),
        # The same seen by the polling bench (quantized by the poll interval), warm-up and cold included.
        "api_create_to_running_seen_ms_median": round(statistics.median(observed) * 1000, 1),
        "poll_interval_ms": POLL_SECONDS * 1000,
        "api_post_202_ms_median": round(statistics.median(posts) * 1000, 1),
        "baseline": "bare runc run -d, same config.json",
        "bare_runc_run_d_ms_median": round(bare_ms, 1),
        "ratio_vs_bare_runc": round(ours_ms / bare_ms, 2),
        "ratio_vs_bare_runc_goal": 2.0,
    }
    if podman:
        podman_ms = statistics.median(podman) * 1000
        figures["podman_run_d_ms_median"] = round(podman_ms, 1)
        figures["ratio_vs_podman_run_d"] = round(ours_ms / podman_ms, 2)
        figures["ratio_vs_podman_run_d_goal"] = 0.5
    if cold_ours:
        cold_ms = statistics.median(cold_ours) * 1000
        skopeo_ms = statistics.median(cold_skopeo) * 1000
        figures["cold_runs"] = COLD_RUNS
        figures["cold_api_create_to_running_ms_median"] = round(cold_ms, 1)
        figures["cold_api_create_to_running_ms"] = [round(v * 1000, 1) for v in cold_ours]
        figures["skopeo_copy_umoci_unpack_runc_run_ms_median"] = round(skopeo_ms, 1)
        figures["skopeo_parts_ms_median"] = {
            part: round(statistics.median(values) * 1000, 1) for part, values in cold_parts.items()
        }
        figures["ratio_cold_vs_skopeo_copy_and_start"] = round(cold_ms / skopeo_ms, 2)
        figures["ratio_cold_goal"] = 1.2
    figures["load_average"] = os.getloadavg()[0]
    # Web, (portal worker,) host worker and agent memory, and what each further container adds to it.
    figures["rss_kib_web_worker_agent"] = rss_after
    figures["rss_kib_per_container"] = [
        round((a - b) / RUNS, 1) for a, b in zip(rss_after, rss_before, strict=True)
    ]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
