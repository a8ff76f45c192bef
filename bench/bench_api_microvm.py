"""The product path for both isolations: POST /api/v1/workloads/ -> `running` -> the workload's first log
line through the API, beside raw QEMU and `runc run` printing the same line, in one run; then 20 micro-VMs
created by one `bulkhead apply`.

The portal is started as `make run` starts it (bench/harness.py: `python -m portal.stack run` on a fresh
data directory: its libvirtd, worker, beat, agent and daphne). The workload is the busybox image running
`sh -c 'echo BENCH-LINE-<uuid>; exec sleep 600'` (a fresh uuid per boot, so a restarted workload's line is
told apart from the last boot's). Micro-VMs: 1 vCPU, 128 MiB, 1 GiB disk.

Baselines, interleaved round by round with ours so load from other processes hits both alike:
- raw QEMU: `qemu-system-x86_64` with the product's kernel, initramfs, the root disk the product built
  for the image, a same-size writable disk, the spec disk with the same command and an export disk
  (bench_microvm.py's command line), timed from spawn to the same line on its serial stdout;
- `runc run` (foreground) of the same image flattened, same config.json builder, to the same line.

Ours is timed from the POST; `running` from the row (a raw query by primary key every 5 ms), then the
logs endpoint (GET .../logs/, answered by the host's agent) polled every 20 ms until the line is there.
For micro-VMs the guest console file is watched too (host side, no API): when the init's first line and
the workload's line reached the host, which shows where the time goes.

Run (root, libvirtd, PostgreSQL + Redis from the script):
    scripts/with-test-services.sh .venv/bin/python bench/bench_api_microvm.py [--runs 3] [--apply-vms 20]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import admin_token, make_run  # noqa: E402

LINE = "BENCH-LINE-"
# TERM ends it at once in both isolations (a plain `sleep` as a container's PID 1 ignores TERM and a stop
# would wait out the grace period: the workload's doing, not the product's).
COMMAND = [
    "/bin/sh",
    "-c",
    f"trap 'exit 143' TERM; echo {LINE}$(cat /proc/sys/kernel/random/uuid); sleep 600 & wait",
]
VM_MEMORY_MIB = 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--apply-vms", type=int, default=20, help="0: skip the `bulkhead apply` part")
    options = parser.parse_args()
    results: dict[str, Any] = {
        "bench": "api_microvm",
        "runs": options.runs,
        "loadavg_start": os.getloadavg()[0],
    }
    with make_run() as product:
        import django

        django.setup()
        bench = ProductBench(product)
        try:
            bench.prepare()
            results["make_run_to_api_seconds"] = round(time.monotonic() - product.started_at, 2)
            results.update(bench.measure(options.runs))
            if options.apply_vms:
                results["apply"] = bench.apply_many(options.apply_vms)
        finally:
            bench.cleanup()
        results["loadavg_end"] = os.getloadavg()[0]
        results["make_run_log"] = str(product.log)
    shutil.rmtree(product.data_dir, ignore_errors=True)
    print(json.dumps(results))
    return 0


class ProductBench:
    def __init__(self, product: Any) -> None:
        self.product = product
        self.work = Path(tempfile.mkdtemp(prefix="bht-bench-apivm-", dir=ROOT / "var"))
        self.work.chmod(0o755)
        self.samples: dict[str, list[float]] = {}
        self.breakdown: dict[str, list[float]] = {}

    # -- set-up --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        import httpx
        import psycopg
        from django.db import connection

        from compute.models import Host
        from imaging.models import Image
        from tenants.models import Quota, Tenant
        from tests.imaging.images import build_image, busybox_layers, write_oci_archive

        self.admin, secret = admin_token()
        self.secret = secret
        self.api = httpx.Client(
            base_url=self.product.url + "/api/v1/", timeout=60, headers={"Authorization": f"Bearer {secret}"}
        )
        self.tenant = Tenant.objects.get(name="demo")
        Quota.objects.filter(tenant=self.tenant).update(workloads=1000, vcpus=1000, memory_mib=10**6)
        # 20 one-vCPU VMs on 2 cores: the operator's choice for this run (default overcommit is 4).
        Host.objects.update(cpu_overcommit=16)
        self.host = wait_for(lambda: Host.objects.filter(state="ready").first(), 120, "the local host")
        archive = write_oci_archive(build_image(busybox_layers()), self.work / "busybox.tar")
        with archive.open("rb") as f:
            response = self.api.post(
                "images/import/",
                data={"name": "busybox", "tag": "1", "tenant": str(self.tenant.pk)},
                files={"archive": f},
            )
        assert response.status_code == 202, response.text
        self.wait_operation(response.json()["id"], 120)
        self.image_id = str(Image.objects.get(name="busybox").pk)
        db = connection.settings_dict
        self.poll = psycopg.connect(
            dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"], host=db["HOST"], port=db["PORT"],
            autocommit=True,
        )  # fmt: skip

    def wait_operation(self, op_id: str, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            op = self.api.get(f"operations/{op_id}/").json()
            return op if op["state"] in ("succeeded", "failed") else None

        op = wait_for(done, timeout, f"operation {op_id}", interval=0.1)
        assert op["state"] == "succeeded", op
        return op

    # -- our side ------------------------------------------------------------------------------------

    def state_is(self, workload_id: str, state: str) -> bool:
        row = self.poll.execute("SELECT state FROM compute_workload WHERE id = %s", (workload_id,)).fetchone()
        return row is not None and row[0] == state

    def first_line_via_api(self, workload_id: str, seen: set[str], deadline: float) -> str:
        while True:
            text = self.api.get(f"workloads/{workload_id}/logs/").json().get("logs", "")
            for line in text.splitlines():
                if line.startswith(LINE) and line not in seen:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new {LINE} line from {workload_id}: {text[-300:]!r}")
            time.sleep(0.02)

    def console_file(self, workload_id: str) -> Path:
        from compute.hosts import host_state_dir

        return host_state_dir(self.host) / "vms" / f"{workload_id}.console.log"

    def timed(self, kind: str, isolation: str, post: Any, workload_id: str | None, seen: set[str]) -> str:
        """POST (``post()`` returns the response), then `running`, then a line not in ``seen``."""
        t0 = time.monotonic()
        response = post()
        assert response.status_code in (201, 202), response.text
        posted = time.monotonic() - t0
        workload_id = workload_id or response.json()["target_id"]
        assert workload_id is not None
        deadline = t0 + 180
        marks: dict[str, float] = {}
        if kind == "restart":  # the row leaves `running` (the stop), then `creating` marks the new boot
            wait_for(lambda: not self.state_is(workload_id, "running"), 60, "the stop", interval=0.005)
        while not self.state_is(workload_id, "running"):
            if "creating" not in marks and self.state_is(workload_id, "creating"):
                marks["creating"] = time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workload_id} did not run")
            time.sleep(0.005)
        running = time.monotonic() - t0
        if isolation == "microvm":
            console = self.console_file(workload_id)
            while "line" not in marks:  # host side: when the lines reached the console file
                data = console.read_bytes() if console.exists() else b""
                if "init" not in marks and b"BULKHEAD-INIT" in data:
                    marks["init"] = time.monotonic() - t0
                if any(
                    line.strip().startswith(LINE.encode())
                    and line.strip().decode(errors="replace") not in seen
                    for line in data.splitlines()
                ):
                    marks["line"] = time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"console of {workload_id}: {data[-300:]!r}")
                time.sleep(0.01)
        line = self.first_line_via_api(workload_id, seen, deadline)
        total = time.monotonic() - t0
        seen.add(line)
        key = f"{isolation}_{kind}"
        self.samples.setdefault(key, []).append(total)
        for name, value in {"post_202": posted, "running": running, **marks}.items():
            self.breakdown.setdefault(f"{key}.{name}", []).append(value)
        if kind == "restart" and "creating" in marks:  # the boot part of a restart, after its stop
            self.samples.setdefault(f"{key}_boot_part", []).append(total - marks["creating"])
        return workload_id

    def create(self, isolation: str, name: str, seen: set[str]) -> str:
        body = {
            "name": name,
            "image": self.image_id,
            "tenant": str(self.tenant.pk),
            "command": COMMAND,
            "isolation": isolation,
            "memory_mib": VM_MEMORY_MIB,
            "vcpus": "1",
        }
        return self.timed("create", isolation, lambda: self.api.post("workloads/", json=body), None, seen)

    def delete(self, workload_id: str) -> None:
        response = self.api.delete(f"workloads/{workload_id}/")
        if response.status_code == 202:
            self.wait_operation(response.json()["id"], 120)

    # -- baselines -----------------------------------------------------------------------------------

    def prepare_baselines(self, vm_workload_id: str) -> None:
        from bench_container_start import prepare_bare_bundle

        from compute.host.context import host_context
        from compute.host.drivers.microvm import guest
        from compute.models import Workload
        from imaging.services import get_store

        workload = Workload.objects.select_related("image").get(pk=vm_workload_id)
        diff_ids = [il.layer.diff_id for il in workload.image.image_layers.order_by("position")]
        self.root_disk = get_store().build_disk(diff_ids)  # the disk the product built (already there)
        self.guest = guest(host_context(workload.host_id))
        flat = self.work / "flat"
        flat.mkdir()
        for layer in reversed(get_store().lower_dirs(diff_ids)):  # bottom layer first
            subprocess.run(["cp", "-a", f"{layer}/.", str(flat)], check=True)
        self.bundle = prepare_bare_bundle(self.work / "bundle", flat, COMMAND)
        self.runc_root = self.work / "runc"

    def raw_qemu(self) -> None:
        from bench_microvm import _qemu, _raw_args

        from compute.runtimes.libvirt import (
            VmSpec,
            WorkloadPayload,
            export_disk_path,
            make_export_disk,
            make_rw_disk,
            spec_disk_path,
            write_spec_disk,
        )
        from compute.runtimes.libvirtd import domain_type_for_host

        domain_type = domain_type_for_host()
        spec = VmSpec(
            vm_id=uuid.uuid4(),
            vcpus=1,
            memory_mib=VM_MEMORY_MIB,
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            root_disk=self.root_disk,
            rw_disk=self.work / "raw.rw",
            console_log=self.work / "raw.log",
            payload=WorkloadPayload(
                args=tuple(COMMAND),
                env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
            ),
            rw_disk_size_mib=1024,
            domain_type=domain_type,  # type: ignore[arg-type]
        )
        make_rw_disk(spec.rw_disk, spec.rw_disk_size_mib)
        write_spec_disk(spec_disk_path(spec.rw_disk), spec.payload, "0" * 32)
        make_export_disk(export_disk_path(spec.rw_disk), spec.rw_disk_size_mib)
        disks = [spec.rw_disk, spec_disk_path(spec.rw_disk), export_disk_path(spec.rw_disk)]
        accel = "kvm" if domain_type == "kvm" else "tcg"
        try:
            t0 = time.monotonic()
            with _qemu(_raw_args(spec, accel, spec.initrd, disks, readonly=(1,))) as process:
                assert process.stdout is not None
                marks = read_until(
                    process.stdout.fileno(), {"init": b"BULKHEAD-INIT", "line": LINE.encode()}, t0
                )
        finally:
            for disk in disks:
                disk.unlink(missing_ok=True)
        self.samples.setdefault("raw_qemu", []).append(marks["line"])
        self.breakdown.setdefault("raw_qemu.init", []).append(marks["init"])

    def runc_run(self) -> None:
        cid = f"bht-bench-{uuid.uuid4().hex[:12]}"
        t0 = time.monotonic()
        process = subprocess.Popen(
            ["runc", f"--root={self.runc_root}", "run", "--bundle", str(self.bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            marks = read_until(process.stdout.fileno(), {"line": LINE.encode()}, t0)
        finally:
            subprocess.run(
                ["runc", f"--root={self.runc_root}", "delete", "--force", cid], capture_output=True
            )
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self.samples.setdefault("runc_run", []).append(marks["line"])

    # -- the run -------------------------------------------------------------------------------------

    def measure(self, runs: int) -> dict[str, Any]:
        seen: set[str] = set()
        # The first create after `make run`: the agent's first libvirt connection and the image's root disk.
        first_vm = self.create("microvm", "first-vm", seen)
        first_ct = self.create("namespace", "first-ct", seen)
        first = {k: round(v[0], 3) for k, v in self.samples.items()}
        first_breakdown = {k: round(v[0], 3) for k, v in self.breakdown.items()}
        self.samples.clear()
        self.breakdown.clear()
        self.prepare_baselines(first_vm)
        self.delete(first_ct)
        for i in range(runs):
            vm = self.create("microvm", f"vm{i}", seen)
            self.raw_qemu()
            ct = self.create("namespace", f"ct{i}", seen)
            self.runc_run()
            # restart, and start after stop, of the same workloads (the line is a new one each boot)
            for workload_id, isolation in ((vm, "microvm"), (ct, "namespace")):
                self.timed(
                    "restart",
                    isolation,
                    lambda w=workload_id: self.api.post(f"workloads/{w}/restart/", json={}),
                    workload_id,
                    seen,
                )
                stop = self.api.post(f"workloads/{workload_id}/stop/", json={})
                self.wait_operation(stop.json()["id"], 120)
                self.timed(
                    "start_after_stop",
                    isolation,
                    lambda w=workload_id: self.api.post(f"workloads/{w}/start/"),
                    workload_id,
                    seen,
                )
            self.raw_qemu()  # one more baseline sample per round: the VM side had three boots
            self.runc_run()
            self.delete(vm)
            self.delete(ct)
        self.delete(first_vm)
        medians = {k: round(statistics.median(v), 3) for k, v in self.samples.items()}
        ratios = {}
        for key, value in medians.items():
            if key.startswith("microvm_"):
                ratios[f"{key}_vs_raw_qemu"] = round(value / medians["raw_qemu"], 2)
            elif key.startswith("namespace_"):
                ratios[f"{key}_vs_runc_run"] = round(value / medians["runc_run"], 2)
        ratios["first_microvm_create_vs_raw_qemu"] = round(first["microvm_create"] / medians["raw_qemu"], 2)
        ratios["first_namespace_create_vs_runc_run"] = round(
            first["namespace_create"] / medians["runc_run"], 2
        )
        return {
            "to_first_line_seconds_median": medians,
            "ratios": ratios,
            "first_after_make_run_seconds": first,
            "first_after_make_run_breakdown": first_breakdown,
            "breakdown_seconds_median": {
                k: round(statistics.median(v), 3) for k, v in self.breakdown.items()
            },
            "samples": {k: [round(x, 3) for x in v] for k, v in self.samples.items()},
        }

    def apply_many(self, count: int) -> dict[str, Any]:
        """`bulkhead apply` of a document of `count` micro-VMs (128 MiB): total time, memory per QEMU."""
        from bench_microvm import _memory_of

        from compute.models import Workload

        lines = ["apiVersion: bulkhead/v1", "kind: TenantConfig", "spec:", "  workloads:"]
        for n in range(count):
            lines += [
                f"    - name: many{n}",
                "      image: busybox:1",
                "      isolation: microvm",
                f"      memory_mib: {VM_MEMORY_MIB}",
                "      vcpus: 1",
                f"      command: {json.dumps(COMMAND)}",
            ]
        document = self.work / "many.yaml"
        document.write_text("\n".join(lines) + "\n")
        env = {
            **os.environ,
            "BULKHEAD_URL": self.product.url,
            "BULKHEAD_TOKEN": self.secret,
            "BULKHEAD_TENANT": "demo",
        }
        t0 = time.monotonic()
        cli = subprocess.run(
            [sys.executable, "-m", "portal.cli", "apply", "-f", str(document), "--yes"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        apply_seconds = time.monotonic() - t0
        assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
        ids = [
            str(pk) for pk in Workload.objects.filter(name__startswith="many").values_list("pk", flat=True)
        ]
        assert len(ids) == count, ids
        wait_for(lambda: all(self.state_is(w, "running") for w in ids), 600, "all running", interval=0.1)
        all_running = time.monotonic() - t0

        def all_printed() -> bool:
            return all(
                LINE.encode() in self.console_file(w).read_bytes()
                for w in ids
                if self.console_file(w).exists()
            )

        wait_for(
            lambda: all(self.console_file(w).exists() for w in ids) and all_printed(),
            900,
            "all lines",
            interval=0.5,
        )
        all_lines = time.monotonic() - t0
        memory = [qemu_memory(w, _memory_of) for w in ids]
        result = {
            "vms": count,
            "memory_mib": VM_MEMORY_MIB,
            "bulkhead_apply_seconds": round(apply_seconds, 1),
            "until_all_running_seconds": round(all_running, 1),
            "until_all_first_lines_seconds": round(all_lines, 1),
            "qemu_rss_mib_median": round(statistics.median(m["rss_mib"] for m in memory), 1),
            "qemu_pss_mib_median": round(statistics.median(m["pss_mib"] for m in memory), 1),
            "guest_ram_resident_mib_median": round(
                statistics.median(m["guest_ram_resident_mib"] for m in memory), 1
            ),
            "beyond_guest_ram_mib_median": round(
                statistics.median(m["pss_mib"] - m["guest_ram_resident_mib"] for m in memory), 1
            ),
            "qemu_pss_mib_total": round(sum(m["pss_mib"] for m in memory), 1),
            "loadavg": os.getloadavg()[0],
        }
        for w in ids:
            self.delete(w)
        return result

    def cleanup(self) -> None:
        from compute.models import Workload
        from tests.compute.runtimes import vm_runtime

        for workload in Workload.objects.all():
            try:
                self.delete(str(workload.pk))
            except Exception as error:  # the bench is ending: say so and go on
                print(f"cleanup: {workload.pk}: {error}", file=sys.stderr)
        if hasattr(self, "host"):
            runtime = vm_runtime(self.host)
            for vm_id in runtime.list_ids():
                runtime.delete(vm_id)
        shutil.rmtree(self.work, ignore_errors=True)


def qemu_memory(workload_id: str, memory_of: Any) -> dict[str, float]:
    """RSS and PSS of the QEMU process of a workload (found by its domain name on the command line)."""
    from compute.runtimes.libvirt import domain_name

    name = domain_name(uuid.UUID(workload_id)).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and b"guest=" + name in cmdline:
            pid = int(entry.name)
            from harness import rss_kib

            return {"rss_mib": rss_kib(pid) / 1024, **memory_of(pid, VM_MEMORY_MIB)}
    raise LookupError(f"no QEMU process for {workload_id}")


def read_until(fd: int, lines: dict[str, bytes], t0: float, timeout: float = 180.0) -> dict[str, float]:
    """Seconds since t0 at which each of `lines` appeared on `fd`."""
    import selectors

    marks: dict[str, float] = {}
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while len(marks) < len(lines):
            remaining = t0 + timeout - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"not all of {list(lines)} appeared: {seen[-300:]!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise TimeoutError(f"the output ended before {list(lines)}: {seen[-300:]!r}")
            seen = seen[-4096:] + chunk
            for name, text in lines.items():
                if name not in marks and text in seen:
                    marks[name] = time.monotonic() - t0
    return marks


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
